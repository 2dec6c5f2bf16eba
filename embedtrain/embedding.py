"""Textual-inversion embeddings: new tokens in a frozen text encoder, and their files.

How new tokens work here: the text encoder's token-embedding table is wrapped, not resized.
`ExtraTokenEmbedding` looks ordinary ids up in the original (frozen, untouched) table and ids past
its end in small per-embedding tensors. So only the new vectors are parameters (the optimizer never
sees the 49408-row table, which keeps D-Adaptation/Prodigy estimates sane, docs/guide.md#lr-free-optimizers), the
other rows stay bit-identical by construction, and nothing is copied back after each step.

In prompts the user writes the embedding's name; `TokenSet.expand` replaces it with internal tokens
(`<emb0v0> <emb0v1> ...`, one per vector). CLIP lowercases text, so names that differ only by case
(gaST / gast) still get distinct internal tokens.

Files: safetensors `{"emb_params": [N, dim]}` + metadata (default);
A1111 `.pt`; diffusers-format `diffusers/NAME.safetensors` `{token: [N, dim]}` (older runs wrote
`NAME.learned_embeds.safetensors`); SDXL `{clip_l, clip_g}` and A1111 embedding PNGs (the
'sd-ti-embedding' text chunk) read.
Names follow the other clients: A1111, ComfyUI and kohya call an embedding by its file's stem, so every
file we write has the name as its stem, and a renamed file is read under its new name (see load_embedding).
Loading never unpickles anything but tensors (`torch.load(weights_only=True)`, refused on torch < 2.6),
checks sizes and headers before reading data (a torch zip's central directory before any record), and
bounds decompression; writes are atomic.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedtrain import EmbedtrainError
from embedtrain.fileio import (EMBEDDING_SUFFIXES, MAX_EMBEDDING_FILE, PNG_EMBEDDING_KEY, PNG_SIGNATURE,
                               atomic_path)

MAX_HEADER = 4 * 1024 * 1024       # a safetensors header larger than this is refused unread
MAX_FILE = MAX_EMBEDDING_FILE       # an embedding is kilobytes (75 x 2048 fp32 = 600 kB); refuse larger files unread
MAX_PNG_TEXT = 8 * 1024 * 1024      # the A1111 'sd-ti-embedding' PNG text, after decompression
MAX_VECTORS = 75                    # CLIP's 77-token context minus BOS/EOS
MAX_DIM = 4096                      # widest token vector accepted (SD 1.x 768, SD 2.x 1024, SDXL 1280)
MAX_ZIP_ENTRIES = 256              # torch.save writes 7 entries + one per storage; A1111's files hold 3-4
MAX_ZIP_DIRECTORY = 1024 * 1024    # bytes of zip central directory (an embedding's is a few hundred)
ZIP_METHODS = {0: "stored", 8: "deflated"}  # torch writes stored records; deflate is read by torch's zip reader
MAX_DEFLATED = 8 * 1024 * 1024     # deflated records (torch never writes them) inflate to at most this, in all
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
SAFE_TORCH = (2, 6)                 # torch < 2.6: weights_only=True can be bypassed (CVE-2025-32434)


class EmbeddingError(EmbedtrainError):
    """An embedding name or file cannot be used; the message names it and says why."""


# ---------------------------------------------------------------- the token table wrapper
class ExtraTokenEmbedding(nn.Module):
    """Drop-in for a text encoder's `token_embedding`: base rows frozen, extra rows per embedding."""

    def __init__(self, base: nn.Embedding, first_id: int):
        super().__init__()
        if first_id > base.num_embeddings:
            raise EmbeddingError(f"the tokenizer knows {first_id} tokens but the text encoder has only "
                                 f"{base.num_embeddings} rows: tokenizer and text encoder do not match")
        self.base = base
        self.first_id = first_id
        self.extras = nn.ParameterList()
        self.columns: list = []     # per extra: None (its own rows) or the (a, b) columns of a shared parameter
        self.names: list[str] = []  # user-facing names of the extras, in order (duplicates are refused)

    @property
    def weight(self):  # some library code reads token_embedding.weight for dtype/device
        return self.base.weight

    @property
    def num_extra(self) -> int:
        return sum(p.shape[0] for p in self.extras)

    def add(self, vectors: torch.Tensor, trainable: bool, columns: tuple[int, int] | None = None) -> nn.Parameter:
        """Append an embedding's rows: a new parameter made from `vectors`, or, with `columns`, `vectors`
        itself (a parameter shared with another encoder, of which this table uses columns [a, b))."""
        if columns is None:
            p = nn.Parameter(vectors.detach().to(self.base.weight.device, torch.float32).clone(),
                             requires_grad=trainable)
        else:
            p = vectors
        self.extras.append(p)
        self.columns.append(columns)
        return p

    def _table_of(self, k: int) -> torch.Tensor:
        """The rows extra `k` gives this encoder (a shared parameter's columns, or its own tensor)."""
        p, c = self.extras[k], self.columns[k]
        return p if c is None else p[:, c[0]:c[1]]

    def _table(self) -> torch.Tensor:
        return torch.cat([p if c is None else p[:, c[0]:c[1]] for p, c in zip(self.extras, self.columns)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.first_id - 1) if len(self.extras) else ids)
        if not len(self.extras):
            return out
        is_extra = ids >= self.first_id
        table = self._table().to(out.dtype)
        extra = table[(ids - self.first_id).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where(is_extra.unsqueeze(-1), extra, out)


def text_transformer(text_encoder):
    # transformers 5 nests the CLIP text transformer differently across classes.
    return text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder


def install(tokenizer, text_encoder) -> ExtraTokenEmbedding:
    """Wrap the text encoder's token table once; later calls return the same wrapper."""
    emb = text_transformer(text_encoder).embeddings
    if isinstance(emb.token_embedding, ExtraTokenEmbedding):
        return emb.token_embedding
    wrapper = ExtraTokenEmbedding(emb.token_embedding, first_id=len(tokenizer))
    emb.token_embedding = wrapper
    return wrapper


@dataclass
class TokenSet:
    """One embedding inside a pipeline: its user-facing name, internal tokens and vectors."""
    name: str
    tokens: list[str]
    vectors: nn.Parameter          # what is trained (SDXL: both halves joined, textside.py says how)
    parts: Any = None              # SDXL: () -> {clip_l, clip_g}; None: `vectors` is the whole embedding

    def saved(self):
        """What a file of this embedding holds: its vectors [N, dim], or SDXL's {clip_l, clip_g}."""
        return self.parts() if self.parts is not None else self.vectors

    def expand(self, prompt: str) -> str:
        """Replace the name (a whole word, any case) with the internal tokens."""
        pattern = r"(?<![\w-])" + re.escape(self.name) + r"(?![\w-])"
        return re.sub(pattern, " ".join(self.tokens), prompt, flags=re.IGNORECASE)


def check_name(name: str, tokenizer=None) -> str:
    """Validate an embedding name; it is also used for file names, so it must be safe as one.

    The file-name rules are `config.check_safe_name` (shared with TrainConfig.validate); with a
    tokenizer, a word the model already knows is refused too."""
    from embedtrain.config import ConfigError, check_safe_name
    try:
        name = check_safe_name(name, "name")
    except ConfigError as e:
        raise EmbeddingError(str(e)) from None
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        low = name.lower()
        if low in vocab or low + "</w>" in vocab:
            raise EmbeddingError(f"name {name!r} is already a word of the model's vocabulary, so prompts "
                                 f"could not tell them apart; pick a new word, e.g. {name}-emb or my{name}")
    return name


def _init_ids(tokenizer, init_text: str, vectors: int) -> list[int]:
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not ids:
        raise EmbeddingError(f"init_text {init_text!r} gives no tokens; type one or more words, e.g. 'person'")
    return [ids[i % len(ids)] for i in range(vectors)]  # repeated or truncated to `vectors` (A1111)


def add_embedding(tokenizer, text_encoder, name: str, vectors: torch.Tensor | None = None, *,
                  init_text: str = "*", num_vectors: int = 1, trainable: bool = False,
                  check_vocab: bool = True) -> TokenSet:
    """Add an embedding to a tokenizer + text encoder; returns its TokenSet.

    Either `vectors` [N, dim] (a loaded file) or `init_text` + `num_vectors` (a new embedding).
    """
    name = check_name(name, tokenizer if check_vocab else None)
    wrapper = install(tokenizer, text_encoder)
    if name in wrapper.names:
        raise EmbeddingError(f"an embedding named {name!r} is already loaded in this model; two embeddings with "
                             "one name could not be told apart in prompts: rename one of them")
    dim = wrapper.base.embedding_dim
    if vectors is None:
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise EmbeddingError(f"vectors must be between 1 and {MAX_VECTORS}, got {num_vectors}")
        with torch.no_grad():
            ids = torch.tensor(_init_ids(tokenizer, init_text, num_vectors), device=wrapper.base.weight.device)
            vectors = wrapper.base(ids).float()
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise EmbeddingError(f"embedding {name!r} has vectors of shape {tuple(vectors.shape)}, but this model "
                             f"needs [N, {dim}]: it was made for another model family")
    k = len(wrapper.extras)
    tokens = [f"<emb{k}v{i}>" for i in range(vectors.shape[0])]
    if len(tokenizer) != wrapper.first_id + wrapper.num_extra:
        raise EmbeddingError("the tokenizer gained tokens that the text encoder does not know; "
                             "load embeddings only through embedtrain.embedding")
    tokenizer.add_tokens(tokens)
    param = wrapper.add(vectors, trainable)
    wrapper.names.append(name)
    return TokenSet(name=name, tokens=tokens, vectors=param)


# ---------------------------------------------------------------- files
@dataclass
class LoadedEmbedding:
    name: str                              # what prompts call it (load_embedding says how it is chosen)
    vectors: torch.Tensor                  # [N, dim] for the (first) CLIP text encoder
    format: str
    meta: dict = field(default_factory=dict)
    vectors_g: torch.Tensor | None = None  # SDXL's second text encoder, when present
    saved_name: str = ""                   # the name stored inside, when the file was renamed since


def _as_matrix(t, where: str, path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise EmbeddingError(f"{path}: {where} is not a floating-point tensor")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or not 1 <= t.shape[0] <= MAX_VECTORS or not 1 <= t.shape[1] <= MAX_DIM:
        raise EmbeddingError(f"{path}: {where} has shape {tuple(t.shape)}; expected [vectors <= {MAX_VECTORS}, "
                             f"dim <= {MAX_DIM}]")
    t = t.float()
    if not torch.isfinite(t).all():
        raise EmbeddingError(f"{path}: {where} holds NaN or infinite values")
    return t


def _check_size(path: Path) -> int:
    size = path.stat().st_size
    if size > MAX_FILE:
        raise EmbeddingError(f"{path}: {size / 2**20:.0f} MB is far too big for an embedding (at most "
                             f"{MAX_FILE // 2**20} MB; embeddings are kilobytes). Is it a model checkpoint or a LoRA?")
    return size


def _check_header_length(path: Path, size: int) -> None:
    """The 8-byte header length, bounded before anything else is read: a header past MAX_HEADER or past the
    end of the file is refused unread (the safetensors library would otherwise allocate and parse it)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise EmbeddingError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or n + 8 > size:
        raise EmbeddingError(f"{path}: safetensors header claims {n} bytes in a {size}-byte file; "
                             "the file is truncated or not a safetensors file")


def _check_entries(path: Path, entries: dict) -> None:
    """What makes a tensor file an embedding, checked from the header before any tensor data is read:
    1 to 16 tensors, each floating point with at most 2 dimensions of embedding size. (That the JSON is
    valid and the offsets fit each shape, dtype and the file is the safetensors library's check.)"""
    if not entries or len(entries) > 16:
        raise EmbeddingError(f"{path}: holds {len(entries)} tensors; an embedding file holds 1 to 16")
    for key, (dtype, shape) in entries.items():
        bad = f"{path}: tensor {key!r} in the safetensors header"
        if dtype not in FLOAT_DTYPES:
            raise EmbeddingError(f"{bad} has dtype {dtype!r}; embeddings are floating point "
                                 f"({', '.join(FLOAT_DTYPES)})")
        if len(shape) > 2 or (len(shape) == 2 and not (1 <= shape[0] <= MAX_VECTORS and 1 <= shape[1] <= MAX_DIM)) \
                or (len(shape) == 1 and not 1 <= shape[0] <= MAX_DIM):
            raise EmbeddingError(f"{bad} has shape {shape}; expected [vectors <= {MAX_VECTORS}, dim <= {MAX_DIM}]")


def _library_reason(e: Exception) -> str:
    """The safetensors library's error as a short clause ("Error while deserializing header: " is implied)."""
    text = " ".join(str(e).split()).replace("Error while deserializing header: ", "")
    return _short(text) if text else type(e).__name__


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """The tensors and metadata of a safetensors embedding. The header is parsed once, by the library's
    `safe_open` (which checks it and maps the file, reading no tensor), after its length is bounded here;
    the tensors are read only once every entry's dtype and shape is checked."""
    from safetensors import SafetensorError, safe_open

    _check_header_length(path, _check_size(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            entries = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
            _check_entries(path, entries)
            tensors = {k: f.get_tensor(k) for k in entries}
    except EmbeddingError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EmbeddingError(f"{path}: not a valid safetensors file ({_library_reason(e)}); the file is damaged, "
                             "truncated or not an embedding") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _torch_is_safe() -> bool:
    try:
        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= SAFE_TORCH


def _refusal_reason(e: Exception) -> str:
    """The useful line of torch's weights_only error (which also advises loading the file unsafely)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).replace("WeightsUnpickler error:", "")
    advice = ("weights_only", "torch.load", "file an issue", "documentation", "Weights only load failed")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not any(a in ln for a in advice)]
    return (lines[0] if lines else "content other than tensors")[:160]


def _short(e: BaseException, limit: int = 120) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_torch_zip(path, size: int | None = None, limit: int = MAX_FILE) -> None:
    """Refuse a torch zip file (`torch.save`'s format) whose records would unpack past `limit` bytes,
    from its central directory alone: entry count, each entry's compression method and uncompressed
    size, their total, and that every record lies inside the file. torch's own reader inflates a
    deflated record into memory before anything checks its size, so a 1 MB file can cost gigabytes
    (a deflate bomb); this reads at most the directory (<= MAX_ZIP_DIRECTORY bytes) and the file's tail.
    Non-zip files are left to the caller. Raises EmbeddingError naming the file."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return
        tail_len = min(size, 22 + 0xFFFF)
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise EmbeddingError(f"{path}: not a readable torch file (a zip without its end record: truncated or damaged)")
        eocd = size - tail_len + at
        _, disk, cd_disk, _, count, cd_size, cd_offset, _ = struct.unpack("<4sHHHHIIH", tail[at:at + 22])
        if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:  # zip64: the real values
            loc = tail[at - 20:at] if at >= 20 else b""
            if len(loc) < 20 or loc[:4] != b"PK\x06\x07":
                raise EmbeddingError(f"{path}: not a readable torch file (a zip64 end record without its locator: damaged)")
            (rec_at,) = struct.unpack("<Q", loc[8:16])
            if rec_at > size - 56:
                raise EmbeddingError(f"{path}: not a readable torch file (its zip64 end record lies outside the file: damaged)")
            fh.seek(rec_at)
            rec = fh.read(56)
            if rec[:4] != b"PK\x06\x06":
                raise EmbeddingError(f"{path}: not a readable torch file (its zip64 end record is missing: damaged)")
            count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
        if disk or cd_disk:
            raise EmbeddingError(f"{path}: not a readable torch file (a multi-part zip archive; an embedding is one file)")
        if count > MAX_ZIP_ENTRIES:
            raise EmbeddingError(f"{path}: the zip inside holds {count} entries (an embedding's holds under "
                                 f"{MAX_ZIP_ENTRIES}); refused unread")
        if cd_size > MAX_ZIP_DIRECTORY or cd_offset + cd_size > eocd:
            raise EmbeddingError(f"{path}: the zip directory claims {cd_size} bytes at offset {cd_offset} in a "
                                 f"{size}-byte file; refused unread (damaged, or not an embedding)")
        fh.seek(cd_offset)
        cd = fh.read(cd_size)
    total = inflated = pos = 0
    for _ in range(count):
        if len(cd) - pos < 46 or cd[pos:pos + 4] != b"PK\x01\x02":
            raise EmbeddingError(f"{path}: not a readable torch file (its zip directory is damaged: an entry is cut short)")
        method, = struct.unpack("<H", cd[pos + 10:pos + 12])
        comp, plain, n_name, n_extra, n_comment = struct.unpack("<IIHHH", cd[pos + 20:pos + 34])
        (offset,) = struct.unpack("<I", cd[pos + 42:pos + 46])
        name = cd[pos + 46:pos + 46 + n_name].decode("utf-8", "replace")
        extra = cd[pos + 46 + n_name:pos + 46 + n_name + n_extra]
        pos += 46 + n_name + n_extra + n_comment
        if 0xFFFFFFFF in (comp, plain, offset):  # zip64 entry: the saturated fields follow in extra 0x0001
            plain, comp, offset = _zip64_sizes(extra, plain, comp, offset, path, name)
        if method not in ZIP_METHODS:
            raise EmbeddingError(f"{path}: zip entry {name!r} uses compression method {method}; torch files hold "
                                 "stored (uncompressed) records: refused unread")
        if method == 0 and comp != plain:
            raise EmbeddingError(f"{path}: not a readable torch file (zip entry {name!r} is stored but claims {comp} "
                                 f"bytes packed and {plain} unpacked: damaged)")
        if offset + comp > cd_offset:
            raise EmbeddingError(f"{path}: not a readable torch file (zip entry {name!r} lies outside the file's data: damaged or truncated)")
        total += plain
        inflated += plain if method else 0
        if plain > limit or total > limit or inflated > MAX_DEFLATED:
            cap = MAX_DEFLATED if inflated > MAX_DEFLATED else limit
            packed = f", deflated from {comp / 2**20:.1f} MB" if method else ""
            raise EmbeddingError(f"{path}: zip entry {name!r} unpacks to {plain / 2**20:.1f} MB{packed}; an "
                                 f"embedding's {'deflated ' if cap == MAX_DEFLATED else ''}records total at most "
                                 f"{cap // 2**20} MB (embeddings are kilobytes): refused unread (a zip bomb, or "
                                 "not an embedding)")


def _zip64_sizes(extra: bytes, plain: int, comp: int, offset: int, path, name) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack("<HH", extra[pos:pos + 4])
        body = extra[pos + 4:pos + 4 + n]
        pos += 4 + n
        if tag != 1:
            continue
        values = [struct.unpack("<Q", body[i:i + 8])[0] for i in range(0, len(body) - 7, 8)]
        out = []
        for v in (plain, comp, offset):
            if v == 0xFFFFFFFF:
                if not values:
                    break
                v = values.pop(0)
            out.append(v)
        if len(out) == 3:
            return out[0], out[1], out[2]
        break
    raise EmbeddingError(f"{path}: not a readable torch file (zip entry {name!r} lacks its zip64 sizes: damaged)")


def _read_pickle(path: Path) -> dict:
    import pickle
    import warnings
    check_torch_zip(path, _check_size(path))
    if not _torch_is_safe():
        raise EmbeddingError(f"{path}: refused: torch {torch.__version__} can run code hidden in .pt/.bin files "
                             "even when only tensors are asked for (CVE-2025-32434); upgrade to torch >= "
                             f"{SAFE_TORCH[0]}.{SAFE_TORCH[1]} or use a .safetensors embedding")
    try:
        # nn.ParameterDict: the original textual-inversion code (and early A1111) pickled one; rebuilding it
        # sets attributes only, from tensors and plain data.
        with warnings.catch_warnings(), torch.serialization.safe_globals([nn.ParameterDict]):
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EmbeddingError(f"{path}: refused: the file holds Python objects other than tensors and plain "
                             f"data, which could run code when loaded ({_refusal_reason(e)}). "
                             "Only tensor files are loaded; ask for a .safetensors version.") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, KeyError, IndexError,
            RecursionError, struct.error) as e:
        raise EmbeddingError(f"{path}: not a readable torch file ({_refusal_reason(e)})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def _inflate(data: bytes, path: Path) -> bytes:
    """zlib with a ceiling: a small chunk that would inflate past MAX_PNG_TEXT is refused (zlib bomb)."""
    import zlib
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_PNG_TEXT + 1)
    except zlib.error as e:
        raise EmbeddingError(f"{path}: the compressed embedding text is damaged ({e})") from None
    if len(out) > MAX_PNG_TEXT or d.unconsumed_tail:
        raise EmbeddingError(f"{path}: the compressed embedding text inflates past {MAX_PNG_TEXT // 2**20} MB; "
                             "refused (an embedding is kilobytes: this is a zlib bomb or not an embedding)")
    return out


def _png_embedding_text(path: Path) -> bytes:
    """The A1111 'sd-ti-embedding' text chunk (tEXt, zTXt or iTXt), read chunk by chunk without decoding
    pixels; every length is checked before it is read."""
    import zlib
    with open(path, "rb") as fh:
        if fh.read(8) != PNG_SIGNATURE:
            raise EmbeddingError(f"{path}: not a PNG file")
        while True:
            head = fh.read(8)
            if len(head) < 8:
                break
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"IEND":
                break
            if ctype not in (b"tEXt", b"zTXt", b"iTXt"):
                fh.seek(length + 4, 1)
                continue
            if length > MAX_PNG_TEXT:
                raise EmbeddingError(f"{path}: a PNG text chunk claims {length} bytes, over the "
                                     f"{MAX_PNG_TEXT // 2**20} MB limit for an embedding; refused")
            body = fh.read(length)
            crc = fh.read(4)
            if len(body) < length or len(crc) < 4:
                raise EmbeddingError(f"{path}: the PNG is truncated inside a text chunk")
            if struct.unpack(">I", crc)[0] != zlib.crc32(ctype + body):
                raise EmbeddingError(f"{path}: a PNG text chunk fails its CRC check: the file is damaged")
            key, _, rest = body.partition(b"\0")
            if key != PNG_EMBEDDING_KEY:
                continue
            if ctype == b"tEXt":
                return rest
            if ctype == b"zTXt":   # compression method byte, then zlib data
                return _inflate(rest[1:], path)
            # iTXt: compression flag, method, language\0, translated keyword\0, text
            flag = rest[:1]
            parts = rest[2:].split(b"\0", 2)
            if len(parts) < 3:
                raise EmbeddingError(f"{path}: the iTXt chunk {PNG_EMBEDDING_KEY.decode()!r} is malformed")
            return _inflate(parts[2], path) if flag == b"\x01" else parts[2]
    raise EmbeddingError(f"{path}: this PNG holds no embedding (no {PNG_EMBEDDING_KEY.decode()!r} text chunk, as "
                         "AUTOMATIC1111 writes). Embeddings hidden only in the pixels are not read; use the .pt or "
                         ".safetensors")


def _read_png(path: Path) -> dict:
    """A1111's embedding-in-a-PNG: base64 of JSON, tensors as {"TORCHTENSOR": nested lists}."""
    import base64
    import binascii
    _check_size(path)
    text = _png_embedding_text(path)

    def tensors(obj):
        if set(obj) == {"TORCHTENSOR"}:
            try:
                return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise EmbeddingError(f"{path}: a TORCHTENSOR in the PNG is not a rectangular list of numbers") from None
        return obj
    try:
        data = json.loads(base64.b64decode(text.strip(), validate=True), object_hook=tensors)
    except (binascii.Error, ValueError, RecursionError) as e:
        if isinstance(e, EmbeddingError):
            raise
        raise EmbeddingError(f"{path}: the {PNG_EMBEDDING_KEY.decode()!r} text is not base64 of JSON: the data is "
                             "missing or damaged") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: the PNG's embedding data is not a JSON object")
    return data


def _from_a1111_dict(data: dict, path: Path, stem: str, fmt: str) -> LoadedEmbedding:
    """.pt/.bin/.ckpt contents and the A1111 PNG payload share their layouts."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        try:
            if isinstance(params, nn.ParameterDict):
                params = dict(params.items())
        except (AttributeError, TypeError, KeyError, RuntimeError):
            raise EmbeddingError(f"{path}: 'string_to_param' is a damaged ParameterDict") from None
        if not isinstance(params, dict) or not params:
            raise EmbeddingError(f"{path}: 'string_to_param' is empty or not a dict of tensors")
        t = params.get("*", next(iter(params.values())))
        meta = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
                if data.get(k) is not None}
        return LoadedEmbedding(str(data.get("name") or stem), _as_matrix(t, "string_to_param['*']", path),
                               fmt, meta)
    if "emb_params" in data:
        return LoadedEmbedding(stem, _as_matrix(data["emb_params"], "emb_params", path), fmt)
    if "clip_l" in data and "clip_g" in data:   # SDXL, as A1111 keeps it in a card or .pt
        return LoadedEmbedding(str(data.get("name") or stem), _as_matrix(data["clip_l"], "clip_l", path), fmt, {},
                               _as_matrix(data["clip_g"], "clip_g", path))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        (token, t), = tensors.items()
        return LoadedEmbedding(str(token).strip("<>") or stem, _as_matrix(t, repr(token), path), "diffusers")
    raise EmbeddingError(f"{path}: unknown layout with keys {sorted(map(str, data))[:8]}; expected "
                         "'string_to_param' (A1111), 'emb_params' or a single token")


def load_embedding(path) -> LoadedEmbedding:
    """Read any supported embedding file; the format is recognised by its keys.

    Hostile or damaged files raise EmbeddingError naming the file: pickles are loaded with
    weights_only=True (nothing but tensors and plain data) after their zip directory is checked
    (check_torch_zip: no deflate bombs), safetensors headers are checked before any data is read, PNG
    chunks and their decompression are bounded, and files over MAX_FILE are refused unread. Whatever
    else a crafted file trips on is an EmbeddingError naming the file too, never a traceback.

    The name is the one AUTOMATIC1111, ComfyUI and kohya give it: the file's stem (a renamed
    `mystar.pt` saved as `purplestar` is `mystar`, with `saved_name` 'purplestar'), except for A1111
    embedding PNGs (the card's inner name, as A1111 reads them: cards are saved under any name) and
    diffusers' generic `learned_embeds.bin/.safetensors` (the token inside, as diffusers reads it).
    A name must be safe (it may end up in file names and prompts): an unsafe stem gives way to a safe
    inner name, an unsafe inner name to the stem."""
    path = Path(path)
    if path.is_dir():
        raise EmbeddingError(f"embedding {path} is a folder; give the embedding file inside it")
    if not path.is_file():
        raise EmbeddingError(f"embedding file {path} does not exist")
    stem = path.stem.removesuffix(".learned_embeds")  # the diffusers-format name older runs wrote
    try:
        loaded = _load_any(path, stem)  # named as the file says inside (the stem when it does not)
    except EmbeddingError:
        raise
    except OSError as e:
        raise EmbeddingError(f"{path}: cannot read the file ({e.strerror or _short(e)})") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
            struct.error, MemoryError) as e:
        # whatever a damaged or crafted file trips on (a 5000-digit integer, deep nesting, odd types):
        # one line naming the file, never a traceback
        raise EmbeddingError(f"{path}: not a usable embedding file ({_short(e)})") from None
    if loaded.format != "a1111-png" and not (loaded.format == "diffusers" and stem == "learned_embeds"):
        loaded.name, loaded.saved_name = stem, loaded.name
    loaded.name = _safe_name(loaded.name) or _safe_name(loaded.saved_name) or stem
    saved = _safe_name(loaded.saved_name)
    # a snapshot NAME-<update> is a version of NAME, not a rename
    renamed = saved and saved != loaded.name and not re.fullmatch(re.escape(saved) + r"-\d+", loaded.name)
    loaded.saved_name = saved if renamed else ""
    return loaded


def _safe_name(name: str) -> str:
    from embedtrain.config import ConfigError, check_safe_name
    try:
        return check_safe_name(name) if name else ""
    except ConfigError:
        return ""


def _load_any(path: Path, stem: str) -> LoadedEmbedding:
    if path.suffix.lower() == ".safetensors":
        tensors, meta = _read_safetensors(path)
        name = meta.get("name", stem)
        if "emb_params" in tensors:
            return LoadedEmbedding(name, _as_matrix(tensors["emb_params"], "emb_params", path), "safetensors", meta)
        if "clip_l" in tensors:
            vg = _as_matrix(tensors["clip_g"], "clip_g", path) if "clip_g" in tensors else None
            return LoadedEmbedding(name, _as_matrix(tensors["clip_l"], "clip_l", path), "sdxl", meta, vg)
        if len(tensors) == 1:
            (token, t), = tensors.items()
            return LoadedEmbedding(meta.get("name", token.strip("<>") or stem),
                                   _as_matrix(t, repr(token), path), "diffusers", meta)
        raise EmbeddingError(f"{path}: unknown layout with keys {sorted(tensors)[:8]}; expected 'emb_params', "
                             "'clip_l'/'clip_g' or a single token")
    if path.suffix.lower() in (".pt", ".bin", ".ckpt"):
        return _from_a1111_dict(_read_pickle(path), path, stem, "a1111")
    if path.suffix.lower() == ".png":
        return _from_a1111_dict(_read_png(path), path, stem, "a1111-png")
    raise EmbeddingError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(EMBEDDING_SUFFIXES[:-1])} "
                         "or an A1111 embedding .png")


def save_embedding(path, vectors: torch.Tensor, name: str, meta: dict | None = None,
                   fmt: str = "safetensors", card=None) -> Path:
    """Write one embedding atomically in `fmt` (safetensors | a1111 | diffusers | png) to `path`
    (`embedding_file` gives the path other clients read under `name`). png: `card` is the picture (a path or
    PIL image; default a plain card with the name), the embedding in its 'sd-ti-embedding' text chunk.

    A failed write (disk full, read-only folder) raises EmbeddingError naming the file; the file that
    was there before, if any, is left as it was."""
    from safetensors import SafetensorError

    path = Path(path)
    parts = vectors if isinstance(vectors, dict) else {"": vectors}
    t = {k: v.detach().float().cpu().contiguous().clone() for k, v in parts.items()}
    if not all(torch.isfinite(v).all() for v in t.values()):
        raise EmbeddingError(f"refusing to write {path}: the vectors hold NaN or infinite values")
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    meta.setdefault("name", name)
    if fmt not in FORMAT_FILES:
        raise EmbeddingError(f"save format must be safetensors, a1111, diffusers or png, got {fmt!r}")
    if isinstance(vectors, dict) and fmt not in ("safetensors", "png"):
        raise EmbeddingError(f"the {fmt} format holds one text encoder's vectors; an SDXL embedding "
                             f"({' + '.join(t)}) is written as safetensors (save_files splits it for diffusers)")
    t = t if isinstance(vectors, dict) else t[""]
    try:
        _write(path, t, name, meta, fmt, card)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise EmbeddingError(f"could not write {path}: {_io_reason(e)}; an earlier file of that name, if any, "
                             "is unchanged") from None
    return path


def _io_reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _write(path: Path, t, name: str, meta: dict, fmt: str, card=None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        if fmt == "png":
            return write_card(tmp, t, name, meta, card)
        if fmt == "safetensors":
            save_file(t if isinstance(t, dict) else {"emb_params": t}, str(tmp), metadata=meta)
        elif fmt == "diffusers":
            save_file({name: t}, str(tmp), metadata=meta)
        elif fmt == "a1111":
            tmp.write_bytes(a1111_zip(torch_bytes(_a1111_data(t, name, meta))))


def _a1111_data(t, name: str, meta: dict) -> dict:
    """What A1111 stores for an embedding (.pt and embedding cards): SD's one vector set under '*', or
    SDXL's clip_l / clip_g."""
    vectors = dict(t) if isinstance(t, dict) else {
        "string_to_token": {"*": 265},  # the id of '*' in SD 1.x's CLIP vocabulary, as A1111 writes it
        "string_to_param": {"*": t}}
    return {**vectors, "name": name, "step": int(meta.get("updates", meta.get("step", 0)) or 0),
            "sd_checkpoint": meta.get("base_model_hash"), "sd_checkpoint_name": meta.get("base_model")}


def write_card(path: Path, t, name: str, meta: dict, card=None) -> None:
    """An A1111 embedding card: a PNG whose 'sd-ti-embedding' text chunk holds base64 JSON of the embedding
    (tensors as {"TORCHTENSOR": nested lists}), which A1111 reads from its embeddings folder (and we read
    back). The picture is `card` (the run's last preview) or a plain card with the name."""
    import base64

    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    def plain(obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.tolist()}
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return obj
    if card is None:
        image = Image.new("RGB", (256, 256), (40, 40, 48))
        ImageDraw.Draw(image).text((12, 116), name, fill=(235, 235, 235))
    else:
        image = card.convert("RGB") if isinstance(card, Image.Image) else Image.open(card).convert("RGB")
    info = PngInfo()
    info.add_text(PNG_EMBEDDING_KEY.decode(), base64.b64encode(json.dumps(plain(_a1111_data(t, name, meta))).encode())
                  .decode(), zip=True)
    image.save(path, format="PNG", pnginfo=info)


def torch_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# The entries AUTOMATIC1111's safe loader (modules/safe.py, on by default) accepts in a zip .pt; any other
# entry makes it refuse the file as possibly malicious.
A1111_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
ZIP_ALIGN = 64  # torch aligns each entry's data to 64 bytes (torch.load(mmap=True) maps storages in place)


def a1111_zip(raw: bytes) -> bytes:
    """torch.save's zip with only the entries A1111 accepts: data.pkl, version and data/N.

    torch >= 2.1 also writes byteorder, .data/serialization_id (and 2.13 .format_version and
    .storage_alignment); torch.load does without them (it assumes little-endian, as every torch before
    2.1 wrote), so dropping them loses nothing. Entries stay uncompressed and 64-byte aligned, as torch
    writes them."""
    import io
    import zipfile
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if not A1111_ZIP_ENTRY.match(info.filename):
                continue
            entry = zipfile.ZipInfo("archive/" + info.filename.split("/", 1)[1], date_time=(1980, 1, 1, 0, 0, 0))
            # pad the local header's extra field so the data starts on a ZIP_ALIGN boundary
            start = out.tell() + 30 + len(entry.filename.encode()) + 4  # 30: the fixed header, 4: the field's id+size
            pad = -start % ZIP_ALIGN
            entry.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 0x4246 'FB': torch's padding field id
            dst.writestr(entry, src.read(info))
    return out.getvalue()


# Where each format's file goes in a folder. Every stem is the name, because A1111, ComfyUI and kohya
# call an embedding by its file's stem; NAME.safetensors is the default format's, so the
# diffusers-format file goes into a subfolder.
FORMAT_FILES = {"safetensors": "{name}.safetensors", "a1111": "{name}.pt", "diffusers": "diffusers/{name}.safetensors",
                "png": "{name}.png"}


def save_files(folder, name: str, vectors, meta: dict, fmt: str, card=None) -> list[Path]:
    """Write a run folder's file(s) of one format; returns their paths.

    `vectors` [N, dim], or SDXL's {clip_l, clip_g}. For SDXL, safetensors is the one file every client reads
    (clip_l + clip_g); diffusers gets one single-token file per text encoder, `diffusers/clip_l/NAME.safetensors`
    and `diffusers/clip_g/NAME.safetensors`, each a path `load_textual_inversion` takes with that encoder;
    A1111's .pt holds one encoder's vectors, so it is refused for SDXL."""
    if isinstance(vectors, dict) and fmt == "a1111":
        raise EmbeddingError("save format a1111 (.pt) holds the vectors of one text encoder; for an SDXL embedding "
                             "the default safetensors file (clip_l + clip_g) is the one AUTOMATIC1111 reads")
    if isinstance(vectors, dict) and fmt == "diffusers":
        return [save_embedding(Path(folder) / "diffusers" / key / f"{name}.safetensors", v, name, meta, fmt)
                for key, v in vectors.items()]
    return [save_embedding(embedding_file(folder, name, fmt), vectors, name, meta, fmt, card)]


def embedding_file(folder, name: str, fmt: str) -> Path:
    """The path of `name`'s file in `fmt` inside `folder` (a run folder)."""
    if fmt not in FORMAT_FILES:
        raise EmbeddingError(f"save format must be one of {', '.join(FORMAT_FILES)}, got {fmt!r}")
    return Path(folder) / FORMAT_FILES[fmt].format(name=name)

