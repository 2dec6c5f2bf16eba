"""Hostile and damaged embedding files: refused with a clear error naming the file, no code runs, and
time and memory stay bounded. Legitimate A1111 / diffusers / original-TI files still load.

Every hostile pickle is first shown to be live (plain unpickling really runs its command), so a test
that passes means load_embedding refused a real attack, not a dud.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from embedtrain.embedding import EmbeddingError, add_embedding, load_embedding, save_embedding

ROOT = Path(__file__).resolve().parent.parent
DIM = 32  # the tiny model's token width


# ---------------------------------------------------------------- hostile pickles
class Evil:
    """Unpickling runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _ustr(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def stack_global(marker) -> bytes:
    """Protocol 4 by hand: STACK_GLOBAL('os', 'system'), then REDUCE on ('touch MARKER',)."""
    return (b"\x80\x04" + _ustr("os") + _ustr("system") + b"\x93" + _ustr(f"touch {marker}") + b"\x85R.")


def builtins_eval(marker) -> bytes:
    """Protocol 2 GLOBAL builtins.eval on an __import__ expression (no os in the GLOBAL at all)."""
    expr = f"__import__('os').system('touch {marker}')"
    return b"\x80\x02cbuiltins\neval\n" + _ustr(expr) + b"\x85R."


def protocol0(marker) -> bytes:
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def torch_zip(marker, path):
    # a real torch zip archive (data.pkl + tensor records) whose pickle also holds the attack
    torch.save({"string_to_param": {"*": torch.zeros(1, DIM)}, "name": Evil(marker)}, path)


def torch_legacy(marker, path):
    torch.save({"string_to_param": {"*": Evil(marker)}}, path, _use_new_zipfile_serialization=False)


def nested_in_list(marker, path):
    with open(path, "wb") as fh:
        pickle.dump({"string_to_param": {"*": [torch.zeros(DIM), [Evil(marker)]]}}, fh, protocol=2)


HOSTILE = {
    "reduce.pt": lambda m, p: p.write_bytes(pickle.dumps({"string_to_param": {"*": Evil(m)}}, protocol=2)),
    "stack_global.bin": lambda m, p: p.write_bytes(stack_global(m)),
    "builtins_eval.bin": lambda m, p: p.write_bytes(builtins_eval(m)),
    "protocol0.pt": lambda m, p: p.write_bytes(protocol0(m)),
    "torch_zip.ckpt": torch_zip,
    "torch_legacy.pt": torch_legacy,
    "nested.pt": nested_in_list,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_pickles_that_run_code_are_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "PWNED"
    path = tmp_path / kind
    HOSTILE[kind](marker, path)
    # the payload is live: an ordinary unpickler runs it
    with open(path, "rb") as fh:
        try:
            torch.load(fh, weights_only=False) if kind.startswith("torch") else pickle.load(fh)
        except Exception:
            pass
    assert marker.exists(), f"{kind}: the test payload is a dud"
    marker.unlink()

    with pytest.raises(EmbeddingError) as err:
        load_embedding(path)
    msg = str(err.value)
    assert not marker.exists(), f"{kind}: code ran while loading"
    assert kind in msg and "refused" in msg, msg
    assert "weights_only" not in msg and "\x1b" not in msg, msg  # no advice to load it unsafely, no ANSI codes


def test_environment_cannot_switch_the_safe_loader_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    HOSTILE["reduce.pt"](marker, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="refused"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


def test_torch_older_than_2_6_refuses_pickles_outright(tmp_path, monkeypatch):
    # weights_only=True is bypassable before torch 2.6 (CVE-2025-32434); requirements allow torch >= 2.4
    save_embedding(tmp_path / "ok.pt", torch.ones(1, DIM), "ok", fmt="a1111")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(EmbeddingError, match="CVE-2025-32434"):
        load_embedding(tmp_path / "ok.pt")
    save_embedding(tmp_path / "ok.safetensors", torch.ones(1, DIM), "ok")
    assert load_embedding(tmp_path / "ok.safetensors").vectors.shape == (1, DIM)  # safetensors still fine


# ---------------------------------------------------------------- legitimate pickles
def a1111_dict(vec, name="myemb", param=None):
    # as AUTOMATIC1111 writes it: the vectors require grad, '*' maps to token 265
    return {"string_to_token": {"*": 265}, "string_to_param": param or {"*": vec.clone().requires_grad_(True)},
            "name": name, "step": 1234, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned"}


@pytest.mark.parametrize("variant", ["zip", "legacy", "parameterdict", "parameter", "no_checkpoint"])
def test_legitimate_a1111_and_original_ti_files_load(tmp_path, variant):
    vec = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1))
    data = a1111_dict(vec)
    kwargs = {}
    if variant == "legacy":      # torch < 1.6 serialisation (old embeddings on civitai)
        kwargs["_use_new_zipfile_serialization"] = False
    elif variant == "parameterdict":  # the original textual-inversion code pickled an nn.ParameterDict
        data["string_to_param"] = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    elif variant == "parameter":
        data["string_to_param"] = {"*": torch.nn.Parameter(vec.clone())}
    elif variant == "no_checkpoint":
        data["sd_checkpoint"] = data["sd_checkpoint_name"] = None
    torch.save(data, tmp_path / "myemb.pt", **kwargs)
    loaded = load_embedding(tmp_path / "myemb.pt")
    assert loaded.name == "myemb" and loaded.format == "a1111"
    assert torch.equal(loaded.vectors, vec)
    assert loaded.meta["step"] == "1234"


def test_diffusers_learned_embeds_bin_loads(tmp_path):
    vec = torch.randn(DIM)
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    loaded = load_embedding(tmp_path / "learned_embeds.bin")
    assert loaded.name == "cat-toy" and torch.equal(loaded.vectors[0], vec)


def test_a_damaged_pt_is_a_clear_error(tmp_path):
    save_embedding(tmp_path / "ok.pt", torch.ones(2, DIM), "ok", fmt="a1111")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.bin").write_text("this is not a torch file")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name, words in (("cut.pt", "not a readable torch file"), ("text.bin", "not a readable torch file"),
                        ("list.pt", "expected a dict")):
        with pytest.raises(EmbeddingError, match=words) as err:
            load_embedding(tmp_path / name)
        assert name in str(err.value)


# ---------------------------------------------------------------- safetensors
def st_file(path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def f32(n: int) -> bytes:
    return struct.pack(f"<{n}f", *([0.5] * n))


# Checked by the safetensors library's parser (safe_open), which reads the header once, after its length is
# bounded here: its reason is quoted in the message.
LIBRARY = "not a valid safetensors file"
SAFETENSORS_CASES = {
    # name: (header, data, header_len, words expected in the message)
    "huge_header": ({}, b"", 10 ** 12, "header claims"),
    "header_past_end": ({"emb_params": {}}, b"", 5000, "header claims"),
    "not_json": (None, b"", None, LIBRARY),
    "json_list": ([1, 2], b"", None, LIBRARY),
    "deep_json": ("deep", b"", None, LIBRARY),
    "no_tensors": ({"__metadata__": {"name": "x"}}, b"", None, "holds 0 tensors"),
    "int_dtype": ({"emb_params": {"dtype": "I32", "shape": [2, DIM], "data_offsets": [0, 8 * DIM]}},
                  f32(2 * DIM), None, "dtype 'I32'"),
    "unknown_dtype": ({"emb_params": {"dtype": "Q99", "shape": [2, DIM], "data_offsets": [0, 8 * DIM]}},
                      f32(2 * DIM), None, LIBRARY + r" \(.*Q99"),
    "offsets_short": ({"emb_params": {"dtype": "F32", "shape": [2, DIM], "data_offsets": [0, 8]}},
                      f32(2 * DIM), None, LIBRARY),
    "offsets_past_end": ({"emb_params": {"dtype": "F32", "shape": [2, DIM], "data_offsets": [64, 64 + 8 * DIM]}},
                         f32(2 * DIM), None, LIBRARY),
    "negative_offsets": ({"emb_params": {"dtype": "F32", "shape": [2, DIM], "data_offsets": [-8, 8 * DIM - 8]}},
                         f32(2 * DIM), None, LIBRARY),
    "huge_shape": ({"emb_params": {"dtype": "F32", "shape": [2 ** 31, 2 ** 31], "data_offsets": [0, 8]}},
                   f32(2), None, LIBRARY),
    "too_many_vectors": ({"emb_params": {"dtype": "F32", "shape": [100, DIM], "data_offsets": [0, 400 * DIM]}},
                         f32(100 * DIM), None, "shape"),
    "three_dims": ({"emb_params": {"dtype": "F32", "shape": [1, 2, DIM], "data_offsets": [0, 8 * DIM]}},
                   f32(2 * DIM), None, "shape"),
    "string_shape": ({"emb_params": {"dtype": "F32", "shape": "2x32", "data_offsets": [0, 8 * DIM]}},
                     f32(2 * DIM), None, LIBRARY),
    "metadata_list": ({"__metadata__": [1], "emb_params": {"dtype": "F32", "shape": [1, DIM],
                                                          "data_offsets": [0, 4 * DIM]}},
                      f32(DIM), None, LIBRARY),
    "two_unknown": ({"a": {"dtype": "F32", "shape": [1, DIM], "data_offsets": [0, 4 * DIM]},
                     "b": {"dtype": "F32", "shape": [1, DIM], "data_offsets": [4 * DIM, 8 * DIM]}},
                    f32(2 * DIM), None, "unknown layout"),
    "nan": ({"emb_params": {"dtype": "F32", "shape": [1, DIM], "data_offsets": [0, 4 * DIM]}},
            struct.pack(f"<{DIM}f", *([float("nan")] * DIM)), None, "NaN"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_lying_or_damaged_safetensors_are_clear_errors(tmp_path, case):
    header, data, header_len, words = SAFETENSORS_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    if header is None:
        raw = b"{not json"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    elif header == "deep":
        raw = b"[" * 200_000 + b"]" * 200_000
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        st_file(path, header, data, header_len)
    with pytest.raises(EmbeddingError, match=words) as err:
        load_embedding(path)
    assert path.name in str(err.value)


def test_safetensors_header_is_bounded_before_the_library_parses_it_and_checked_before_a_tensor_is_read(
        tmp_path, monkeypatch):
    """The header is parsed once (safe_open's), never by hand as well; its length is bounded before the library
    sees the file, and every entry's dtype and shape are checked before any tensor is read."""
    import safetensors
    real, calls = safetensors.safe_open, []

    class Spy:
        def __init__(self, *a, **k):
            calls.append("parse")
            self.inner = real(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *a):
            return self.inner.__exit__(*a)

        def get_tensor(self, key):
            calls.append("read")
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)
    monkeypatch.setattr(safetensors, "safe_open", Spy)
    for case, expect in (("huge_header", []), ("int_dtype", ["parse"]), ("too_many_vectors", ["parse"])):
        header, data, header_len, words = SAFETENSORS_CASES[case]
        calls.clear()
        with pytest.raises(EmbeddingError, match=words):
            load_embedding(st_file(tmp_path / f"{case}.safetensors", header, data, header_len))
        assert calls == expect, case
    calls.clear()
    save_embedding(tmp_path / "ok.safetensors", torch.ones(2, DIM), "ok")
    assert load_embedding(tmp_path / "ok.safetensors").vectors.shape == (2, DIM) and calls == ["parse", "read"]


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    good = save_embedding(tmp_path / "good.safetensors", torch.randn(4, DIM), "good")
    raw = good.read_bytes()
    for cut in (4, 20, len(raw) - 8 * DIM, len(raw) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(raw[:cut])
        with pytest.raises(EmbeddingError, match="too short|truncated|damaged") as err:
            load_embedding(path)
        assert path.name in str(err.value)


def test_sparse_gigabyte_file_is_refused_unread(tmp_path):
    # A valid-looking header over 900 MB of (sparse) data: refused by size before anything is read.
    n = 75 * 3_000_000 * 4
    path = tmp_path / "big.safetensors"
    raw = json.dumps({"emb_params": {"dtype": "F32", "shape": [75, 3_000_000], "data_offsets": [0, n]}}).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + n)
    with pytest.raises(EmbeddingError, match="too big for an embedding"):
        load_embedding(path)
    os.replace(path, tmp_path / "big.pt")
    with pytest.raises(EmbeddingError, match="too big for an embedding"):
        load_embedding(tmp_path / "big.pt")


@pytest.fixture(scope="module")
def tiny_pipe():
    from embedtrain.models import load_pipeline
    return load_pipeline("tiny")[0]


@pytest.mark.parametrize("fmt", ["safetensors", "a1111"])
def test_vectors_of_another_model_family_are_refused_by_the_model(tmp_path, tiny_pipe, fmt):
    path = save_embedding(tmp_path / f"sd15{'.pt' if fmt == 'a1111' else '.safetensors'}", torch.randn(2, 768),
                          "sdfifteen", fmt=fmt)
    loaded = load_embedding(path)  # a fine SD 1.x file ...
    with pytest.raises(EmbeddingError, match=r"shape \(2, 768\).*\[N, 32\].*another model family"):
        add_embedding(tiny_pipe.tokenizer, tiny_pipe.text_encoder, loaded.name, loaded.vectors)  # ... not for this


# ---------------------------------------------------------------- A1111 embedding PNGs
def png_chunk(ctype: bytes, body: bytes, length: int | None = None, crc: int | None = None) -> bytes:
    return (struct.pack(">I", len(body) if length is None else length) + ctype + body
            + struct.pack(">I", zlib.crc32(ctype + body) if crc is None else crc))


def png_bytes(*chunks: bytes) -> bytes:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" + b"\x80" * 6 + b"\0" + b"\x80" * 6))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + png_chunk(b"IEND", b"")


def a1111_b64(vec, name="pngemb") -> bytes:
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}},
            "name": name, "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}
    return base64.b64encode(json.dumps(data).encode())


@pytest.mark.parametrize("chunk", ["tEXt", "zTXt", "iTXt", "iTXt-compressed", "pil"])
def test_a1111_png_embedding_loads(tmp_path, chunk):
    vec = torch.randn(2, DIM, generator=torch.Generator().manual_seed(3))
    payload = a1111_b64(vec)
    path = tmp_path / "pngemb.png"
    if chunk == "pil":  # written by PIL the way A1111 does (PngInfo.add_text), over a real picture
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        info.add_text("sd-ti-embedding", payload.decode())
        Image.new("RGB", (64, 80), (30, 60, 90)).save(path, pnginfo=info)
    else:
        body = {"tEXt": b"sd-ti-embedding\0" + payload,
                "zTXt": b"sd-ti-embedding\0\0" + zlib.compress(payload),
                "iTXt": b"sd-ti-embedding\0\0\0\0\0" + payload,
                "iTXt-compressed": b"sd-ti-embedding\0\1\0\0\0" + zlib.compress(payload)}[chunk]
        other = png_chunk(b"tEXt", b"parameters\0a photo of pngemb")
        path.write_bytes(png_bytes(other, png_chunk(chunk[:4].encode(), body)))
    loaded = load_embedding(path)
    assert loaded.name == "pngemb" and loaded.meta["step"] == "500"
    assert torch.equal(loaded.vectors, vec)


def zlib_bomb(size: int) -> bytes:
    """A valid zlib stream of `size` zero bytes (a multiple of 1 MB) in ~1 kB per MB, built in milliseconds:
    after a full flush every 1 MB block of zeros compresses to the same bytes, so they are repeated."""
    block = b"\0" * (1 << 20)
    c = zlib.compressobj(9)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    steady = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    adler = ((size % 65521) << 16) | 1  # adler32 of `size` zeros: A stays 1, B grows by 1 per byte
    return first + steady * ((size >> 20) - 1) + b"\x03\x00" + struct.pack(">I", adler)  # empty final block


def test_the_zlib_bomb_is_real():
    d = zlib.decompressobj()
    total, data = 0, zlib_bomb(64 << 20)
    while data:
        total += len(d.decompress(data, 1 << 24))
        data = d.unconsumed_tail
    assert total == 64 << 20 and d.eof and len(zlib_bomb(64 << 20)) < 100_000


PNG_CASES = {
    # name: (file bytes, words)
    "no_chunk": (lambda: png_bytes(png_chunk(b"tEXt", b"parameters\0a cat")), "holds no embedding"),
    "empty_chunk": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0")), "not base64 of JSON"),
    "not_base64": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0%%%%")), "not base64 of JSON"),
    "no_params": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0" + base64.b64encode(b'{"name": 1}'))),
                  "unknown layout"),
    "ragged": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0" + base64.b64encode(
        b'{"string_to_param": {"*": {"TORCHTENSOR": [[1, 2], [3]]}}}'))), "not a rectangular list"),
    "deep_json": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0" + base64.b64encode(
        b"[" * 100_000 + b"]" * 100_000))), "not base64 of JSON"),
    "zlib_bomb": (lambda: png_bytes(png_chunk(b"zTXt", b"sd-ti-embedding\0\0" + zlib_bomb(256 << 20))),
                  "zlib bomb"),
    "itxt_bomb": (lambda: png_bytes(png_chunk(b"iTXt", b"sd-ti-embedding\0\1\0\0\0" + zlib_bomb(64 << 20))),
                  "zlib bomb"),
    "bad_zlib": (lambda: png_bytes(png_chunk(b"zTXt", b"sd-ti-embedding\0\0not zlib")), "damaged"),
    "oversize_chunk": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0AAAA", length=0x7FFFFFF0)),
                       "claims 2147483632 bytes"),
    "truncated": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0" + a1111_b64(torch.ones(1, DIM))))[:300],
                  "truncated"),
    "bad_crc": (lambda: png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0" + a1111_b64(torch.ones(1, DIM)), crc=7)),
                "CRC"),
    "jpeg_named_png": (lambda: b"\xff\xd8\xff\xe0" + b"\0" * 100, "not a PNG"),
}


@pytest.mark.parametrize("case", sorted(PNG_CASES))
def test_damaged_or_hostile_embedding_pngs_are_clear_errors(tmp_path, case):
    make, words = PNG_CASES[case]
    path = tmp_path / f"{case}.png"
    path.write_bytes(make())
    with pytest.raises(EmbeddingError, match=words) as err:
        load_embedding(path)
    assert path.name in str(err.value)
    # the Grid tab's listing check reads only chunk headers and keywords: it neither raises nor inflates
    from embedtrain.fileio import png_has_embedding
    assert png_has_embedding(path) is (case not in ("no_chunk", "jpeg_named_png"))


def test_an_oversized_real_text_chunk_is_refused(tmp_path):
    body = b"sd-ti-embedding\0" + b"A" * (9 << 20)  # 9 MB, over the 8 MB limit
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(png_chunk(b"tEXt", body)))
    with pytest.raises(EmbeddingError, match="over the 8 MB limit"):
        load_embedding(path)


# ---------------------------------------------------------------- bounded time and memory
def deflate_bomb(path: Path, megabytes: int) -> Path:
    """A torch zip .pt whose tensor record data/0 is `megabytes` MB of zeros, deflated (~1 kB per MB)."""
    import io
    import zipfile
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(1, DIM)}}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for name in ("archive/data.pkl", "archive/version"):
            dst.writestr(name, src.read(name))
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(info, "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(megabytes):
                fh.write(block)
    return path


BOUNDED_SCRIPT = textwrap.dedent("""
    import json, resource, struct, sys, time, zlib
    from pathlib import Path
    import torch
    from embedtrain.embedding import EmbeddingError, load_embedding
    folder = Path(sys.argv[1])
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_embedding(folder / "warm.safetensors"); load_embedding(folder / "warm.pt")  # first-use imports
    base, out = rss_mb(), {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("warm"):
            continue
        t0 = time.perf_counter()
        try:
            load_embedding(path)
            outcome = "loaded"
        except EmbeddingError as e:
            outcome = "refused"
        out[path.name] = [outcome, round(time.perf_counter() - t0, 3), round(rss_mb() - base, 1)]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_hostile_files_cost_bounded_time_and_memory(tmp_path):
    """Each file below makes a naive loader allocate gigabytes or spin; in a fresh process (so the
    peak RSS is honest) every one is refused in well under a second with < 64 MB of extra memory."""
    folder = tmp_path / "files"
    folder.mkdir()
    save_embedding(folder / "warm.safetensors", torch.ones(1, DIM), "warm")
    save_embedding(folder / "warm.pt", torch.ones(1, DIM), "warm", fmt="a1111")
    n = 75 * 3_000_000 * 4
    raw = json.dumps({"emb_params": {"dtype": "F32", "shape": [75, 3_000_000], "data_offsets": [0, n]}}).encode()
    with open(folder / "sparse.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + n)
    st_file(folder / "shape.safetensors",
            {"emb_params": {"dtype": "F32", "shape": [2 ** 31, 2 ** 31], "data_offsets": [0, 8]}}, f32(2))
    st_file(folder / "header.safetensors", {}, b"", 10 ** 12)
    (folder / "deep.safetensors").write_bytes(struct.pack("<Q", 3_000_000) + b"[" * 3_000_000)
    (folder / "bomb.png").write_bytes(png_bytes(png_chunk(b"zTXt", b"sd-ti-embedding\0\0" + zlib_bomb(1 << 30))))
    (folder / "chunk.png").write_bytes(png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0AAAA", length=0x7FFFFFF0)))
    (folder / "deep.png").write_bytes(png_bytes(png_chunk(b"tEXt", b"sd-ti-embedding\0" + base64.b64encode(
        b"[" * 4_000_000))))
    HOSTILE["torch_zip.ckpt"](tmp_path / "PWNED", folder / "evil.ckpt")
    deflate_bomb(folder / "bomb.pt", 1024)   # 1 GB of zeros in a 1 MB zip .pt: torch would inflate it first
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BOUNDED_SCRIPT, str(folder)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 9, results
    for name, (outcome, seconds, extra_mb) in results.items():
        assert outcome == "refused", (name, results)
        assert seconds < 1.0, (name, results)
        assert extra_mb < 64, (name, results)
    assert not (tmp_path / "PWNED").exists()
