"""Textual-inversion embeddings: new tokens in a frozen text encoder, and their files.

How new tokens work here: the text encoder's token-embedding table is wrapped, not resized.
`ExtraTokenEmbedding` looks ordinary ids up in the original (frozen, untouched) table and ids past
its end in small per-embedding tensors. So only the new vectors are parameters (the optimizer never
sees the 49408-row table, which keeps D-Adaptation/Prodigy estimates sane, SCIENCE.md section 5), the
other rows stay bit-identical by construction, and nothing is copied back after each step.

In prompts the user writes the embedding's name; `TokenSet.expand` replaces it with internal tokens
(`<emb0v0> <emb0v1> ...`, one per vector). CLIP lowercases text, so names that differ only by case
(gaST / gast) still get distinct internal tokens.

Files (DESIGN.md "Embedding files"): safetensors `{"emb_params": [N, dim]}` + metadata (default);
A1111 `.pt`; diffusers `learned_embeds.safetensors` `{token: [N, dim]}`; SDXL `{clip_l, clip_g}` read.
Loading never unpickles anything but tensors (`torch.load(weights_only=True)`); writes are atomic.
"""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from embedtrain import EmbedtrainError
from embedtrain.fileio import atomic_path

MAX_HEADER = 16 * 1024 * 1024      # a safetensors header larger than this is refused unread
MAX_VECTORS = 75                    # CLIP's 77-token context minus BOS/EOS
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


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

    @property
    def weight(self):  # some library code reads token_embedding.weight for dtype/device
        return self.base.weight

    @property
    def num_extra(self) -> int:
        return sum(p.shape[0] for p in self.extras)

    def add(self, vectors: torch.Tensor, trainable: bool) -> nn.Parameter:
        p = nn.Parameter(vectors.detach().to(self.base.weight.device, torch.float32).clone(),
                         requires_grad=trainable)
        self.extras.append(p)
        return p

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.first_id - 1) if len(self.extras) else ids)
        if not len(self.extras):
            return out
        is_extra = ids >= self.first_id
        table = torch.cat(list(self.extras)).to(out.dtype)
        extra = table[(ids - self.first_id).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where(is_extra.unsqueeze(-1), extra, out)


def text_transformer(text_encoder):
    # transformers 5 nests the CLIP text transformer differently across classes (DESIGN.md gotcha).
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
    vectors: nn.Parameter

    def expand(self, prompt: str) -> str:
        """Replace the name (a whole word, any case) with the internal tokens."""
        pattern = r"(?<![\w-])" + re.escape(self.name) + r"(?![\w-])"
        return re.sub(pattern, " ".join(self.tokens), prompt, flags=re.IGNORECASE)


def check_name(name: str, tokenizer=None) -> str:
    """Validate an embedding name; it is also used for file names, so it must be safe as one."""
    if not isinstance(name, str) or not name.strip():
        raise EmbeddingError("name must not be empty: type the word you will write in prompts")
    name = unicodedata.normalize("NFC", name.strip())
    if len(name) > 64:
        raise EmbeddingError(f"name is {len(name)} characters long; use at most 64")
    if not re.fullmatch(r"[\w][\w.\-]*", name) or ".." in name:
        raise EmbeddingError(f"name {name!r} may hold only letters, digits, '_', '-' and '.', "
                             "and must not start with '.' or '-' (it becomes a file name)")
    if name.lower().split(".")[0] in RESERVED:
        raise EmbeddingError(f"name {name!r} is a reserved file name on Windows; pick another")
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
    return TokenSet(name=name, tokens=tokens, vectors=param)


# ---------------------------------------------------------------- files
@dataclass
class LoadedEmbedding:
    name: str
    vectors: torch.Tensor                  # [N, dim] for the (first) CLIP text encoder
    format: str
    meta: dict = field(default_factory=dict)
    vectors_g: torch.Tensor | None = None  # SDXL's second text encoder, when present


def _as_matrix(t, where: str, path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise EmbeddingError(f"{path}: {where} is not a floating-point tensor")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or not 1 <= t.shape[0] <= MAX_VECTORS or t.shape[1] < 1:
        raise EmbeddingError(f"{path}: {where} has shape {tuple(t.shape)}; expected [vectors <= {MAX_VECTORS}, dim]")
    t = t.float()
    if not torch.isfinite(t).all():
        raise EmbeddingError(f"{path}: {where} holds NaN or infinite values")
    return t


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise EmbeddingError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            raise EmbeddingError(f"{path}: safetensors header claims {n} bytes in a {size}-byte file; "
                                 "the file is truncated or not a safetensors file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EmbeddingError(f"{path}: safetensors header is not valid JSON") from None
    meta = header.get("__metadata__") or {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EmbeddingError(f"{path}: cannot read safetensors data ({e})") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _read_pickle(path: Path) -> dict:
    import pickle
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EmbeddingError(f"{path}: refused: the file holds Python objects other than tensors and plain "
                             f"data, which could run code when loaded ({str(e).splitlines()[0][:160]}). "
                             "Only tensor files are loaded; ask for a .safetensors version.") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise EmbeddingError(f"{path}: not a readable torch file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def load_embedding(path) -> LoadedEmbedding:
    """Read any supported embedding file; the format is recognised by its keys."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file {path} does not exist")
    stem = path.stem.replace(".learned_embeds", "")
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
        data = _read_pickle(path)
        if "string_to_param" in data:
            params = data["string_to_param"]
            if not isinstance(params, dict) or not params:
                raise EmbeddingError(f"{path}: 'string_to_param' is empty")
            t = params.get("*", next(iter(params.values())))
            meta = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
                    if data.get(k) is not None}
            return LoadedEmbedding(str(data.get("name") or stem), _as_matrix(t, "string_to_param['*']", path),
                                   "a1111", meta)
        if "emb_params" in data:
            return LoadedEmbedding(stem, _as_matrix(data["emb_params"], "emb_params", path), "a1111")
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) == 1:
            (token, t), = tensors.items()
            return LoadedEmbedding(str(token).strip("<>") or stem, _as_matrix(t, repr(token), path), "diffusers")
        raise EmbeddingError(f"{path}: unknown layout with keys {sorted(map(str, data))[:8]}")
    raise EmbeddingError(f"{path}: unsupported file type {path.suffix!r}; use .safetensors, .pt or .bin")


def save_embedding(path, vectors: torch.Tensor, name: str, meta: dict | None = None,
                   fmt: str = "safetensors") -> Path:
    """Write one embedding atomically in `fmt` (safetensors | a1111 | diffusers)."""
    from safetensors.torch import save_file

    path = Path(path)
    t = vectors.detach().float().cpu().contiguous().clone()
    if not torch.isfinite(t).all():
        raise EmbeddingError(f"refusing to write {path}: the vectors hold NaN or infinite values")
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    meta.setdefault("name", name)
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            save_file({"emb_params": t}, str(tmp), metadata=meta)
        elif fmt == "diffusers":
            save_file({name: t}, str(tmp), metadata=meta)
        elif fmt == "a1111":
            torch.save({
                "string_to_token": {"*": 265},  # the id of '*' in SD 1.x's CLIP vocabulary, as A1111 writes it
                "string_to_param": {"*": t},
                "name": name,
                "step": int(meta.get("updates", meta.get("step", 0)) or 0),
                "sd_checkpoint": meta.get("base_model_hash"),
                "sd_checkpoint_name": meta.get("base_model"),
            }, tmp)
        else:
            raise EmbeddingError(f"save format must be safetensors, a1111 or diffusers, got {fmt!r}")
    return path


FORMAT_SUFFIX = {"safetensors": ".safetensors", "a1111": ".pt", "diffusers": ".learned_embeds.safetensors"}
