"""Tiny Stable Diffusion pipelines of the real architecture, built from config.

Used by the tests (the `tiny` size: seconds on a CPU) and as the skeleton of the demo model
(the `demo` size). Every component is a real diffusers/transformers class: UNet2DConditionModel,
AutoencoderKL, CLIPTextModel and a CLIPTokenizer whose vocabulary is written here so that each
word of a small world is one token, exactly like a real CLIP vocabulary where common words are.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from embedtrain.config import model_cfg_scale

# How the demo model is sampled unless told otherwise: the scheduler saved with it (a diffusers class,
# A1111's "Euler a"), its sampler steps, and its CFG scale (the demo preset's). Chosen by measurement,
# see the model card's Status.
SCHEDULER = "EulerAncestralDiscreteScheduler"
SAMPLE_STEPS = 20
GUIDANCE = model_cfg_scale("demo")

# Sizes: the UNet/VAE/text-encoder hyper-parameters. `tiny` keeps the test suite fast; `demo` is the
# size the pretrained demo model uses (64 px images, 16 x 16 latents). A dict passed to build_pipeline
# may also set `layout="sd"` (SD 1.x's block order) and `vae_layers` (default 1).
SIZES = {
    "tiny": dict(unet_channels=(16, 32), layers=1, cross_dim=32, heads=2, te_layers=1,
                 vae_channels=(16, 16), resolution=32, norm_groups=8),
    "demo": dict(unet_channels=(32, 64), layers=2, cross_dim=64, heads=4, te_layers=2,
                 vae_channels=(32, 64, 64), resolution=64, norm_groups=16),
}

# Words every tiny vocabulary knows, so prompt templates and tests read naturally.
BASE_WORDS = (
    "a an the of in on with and photo picture rendering image drawing painting art style "
    "by clean dark bright good nice small large big cropped close up weird cool one "
    "star circle square triangle ring cross red green blue yellow purple orange white black "
    "background shape object cat dog toy"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table that byte-level BPE (GPT-2, CLIP) uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair (all occurrences)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_vocab(words) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocab and merge list in which each given word is a single token.

    Every byte character (alone and word-final, with `</w>`) is in the vocabulary so that any text
    tokenizes. For each word, the merges already written are applied first (as the tokenizer will),
    then a chain of new merges joins the resulting pieces left to right. New merges rank after all
    earlier ones, so they never split a word added before: every word stays one token.
    """
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not word.isascii():
            continue
        parts = _bpe(word, ranks)
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in ranks:
                ranks[(left, right)] = len(merges)
                merges.append(f"{left} {right}")
                vocab.setdefault(left + right, len(vocab))
            left = left + right
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def write_tokenizer(folder: Path, words=BASE_WORDS) -> Path:
    """Write vocab.json + merges.txt + tokenizer_config.json that CLIPTokenizer.from_pretrained reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = word_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # model_max_length must be set: without it, padding to max length overflows.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }), encoding="utf-8")
    return folder


def build_pipeline(size: str | dict = "tiny", words=BASE_WORDS, seed: int = 0, folder: Path | None = None):
    """Build a StableDiffusionPipeline of the given size with seeded random weights.

    The tokenizer is written to `folder` (a temp folder when None) and read back, so it is exactly
    what `from_pretrained` on a saved copy would produce.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if isinstance(size, dict):   # explicit hyper-parameters (the benchmarks' mid-size model)
        s = size
    elif size in SIZES:
        s = SIZES[size]
    else:
        raise ValueError(f"size must be one of {sorted(SIZES)} or a dict like them, got {size!r}")
    tok_dir = write_tokenizer(Path(folder or tempfile.mkdtemp(prefix="embedtrain-tok-")), words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))

    torch.manual_seed(seed)
    n_down = len(s["unet_channels"])
    if s.get("layout", "demo") == "sd":   # SD 1.x: cross-attention at every level but the lowest
        down = ("CrossAttnDownBlock2D",) * (n_down - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_down - 1)
    else:                                 # demo/tiny: none at the full latent resolution
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_down - 1)
        up = ("CrossAttnUpBlock2D",) * (n_down - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=s["resolution"] // 2 ** (len(s["vae_channels"]) - 1),
        in_channels=4, out_channels=4,
        block_out_channels=s["unet_channels"], layers_per_block=s["layers"],
        down_block_types=down, up_block_types=up,
        cross_attention_dim=s["cross_dim"], attention_head_dim=s["heads"],
        norm_num_groups=s["norm_groups"],
    )
    torch.manual_seed(seed + 1)
    n_vae = len(s["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=s["vae_channels"], layers_per_block=s.get("vae_layers", 1),
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        norm_num_groups=s["norm_groups"], sample_size=s["resolution"],
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=s["cross_dim"], intermediate_size=2 * s["cross_dim"],
        num_hidden_layers=s["te_layers"], num_attention_heads=s["heads"], max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SDXL's text side in miniature: two CLIP encoders of different widths (so a swapped pair is caught),
# the second with a projection whose output is the pooled conditioning, and a UNet that takes their
# concatenated hidden states plus SDXL's "text_time" micro-conditioning.
XL_SIZES = {
    "tiny": dict(unet_channels=(16, 32), layers=1, te_dims=(32, 48), heads=2, te_layers=2, time_dim=8,
                 vae_channels=(16, 16), resolution=32, norm_groups=8),
}


def build_sdxl_pipeline(size: str | dict = "tiny", words=BASE_WORDS, seed: int = 0, folder: Path | None = None):
    """A StableDiffusionXLPipeline of SDXL's architecture at a tiny size, seeded random weights."""
    import tempfile

    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    s = size if isinstance(size, dict) else XL_SIZES[size]
    tok_dir = write_tokenizer(Path(folder or tempfile.mkdtemp(prefix="embedtrain-tok-")), words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir))
    d1, d2 = s["te_dims"]
    torch.manual_seed(seed)
    n_down = len(s["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=s["resolution"] // 2 ** (len(s["vae_channels"]) - 1), in_channels=4, out_channels=4,
        block_out_channels=s["unet_channels"], layers_per_block=s["layers"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_down - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_down - 1) + ("UpBlock2D",),
        cross_attention_dim=d1 + d2, attention_head_dim=s["heads"], norm_num_groups=s["norm_groups"],
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=s["time_dim"], projection_class_embeddings_input_dim=d2 + 6 * s["time_dim"],
    )
    torch.manual_seed(seed + 1)
    n_vae = len(s["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae_channels"], layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        norm_num_groups=s["norm_groups"], sample_size=s["resolution"], scaling_factor=0.13025,
    )

    def te_config(dim):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=s["te_layers"],
            num_attention_heads=s["heads"], max_position_embeddings=77, projection_dim=dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(te_config(d1))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(te_config(d2))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
