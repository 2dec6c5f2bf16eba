"""What other clients make of our files: AUTOMATIC1111's safe loader accepts the .pt, every file we
write is named after the embedding (A1111, ComfyUI and kohya call an embedding by its file's stem),
a renamed file is read under its new name, and files are readable by other users (the mode a plain
open() gives, not mkstemp's 0600)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickletools
import re
import shutil
import stat
import struct
import zipfile
from contextlib import contextmanager

import pytest
import torch

from embedtrain.embedding import EmbeddingError, embedding_file, load_embedding, save_embedding

DIM = 32
# AUTOMATIC1111 modules/safe.py (its default, --disable-safe-unpickle off): every entry of a zip .pt must
# match this, else "The file may be malicious"; and data.pkl may name only these globals.
A1111_ALLOWED_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_ALLOWED_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}


@pytest.fixture
def vec():
    return torch.randn(3, DIM, generator=torch.Generator().manual_seed(4))


def pickle_globals(raw: bytes) -> set[str]:
    """The globals a pickle names (GLOBAL opcodes; STACK_GLOBAL takes the two strings pushed before it)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(raw):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]} {strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


# ---------------------------------------------------------------- A1111's safe loader
def test_plain_torch_save_is_what_a1111_refuses(tmp_path, vec):
    """The premise: this torch's own zip has entries A1111's check refuses (so the test below means something)."""
    torch.save({"string_to_param": {"*": vec}}, tmp_path / "plain.pt")
    names = zipfile.ZipFile(tmp_path / "plain.pt").namelist()
    if all(A1111_ALLOWED_ENTRY.match(n) for n in names):
        pytest.skip(f"torch {torch.__version__} writes only entries A1111 accepts")
    assert any(not A1111_ALLOWED_ENTRY.match(n) for n in names)


def test_a1111_pt_passes_a1111s_safe_loader_and_loads_everywhere(tmp_path, vec):
    path = save_embedding(tmp_path / "zorb.pt", vec, "zorb", {"updates": 9, "base_model": "v1-5"}, "a1111")
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        bad = [n for n in names if not A1111_ALLOWED_ENTRY.match(n)]
        assert not bad, f"A1111 would refuse the file for {bad}"
        pkl = [n for n in names if n.endswith("/data.pkl")]
        assert len(pkl) == 1 and any(n.endswith("/version") for n in names)
        assert pickle_globals(z.read(pkl[0])) <= A1111_ALLOWED_GLOBALS
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    raw = path.read_bytes()
    for i in infos:  # data 64-byte aligned, as torch writes it (mmap loading maps storages in place)
        name_len, extra_len = struct.unpack("<HH", raw[i.header_offset + 26:i.header_offset + 30])
        assert (i.header_offset + 30 + name_len + extra_len) % 64 == 0, i.filename

    for kwargs in ({}, {"mmap": True}):   # what ComfyUI, kohya, diffusers and A1111 itself call
        data = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
        assert torch.equal(data["string_to_param"]["*"], vec)
        assert data["name"] == "zorb" and data["step"] == 9 and data["sd_checkpoint_name"] == "v1-5"
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors, vec) and loaded.name == "zorb" and loaded.format == "a1111"


def test_a_failed_a1111_write_leaves_the_old_file(tmp_path, vec, monkeypatch):
    path = save_embedding(tmp_path / "zorb.pt", vec, "zorb", fmt="a1111")
    before = path.read_bytes()

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(EmbeddingError, match="zorb.pt"):
        save_embedding(path, 2 * vec, "zorb", fmt="a1111")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["zorb.pt"]


# ---------------------------------------------------------------- names
@pytest.mark.parametrize("fmt", ["safetensors", "a1111", "diffusers"])
def test_every_format_is_named_after_the_embedding(tmp_path, vec, fmt):
    path = save_embedding(embedding_file(tmp_path / "run", "zorb", fmt), vec, "zorb", {"updates": 2}, fmt)
    assert path.stem == "zorb", f"A1111/ComfyUI would call {path.name} {path.stem!r}"
    assert path.is_relative_to(tmp_path / "run")
    loaded = load_embedding(path)
    assert loaded.name == "zorb" and loaded.saved_name == "" and torch.equal(loaded.vectors, vec)
    # the diffusers-format file keeps its layout: one tensor under the token, as diffusers reads it
    if fmt == "diffusers":
        from safetensors.torch import load_file
        assert list(load_file(str(path))) == ["zorb"]
    # the three formats of one run sit side by side without overwriting each other
    assert len({embedding_file(tmp_path, "zorb", f) for f in ("safetensors", "a1111", "diffusers")}) == 3
    with pytest.raises(EmbeddingError, match="save format"):
        embedding_file(tmp_path, "zorb", "ckpt")


def test_the_old_diffusers_file_name_is_still_read(tmp_path, vec):
    path = save_embedding(tmp_path / "zorb.learned_embeds.safetensors", vec, "zorb", fmt="diffusers")
    assert load_embedding(path).name == "zorb"


def test_diffusers_generic_learned_embeds_files_keep_their_token(tmp_path, vec):
    from safetensors.torch import save_file
    save_file({"<cat-toy>": vec}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        loaded = load_embedding(tmp_path / name)
        assert (loaded.name, loaded.saved_name) == ("cat-toy", "")


@pytest.mark.parametrize("fmt", ["a1111", "safetensors", "diffusers"])
def test_a_renamed_file_is_called_by_its_file_name_as_in_a1111(tmp_path, vec, fmt):
    saved = save_embedding(embedding_file(tmp_path, "purplestar", fmt), vec, "purplestar", fmt=fmt)
    renamed = saved.with_name("mystar" + saved.suffix)
    shutil.copy(saved, renamed)
    loaded = load_embedding(renamed)
    assert (loaded.name, loaded.saved_name) == ("mystar", "purplestar")
    assert torch.equal(loaded.vectors, vec)
    assert load_embedding(saved).saved_name == ""
    # a snapshot NAME-<update> is a version, not a rename
    snap = save_embedding(tmp_path / f"purplestar-200{saved.suffix}", vec, "purplestar", {"updates": 200}, fmt)
    assert (load_embedding(snap).name, load_embedding(snap).saved_name) == ("purplestar-200", "")


def test_an_embedding_card_png_keeps_its_inner_name_as_in_a1111(tmp_path, vec):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    data = {"string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}}, "name": "purplestar", "step": 5}
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (8, 8)).save(tmp_path / "card (1).png", pnginfo=info)
    loaded = load_embedding(tmp_path / "card (1).png")
    assert (loaded.name, loaded.saved_name) == ("purplestar", "")


def test_an_unsafe_file_name_gives_way_to_a_safe_inner_name(tmp_path, vec):
    saved = save_embedding(tmp_path / "purplestar.pt", vec, "purplestar", fmt="a1111")
    shutil.copy(saved, tmp_path / "my star.pt")
    assert load_embedding(tmp_path / "my star.pt").name == "purplestar"


# ---------------------------------------------------------------- file modes
@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def written_files(folder, vec) -> list:
    from PIL import Image

    from embedtrain.fileio import atomic_write_text
    from embedtrain.grid import _png
    files = [save_embedding(embedding_file(folder, "zorb", fmt), vec, "zorb", fmt=fmt)
             for fmt in ("safetensors", "a1111", "diffusers")]
    files.append(save_embedding(folder / "zorb-2.safetensors", vec, "zorb", {"updates": 2}))  # a snapshot
    atomic_write_text(folder / "log.json", "{}")
    files.append(folder / "log.json")
    files.append(_png(Image.new("RGB", (8, 8)), folder / "grids" / "g.png", "a photo"))
    return files


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_a_plain_open_gives(tmp_path, vec, mask, mode):
    with umask(mask):
        files = written_files(tmp_path, vec)
        (tmp_path / "plain.txt").write_text("x")   # what open() gives, for comparison
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode
    assert {f.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == \
        {f.relative_to(tmp_path).as_posix(): oct(mode) for f in files}
    # rewriting a file that an older version left private makes it readable too
    os.chmod(files[0], 0o600)
    with umask(mask):
        save_embedding(files[0], vec, "zorb")
    assert stat.S_IMODE(files[0].stat().st_mode) == mode


@pytest.mark.skipif(os.name != "posix", reason="POSIX umask")
def test_umask_is_read_without_proc_too(monkeypatch):
    import builtins

    from embedtrain import fileio
    real_open = builtins.open

    def no_proc(file, *a, **k):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(file)
        return real_open(file, *a, **k)
    with umask(0o027):
        assert fileio.current_umask() == 0o027
        monkeypatch.setattr(builtins, "open", no_proc)
        assert fileio.current_umask() == 0o027     # the set-and-restore fallback
        monkeypatch.undo()
        assert fileio.current_umask() == 0o027     # ... left the umask as it was


# ---------------------------------------------------------------- which PNGs are embeddings
def png(text: dict | None = None, chunk: str = "tEXt", size=(8, 8)) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in (text or {}).items():
        if chunk == "zTXt":
            info.add_text(k, v, zip=True)
        elif chunk == "iTXt":
            info.add_itxt(k, v)
        else:
            info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 20, 140)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_only_pngs_with_an_embedding_chunk_count_as_embeddings(tmp_path, vec):
    from embedtrain.fileio import is_embedding_file, png_has_embedding
    card = base64.b64encode(json.dumps({"string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}},
                                        "name": "card"}).encode()).decode()
    files = {
        "card.png": png({"parameters": "a photo", "sd-ti-embedding": card}),
        "card-z.png": png({"sd-ti-embedding": card}, "zTXt"),
        "card-i.png": png({"sd-ti-embedding": card}, "iTXt"),
        "preview.png": png({"parameters": "a photo of zorb\nSteps: 20"}),
        "grid.png": png({"parameters": "x", "embedtrain": json.dumps({"cells": ["x" * 100] * 2000})}, size=(300, 300)),
        "keyword-prefix.png": png({"sd-ti-embedding-old": card}),
        "plain.png": png(),
        "cut.png": png({"sd-ti-embedding": card})[:20],
        "jpeg.png": b"\xff\xd8\xff\xe0" + b"\0" * 64,
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    found = {name for name in files if png_has_embedding(tmp_path / name)}
    assert found == {"card.png", "card-z.png", "card-i.png"}
    assert {name for name in files if is_embedding_file(tmp_path / name)} == found
    for name in found:    # and they really load
        assert load_embedding(tmp_path / name).name == "card"
    assert not png_has_embedding(tmp_path / "missing.png")
    save_embedding(tmp_path / "x.safetensors", vec, "x")
    assert is_embedding_file(tmp_path / "x.safetensors") and not is_embedding_file(tmp_path / "notes.txt")
    with open(tmp_path / "model.safetensors", "wb") as fh:   # a model checkpoint, not an embedding
        fh.truncate(65 * 2 ** 20)
    assert not is_embedding_file(tmp_path / "model.safetensors")
