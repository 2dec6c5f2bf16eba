"""The text side of a model family: its tokenizers and text encoders, how an embedding enters them, and how
prompts become the UNet's conditioning.

`text_side(pipe)` is the one place the SD / SDXL choice is made; everything else asks the object it
returns. The two families:

- **SD 1.x / 2.x**: one tokenizer and one CLIP text encoder; the conditioning is its last hidden state.
  An embedding is one vector set, [N, 768] (SD 1.x) or [N, 1024] (SD 2.x), saved as `emb_params`.
- **SDXL**: two tokenizers and two encoders, CLIP ViT-L (`clip_l`, 768 wide) and OpenCLIP ViT-bigG with a
  projection (`clip_g`, 1280 wide). The conditioning is the penultimate hidden states of both, joined
  along the feature axis, plus the second encoder's pooled (projected) output and the six
  micro-conditioning numbers per image (original size, crop offset, target size) that SDXL was trained
  with. An embedding has one vector set per encoder, saved as `clip_l` and `clip_g` (the layout
  AUTOMATIC1111, ComfyUI and kohya read).

An SDXL embedding is trained as one parameter [N, 768 + 1280] whose column ranges feed the two encoders
(ExtraTokenEmbedding's shared columns): the training loop, the optimizer, clipping, the NaN rollback and
the resume state see one tensor for either family. `train_encoders` = clip_l or clip_g trains one half;
the other stays at its initial vectors (a frozen tensor of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedtrain import SD_WIDTHS
from embedtrain.embedding import (MAX_VECTORS, EmbeddingError, LoadedEmbedding, TokenSet, _init_ids, add_embedding,
                                  check_name, install)

SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Part:
    """One tokenizer + text encoder pair; `key` names its vectors in a file."""
    key: str
    tokenizer: object
    encoder: object

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size   # the token table's width (read without wrapping it)


def text_side(pipe) -> "TextSide":
    """The text side of a loaded pipeline: SDXL when it has a second text encoder, else SD."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLText(pipe)
    return SDText(pipe)


class TextSide:
    family = "SD"
    parts: list[Part]

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def tokenizer(self):
        return self.parts[0].tokenizer

    @property
    def encoders(self) -> list:
        return [p.encoder for p in self.parts]

    @property
    def dims(self) -> dict[str, int]:
        return {p.key: p.dim for p in self.parts}

    def dims_text(self) -> str:
        """'768' or '768 + 1280': the width of one vector in each encoder."""
        return " + ".join(str(d) for d in self.dims.values())

    def token_ids(self, prompts: list[str]) -> list[tuple[list[int], ...]]:
        """Per prompt, its ids in each tokenizer (padded to the model's length)."""
        per_part = [p.tokenizer(prompts, padding="max_length", truncation=True,
                                max_length=p.tokenizer.model_max_length).input_ids for p in self.parts]
        return list(zip(*per_part))

    def refuse_other_family(self, emb: LoadedEmbedding, what: str, model: str) -> None:
        """A file of the other family is refused in one line naming both, never half-loaded."""
        if emb.vectors_g is not None:
            raise EmbeddingError(f"{what} is an SDXL embedding (clip_l + clip_g); model {model} is {self.family_name()}: "
                                 "use it with an SDXL model, or pick an embedding trained on this family")

    def family_name(self) -> str:
        return SD_WIDTHS.get(self.parts[0].dim, "SD")


class SDText(TextSide):
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden state."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.parts = [Part("emb_params", pipe.tokenizer, pipe.text_encoder)]

    def add(self, name: str, vectors=None, *, init_text: str = "*", num_vectors: int = 1, trainable: bool = False,
            check_vocab: bool = True, train: str = "both") -> TokenSet:
        """Add an embedding: `vectors` [N, dim] (a file's) or init_text x num_vectors (a new one)."""
        if train != "both":
            raise EmbeddingError(f"train_encoders {train!r} applies to SDXL models (clip_l or clip_g); "
                                 f"this model is {self.family_name()}, which has one text encoder: use 'both'")
        part = self.parts[0]
        return add_embedding(part.tokenizer, part.encoder, name, vectors, init_text=init_text,
                             num_vectors=num_vectors, trainable=trainable, check_vocab=check_vocab)

    def add_loaded(self, emb: LoadedEmbedding, name: str, what: str, model: str, *, trainable: bool = False,
                   check_vocab: bool = False, train: str = "both") -> TokenSet:
        """A file's embedding under `name`; `what` and `model` name the file and model in a refusal."""
        self.refuse_other_family(emb, what, model)
        return self.add(name, emb.vectors, trainable=trainable, check_vocab=check_vocab, train=train)

    def encode(self, ids: list[torch.Tensor], time_ids=None):
        """(encoder_hidden_states, added_cond_kwargs) for the UNet."""
        return self.parts[0].encoder(ids[0])[0], None


class SDXLText(TextSide):
    """SDXL: CLIP-L and OpenCLIP-bigG, penultimate hidden states joined, pooled output of the second."""
    family = "SDXL"

    def __init__(self, pipe):
        super().__init__(pipe)
        self.parts = [Part("clip_l", pipe.tokenizer, pipe.text_encoder),
                      Part("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)]

    def family_name(self) -> str:
        return "SDXL"

    def refuse_other_family(self, emb: LoadedEmbedding, what: str, model: str) -> None:
        if emb.vectors_g is None:
            width = emb.vectors.shape[1]
            made = SD_WIDTHS.get(width, "SD-style")
            raise EmbeddingError(f"{what} is an {made} embedding (one vector set, {width} wide); model {model} is "
                                 "SDXL, which needs clip_l + clip_g vectors: pick an SDXL embedding")

    def add(self, name: str, vectors=None, *, init_text: str = "*", num_vectors: int = 1, trainable: bool = False,
            check_vocab: bool = True, train: str = "both") -> TokenSet:
        """Add an embedding to both tokenizers and encoders under the same internal tokens.

        `vectors` {clip_l: [N, 768], clip_g: [N, 1280]} (a file's) or init_text x num_vectors, looked up in
        each encoder's own table. The trained parameter is the halves named by `train` joined along the
        feature axis; a half not trained gets a frozen parameter of its own."""
        if train not in ("both", *SDXL_KEYS):
            raise EmbeddingError(f"train_encoders must be both, clip_l or clip_g, got {train!r}")
        first = self.parts[0]
        name = check_name(name, first.tokenizer if check_vocab else None)
        wrappers = [install(p.tokenizer, p.encoder) for p in self.parts]
        if name in wrappers[0].names:
            raise EmbeddingError(f"an embedding named {name!r} is already loaded in this model; two embeddings with "
                                 "one name could not be told apart in prompts: rename one of them")
        if vectors is None:
            if not 1 <= num_vectors <= MAX_VECTORS:
                raise EmbeddingError(f"vectors must be between 1 and {MAX_VECTORS}, got {num_vectors}")
            vectors = {}
            with torch.no_grad():
                for p, w in zip(self.parts, wrappers):
                    ids = torch.tensor(_init_ids(p.tokenizer, init_text, num_vectors), device=w.base.weight.device)
                    vectors[p.key] = w.base(ids).float()
        n = {k: v.shape for k, v in vectors.items()}
        for p in self.parts:
            v = vectors.get(p.key)
            if v is None or v.ndim != 2 or v.shape[1] != p.dim or v.shape[0] != vectors[first.key].shape[0]:
                raise EmbeddingError(f"embedding {name!r} has vectors {n}, but this SDXL model needs clip_l [N, "
                                     f"{self.parts[0].dim}] and clip_g [N, {self.parts[1].dim}]")
        for p, w in zip(self.parts, wrappers):
            if len(p.tokenizer) != w.first_id + w.num_extra:
                raise EmbeddingError("the tokenizer gained tokens that the text encoder does not know; "
                                     "load embeddings only through embedtrain")
        trained = [p for p in self.parts if train in ("both", p.key)]
        device = wrappers[0].base.weight.device
        shared = torch.nn.Parameter(torch.cat([vectors[p.key].detach().float() for p in trained], dim=1).to(device),
                                    requires_grad=trainable)
        k = len(wrappers[0].extras)
        tokens = [f"<emb{k}v{i}>" for i in range(vectors[first.key].shape[0])]
        col = 0
        for p, w in zip(self.parts, wrappers):
            p.tokenizer.add_tokens(tokens)
            if p in trained:
                w.add(shared, trainable, columns=(col, col + p.dim))
                col += p.dim
            else:
                w.add(vectors[p.key], False)
            w.names.append(name)
        return TokenSet(name=name, tokens=tokens, vectors=shared, parts=self._splitter(trained, wrappers, k))

    def _splitter(self, trained, wrappers, k):
        """() -> {clip_l: [N, 768], clip_g: [N, 1280]} of this embedding, trained halves and frozen ones."""
        def parts():
            return {p.key: w._table_of(k) for p, w in zip(self.parts, wrappers)}
        return parts

    def add_loaded(self, emb: LoadedEmbedding, name: str, what: str, model: str, *, trainable: bool = False,
                   check_vocab: bool = False, train: str = "both") -> TokenSet:
        self.refuse_other_family(emb, what, model)
        return self.add(name, {"clip_l": emb.vectors, "clip_g": emb.vectors_g}, trainable=trainable,
                        check_vocab=check_vocab, train=train)

    def encode(self, ids: list[torch.Tensor], time_ids=None):
        hidden, pooled = [], None
        for p, part_ids in zip(self.parts, ids):
            out = p.encoder(part_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]   # the last encoder's: CLIPTextModelWithProjection's text_embeds
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


def micro_conditioning(sample, resolution: int, flipped: bool = False) -> list[float]:
    """SDXL's six add_time_ids of one training image: its original (height, width), the top-left of the
    crop taken from it after resizing, and the target (height, width). A mirrored image's crop is
    measured from the other side."""
    w, h = sample.size
    top, left = sample.crop
    if flipped:
        scale = resolution / min(w, h)
        left = max(resolution, round(w * scale)) - resolution - left
    return [float(h), float(w), float(top), float(left), float(resolution), float(resolution)]
