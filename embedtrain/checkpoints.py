"""Single-file Stable Diffusion checkpoints (.safetensors, .ckpt) in the original layout, loaded offline.

The layout is the one the original Stable Diffusion code saved and A1111, ComfyUI and civitai use:
`model.diffusion_model.*` (the UNet), `first_stage_model.*` (the VAE) and the text encoder(s) under
`cond_stage_model.transformer.text_model.*` (SD 1.x: OpenAI CLIP ViT-L/14), `cond_stage_model.model.*`
(SD 2.x: OpenCLIP ViT-H/14, fused q/k/v) or `conditioner.embedders.0.transformer.text_model.*` plus
`conditioner.embedders.1.model.*` (SDXL base: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).

- `detect(path)` tells the architecture from the keys and shapes alone (a .safetensors header is read, no
  weights), cheap enough to list a models folder.
- `load_single_file(path, ...)` builds the diffusers pipeline: the configs of the standard architectures are
  written here from their published hyper-parameters (nothing is downloaded), every weight is mapped from
  its original key by `original_keys` (the UNet, VAE and CLIP layouts) or by the OpenCLIP conversion
  (fused q/k/v split), and loaded into models built on the meta device (no random init, no second copy).
- `write_single_file(pipe, path)` writes a pipeline back in the original layout (tests, benchmarks).

Why the text encoders are not left to diffusers' from_single_file (0.42.1 with transformers 5.25): it builds
the encoder under accelerate's init_empty_weights and fills it with load_model_dict_into_meta, which never
checks for missing names. Every encoder weight whose converted name does not match the model's stays on the
meta device, silently; the first `.to(device)` then fails with "Cannot copy out of meta tensor; no data!"
(a forward pass: "Tensor on device meta is not on the expected device"). Released-style SD 1.x keys
(`...transformer.text_model.*` with `position_ids`) do convert with a local `config=` folder; a file whose
encoder keys lack `text_model.` (what diffusers' own convert script writes under transformers 5, whose
CLIPTextModel no longer wraps a `text_model`) is refused as "weights missing", and any partial match ends in
the meta error. Here the encoders are filled from the checkpoint's keys directly, every weight is required
(a missing one is a one-line error naming it), and `position_ids` is always rebuilt (some merged files carry
broken float ones).

SD 2.x v-prediction cannot be told from the keys. The rule, first match wins: the `prediction` argument;
the file's `modelspec.prediction_type` metadata; A1111's sidecar `<name>.yaml` (`parameterization: "v"`
means v-prediction); a `v_pred` key (SDXL v-prediction fine-tunes); else SD 2.x is v-prediction at 768 px
(the 768-v releases and most fine-tunes) unless its file name says `base` or `512` (epsilon at 512 px);
SD 1.x and SDXL are epsilon.

Tokenizers: all three encoders use CLIP's BPE vocabulary (SD 2.x and SDXL's second encoder pad with "!").
No vocabulary ships with the project; `clip_tokenizer_folder` finds one offline (see there).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from embedtrain import EmbedtrainError, shown


class ModelError(EmbedtrainError):
    """A model cannot be loaded; the message says which and why. (embedtrain.models re-exports this class.)"""


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint: its keys and shapes (header only), then tensors one at a time.

SAFETENSORS_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64", "I64": "int64",
                      "I32": "int32", "U8": "uint8", "I8": "int8", "BOOL": "bool", "F8_E4M3": "fp8",
                      "F8_E5M2": "fp8"}
MAX_HEADER = 100 << 20


def read_header(path) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """{key: (dtype, shape)} and the __metadata__ dict of a .safetensors file, from its header alone; a .ckpt
    is opened memory-mapped through torch.load(weights_only=True) (the weights stay on disk)."""
    path = Path(path)
    if path.suffix.lower() == ".ckpt":
        sd = _ckpt_state_dict(path)
        return {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in sd.items()}, {}
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= size <= min(MAX_HEADER, path.stat().st_size - 8):
                raise ValueError("bad header size")
            header = json.loads(fh.read(size).decode("utf-8"))
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except (ValueError, struct.error, UnicodeDecodeError):
        raise ModelError(f"checkpoint {path} is not a valid .safetensors file (its header cannot be read); "
                         "give a .safetensors or .ckpt Stable Diffusion checkpoint") from None
    if not isinstance(header, dict):
        raise ModelError(f"checkpoint {path} is not a valid .safetensors file (its header is not a table)")
    meta = header.pop("__metadata__", None) or {}
    try:
        keys = {k: (SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"]), tuple(int(n) for n in v["shape"]))
                for k, v in header.items()}
    except (TypeError, KeyError, ValueError, AttributeError):
        raise ModelError(f"checkpoint {path} is not a valid .safetensors file (a tensor entry is malformed)") from None
    return keys, meta if isinstance(meta, dict) else {}


def _ckpt_state_dict(path: Path) -> dict:
    """A .ckpt's tensors through torch.load(weights_only=True): memory-mapped when the file allows it; the
    usual {"state_dict": {...}} wrapper is taken off; non-tensor entries are dropped."""
    import pickle

    import torch
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:   # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ModelError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():   # "Unsupported global: GLOBAL x.y" = a pickled Python object
            raise ModelError(f"checkpoint {path} is not a readable PyTorch .ckpt file") from None
        raise ModelError(f"checkpoint {path} holds Python objects that are not loaded (only plain tensors are, "
                         "with weights_only=True): convert it to .safetensors, or use a .safetensors copy") from None
    except (RuntimeError, ValueError, EOFError, AttributeError, ImportError, TypeError):
        raise ModelError(f"checkpoint {path} is not a readable PyTorch .ckpt file") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path} does not hold a state dict (a table of named tensors)")
    flat = {}
    for k, v in obj.items():   # one nested level too (an A1111 embedding's string_to_param: {"*": tensor})
        for kk, vv in (v.items() if isinstance(v, dict) else [("", v)]):
            name = f"{k}.{kk}" if kk else k
            if isinstance(name, str) and isinstance(vv, torch.Tensor):
                flat[name] = vv
    return flat


class _Reader:
    """Tensors of a checkpoint by original key, as fp32 (integers kept), read one at a time. A .safetensors is
    read with plain file reads at the header's offsets (no memory map: its pages would stay resident beside
    the fp32 copies, +50% peak memory for an fp16 file)."""

    TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                    "I32": "int32", "I16": "int16", "U8": "uint8", "I8": "int8", "BOOL": "bool",
                    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

    def __init__(self, path: Path):
        self.path = path
        if path.suffix.lower() == ".ckpt":
            self.sd, self.entries = _ckpt_state_dict(path), None
            return
        self.sd = None
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            self.entries = json.loads(fh.read(size).decode("utf-8"))
        self.start = 8 + size

    def _read(self, key: str):
        import torch
        if self.sd is not None:
            return self.sd[key]
        e = self.entries[key]
        begin, end = (int(n) for n in e["data_offsets"])
        dtype = getattr(torch, self.TORCH_DTYPES[e["dtype"]])
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(self.start + begin)
            if fh.readinto(memoryview(buf.numpy())) != end - begin:
                raise ValueError("the file is shorter than its header says (truncated download?)")
        return buf.view(dtype).reshape([int(n) for n in e["shape"]])

    def __call__(self, key: str):
        import torch
        try:
            t = self._read(key)
        except (OSError, RuntimeError, ValueError, KeyError, AttributeError) as e:
            raise ModelError(f"cannot read tensor {key!r} of checkpoint {self.path}: "
                             f"{str(e).splitlines()[0][:200]}") from None
        return t.float() if t.is_floating_point() else t.to(torch.int64)


# ---------------------------------------------------------------------------------------------------------
# What a checkpoint is: detect() from keys and shapes.

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer.text_model."
SD2_TE = "cond_stage_model.model."
XL_TE1 = "conditioner.embedders.0.transformer.text_model."
XL_TE2 = "conditioner.embedders.1.model."
ARCHS = {"SD 1.x": ("SD", (768,)), "SD 2.x": ("SD", (1024,)), "SDXL": ("SDXL", (768, 1280))}


def _not_a_model(keys) -> str:
    """'a LoRA' / 'an embedding' / '' from the key names."""
    ks = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_")) or ".lora_down." in k or ".lora_up." in k
           or ".lora_A." in k or ".lora_B." in k or k.endswith((".hada_w1_a", ".lokr_w1", ".alpha")) for k in ks):
        return "a LoRA"
    if ks and (set(ks) <= {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token", "name",
                           "step", "sd_checkpoint", "sd_checkpoint_name", "*"}
               or any(k.startswith("string_to_param.") for k in ks)):
        return "an embedding"
    return ""


def _normalize_keys(keys: dict) -> dict:
    """Original-layout keys as this module reads them: SD 1.x encoders saved without `text_model.` (older
    transformers) get it back, so one set of names serves both. Returns {normalized: original}."""
    out = {}
    old = "cond_stage_model.transformer."
    for k in keys:
        if k.startswith(old) and not k.startswith(SD1_TE):
            out[SD1_TE + k[len(old):]] = k
        else:
            out[k] = k
    return out


def _architecture(path: Path, keys: dict) -> str:
    """'SD 1.x' / 'SD 2.x' / 'SDXL' / 'tiny SD' / 'tiny SDXL', or a ModelError naming what the file is."""
    what = _not_a_model(keys)
    if what:
        raise ModelError(f"{path} is {what}, not a model: give it as {what.split()[-1]} (not as the model), "
                         "and a Stable Diffusion checkpoint as the model")
    unet_in = keys.get(UNET + "input_blocks.0.0.weight")
    if unet_in is None:
        raise ModelError(f"{path} is not a Stable Diffusion checkpoint in the original layout (no "
                         f"'{UNET}input_blocks.0.0.weight'): give an SD 1.x, SD 2.x or SDXL base checkpoint")
    if unet_in[1][1] != 4:
        raise ModelError(f"{path} is an inpainting or other {unet_in[1][1]}-channel model; embedtrain trains on "
                         "text-to-image SD 1.x, SD 2.x and SDXL base checkpoints")
    if "conditioner.embedders.0.model.token_embedding.weight" in keys:
        raise ModelError(f"{path} is an SDXL refiner; embedtrain trains embeddings for SDXL base checkpoints")
    te = {"SD 1.x": SD1_TE + "embeddings.token_embedding.weight", "SD 2.x": SD2_TE + "token_embedding.weight",
          "SDXL": XL_TE1 + "embeddings.token_embedding.weight"}
    for arch, key in te.items():
        if key in keys:
            if arch == "SDXL" and XL_TE2 + "token_embedding.weight" not in keys:
                break
            dims = _token_dims(keys, arch)
            return arch if dims == ARCHS[arch][1] else "tiny " + ARCHS[arch][0]
    raise ModelError(f"{path} has a UNet but no text encoder that embedtrain knows (SD 1.x CLIP, SD 2.x OpenCLIP "
                     "or SDXL's pair): give an SD 1.x, SD 2.x or SDXL base checkpoint")


def _token_dims(keys: dict, arch: str) -> tuple:
    if arch == "SD 1.x":
        return (keys[SD1_TE + "embeddings.token_embedding.weight"][1][1],)
    if arch == "SD 2.x":
        return (keys[SD2_TE + "token_embedding.weight"][1][1],)
    return (keys[XL_TE1 + "embeddings.token_embedding.weight"][1][1], keys[XL_TE2 + "token_embedding.weight"][1][1])


def _sidecar_prediction(path: Path) -> str:
    """A1111's convention: `<name>.yaml` beside the checkpoint, `parameterization: "v"` for v-prediction."""
    side = path.with_suffix(".yaml")
    try:
        text = side.read_text(encoding="utf-8", errors="replace")[:200_000]
    except OSError:
        return ""
    found = re.search(r"^\s*parameterization\s*:\s*[\"']?(\w+)", text, re.M)
    return "v_prediction" if found and found.group(1) == "v" else "epsilon"


def _prediction(path: Path, arch: str, keys: dict, meta: dict, prediction: str) -> tuple[str, int]:
    """(prediction type, native resolution): the rule in the module docstring."""
    base = {"SD 1.x": 512, "SDXL": 1024}
    if prediction and prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"prediction must be 'epsilon' or 'v_prediction' (or empty: detected), got "
                         f"{shown(prediction)}")
    found = prediction
    spec = str(meta.get("modelspec.prediction_type", "")).lower()
    if not found and spec:
        found = "v_prediction" if spec.startswith("v") else "epsilon"
    found = found or _sidecar_prediction(path) or ("v_prediction" if "v_pred" in keys else "")
    if arch == "SD 2.x" or (arch == "tiny SD" and SD2_TE + "token_embedding.weight" in keys):
        named_base = re.search(r"base|512", path.name, re.I) is not None
        found = found or ("epsilon" if named_base else "v_prediction")
        return found, 768 if found == "v_prediction" else 512
    return found or "epsilon", base.get(arch, 512)


def detect(path, prediction: str = "") -> dict:
    """What a single-file checkpoint holds, from its keys and shapes only (a .safetensors header; no weights).

    Returns dict(arch="SD 1.x"|"SD 2.x"|"SDXL"|"tiny SD"|"tiny SDXL", family="SD"|"SDXL", token_dims=(768,) ...,
    resolution=512|768|1024 (0 for a tiny/non-standard model), prediction="epsilon"|"v_prediction",
    dtype="fp16"|..., ema=bool, format="safetensors"|"ckpt"). A LoRA, an embedding, a refiner, an inpainting
    model or an unknown file raises ModelError with one line saying which."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ModelError(f"model file {path} must be a .safetensors or .ckpt checkpoint")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found")
    raw, meta = read_header(path)
    keys = {n: raw[o] for n, o in _normalize_keys(raw).items()}
    arch = _architecture(path, keys)
    family = "SDXL" if arch.endswith("SDXL") else "SD"
    pred, res = _prediction(path, arch, keys, meta, prediction)
    res = 0 if arch.startswith("tiny") else res   # a non-standard size: its model config tells
    dtypes = [dt for k, (dt, _) in keys.items() if k.startswith(UNET)]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else ""
    return dict(arch=arch, family=family, token_dims=_token_dims(keys, _te_arch(arch, keys)),
                resolution=res, prediction=pred, dtype=dtype, ema=any(k.startswith("model_ema.") for k in keys),
                format=path.suffix.lower().lstrip("."))


def _te_arch(arch: str, keys: dict) -> str:
    """The text-encoder layout of an architecture (a tiny SD may carry either SD 1.x's or SD 2.x's)."""
    if arch in ARCHS:
        return arch
    if arch == "tiny SDXL":
        return "SDXL"
    return "SD 1.x" if SD1_TE + "embeddings.token_embedding.weight" in keys else "SD 2.x"


# ---------------------------------------------------------------------------------------------------------
# The standard architectures' configs, from their published hyper-parameters (no files, no download).

def _clip_config(width: int, layers: int, heads: int, act: str, projection: int, pad: int) -> dict:
    return dict(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
                layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad)


def _vae_config(resolution: int, scaling: float) -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=resolution,
                scaling_factor=scaling)


def standard_configs(arch: str, resolution: int, prediction: str) -> dict:
    """The diffusers/transformers configs of a standard architecture: {"unet", "vae", "text_encoders": [...],
    "scheduler", "pads": [...]} (pads: each tokenizer's pad token)."""
    sd_blocks = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, prediction_type=prediction)
    sd_scheduler = dict(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False, **betas)
    if arch == "SD 1.x":   # CLIP ViT-L/14 text encoder, 12 layers, quick_gelu
        return dict(unet=dict(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8, **sd_blocks),
                    vae=_vae_config(resolution, 0.18215), scheduler=sd_scheduler, pads=["<|endoftext|>"],
                    text_encoders=[_clip_config(768, 12, 12, "quick_gelu", 768, 49407)])
    if arch == "SD 2.x":   # OpenCLIP ViT-H/14: 24 layers in the file, SD 2.x conditions on the 23rd (+ ln_final)
        return dict(unet=dict(sample_size=resolution // 8, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                              use_linear_projection=True, upcast_attention=prediction == "v_prediction", **sd_blocks),
                    vae=_vae_config(resolution, 0.18215), scheduler=sd_scheduler, pads=["!"],
                    text_encoders=[_clip_config(1024, 23, 16, "gelu", 512, 0)])
    if arch == "SDXL":     # CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 (32 layers, projection 1280); penultimate states
        unet = dict(sample_size=resolution // 8, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
        return dict(unet=unet, vae=dict(_vae_config(resolution, 0.13025), force_upcast=True),
                    scheduler=dict(_class_name="EulerDiscreteScheduler", timestep_spacing="leading", **betas),
                    pads=["<|endoftext|>", "!"],
                    text_encoders=[_clip_config(768, 12, 12, "quick_gelu", 768, 49407),
                                   _clip_config(1280, 32, 20, "gelu", 1280, 0)])
    raise ModelError(f"no standard config for architecture {arch!r}")


def _folder_configs(folder: Path, family: str) -> dict:
    """The configs of a diffusers folder of the same architecture (--model-config), same shape as
    standard_configs'; its tokenizer folders are used too."""
    def read(sub, name="config.json"):
        try:
            return json.loads((folder / sub / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelError(f"model config {folder} has no readable {sub}/{name} ({type(e).__name__}): give a "
                             "diffusers folder of the same architecture as the checkpoint") from None
    names = ["text_encoder", "text_encoder_2"] if family == "SDXL" else ["text_encoder"]
    tokenizers = [folder / t for t in (["tokenizer", "tokenizer_2"] if family == "SDXL" else ["tokenizer"])]
    return dict(unet=read("unet"), vae=read("vae"), scheduler=read("scheduler", "scheduler_config.json"),
                text_encoders=[read(n) for n in names], pads=[],
                tokenizers=[t if t.is_dir() else None for t in tokenizers])


# ---------------------------------------------------------------------------------------------------------
# diffusers key -> original key (UNet, VAE, CLIP); the OpenCLIP encoders are converted by _openclip_*.

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str, table=RESNET) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _unet_key(key: str, per_level: int, up_attn: set) -> str:
    """One UNet2DConditionModel key in the original layout (`per_level`: layers_per_block)."""
    head, _, tail = key.rpartition(".")
    if head in UNET_TOP:
        return f"{UNET_TOP[head]}.{tail}"
    n = per_level + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * n + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * n + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * n + n - 1}.{2 if i in up_attn else 1}.conv.{m[2]}"
    raise ModelError(f"UNet key {key!r} has no place in the original layout (an unusual UNet: give --model-config "
                     "and a diffusers folder instead of a single file)")


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, levels: int) -> str:
    """One AutoencoderKL key in the original layout (`levels`: len(block_out_channels))."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key                                     # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.partition('.')[2]}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        return f"{side}.{m[1]}.{level}.block.{m[3]}.{_resnet(m[4], VAE_RESNET)}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.+)", rest):
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        return f"{side}.{m[1]}.{level}.{m[3]}sample.conv.{m[4]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{_resnet(m[2], VAE_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{VAE_ATTN.get(m[1], m[1])}.{m[2]}"
    return key


def original_keys(component: str, keys, prefix: str = "", config: dict | None = None) -> dict[str, str]:
    """{diffusers key: original key} for a "unet", "vae" or "clip" (an HF CLIPTextModel, under `prefix`
    + "text_model.") state dict's keys."""
    keys = list(keys)
    config = config or {}
    if component == "unet":
        up_attn = {int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)}
        per_level = config.get("layers_per_block", 2)
        return {k: UNET + _unet_key(k, per_level, up_attn) for k in keys}
    if component == "vae":
        levels = len(config.get("block_out_channels", (1, 1, 1, 1)))
        return {k: VAE + _vae_key(k, levels) for k in keys}
    return {k: prefix + "text_model." + k.removeprefix("text_model.") for k in keys}


def _openclip_rows(prefix: str, layers: int, projection: bool) -> list[tuple[str, tuple, str]]:
    """(original key, diffusers keys, how) for an OpenCLIP text tower as a CLIPTextModel: "copy", "qkv" (the
    fused in_proj is q, k and v stacked) or "T" (text_projection is the transposed Linear weight)."""
    rows = [(prefix + "token_embedding.weight", ("embeddings.token_embedding.weight",), "copy"),
            (prefix + "positional_embedding", ("embeddings.position_embedding.weight",), "copy")]
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in names.items():
            rows += [(f"{src}{a}.{w}", (f"{dst}{b}.{w}",), "copy") for w in ("weight", "bias")]
        for w in ("weight", "bias"):
            rows.append((f"{src}attn.in_proj_{w}", tuple(f"{dst}self_attn.{p}_proj.{w}" for p in "qkv"), "qkv"))
    rows += [(f"{prefix}ln_final.{w}", (f"final_layer_norm.{w}",), "copy") for w in ("weight", "bias")]
    if projection:
        rows.append((prefix + "text_projection", ("text_projection.weight",), "T"))
    return rows


def _rows(component: str, module, prefix: str = "", config: dict | None = None) -> list[tuple[str, tuple, str]]:
    """How each weight of a diffusers module comes from the checkpoint: (original key, diffusers keys, how)."""
    keys = list(module.state_dict())
    if component == "openclip":
        flat = [k.removeprefix("text_model.") for k in keys]
        layers = 1 + max(int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers."))
        rows = _openclip_rows(prefix, layers, "text_projection.weight" in flat)
        wrap = {k.removeprefix("text_model."): k for k in keys}
        return [(o, tuple(wrap[d] for d in ds), how) for o, ds, how in rows]
    return [(o, (d,), "copy") for d, o in original_keys(component, keys, prefix, config).items()]


def _check_rows(path: Path, against: str, rows, module, keys: dict) -> None:
    """Every original key the module needs is in the file with a fitting shape; else one line naming it.
    against: what the module was built from ("the standard SD 1.x architecture", "model config X")."""
    import math
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    hint = ("give --model-config, a diffusers folder of the file's architecture" if against.startswith("the standard")
            else "give a model config of the same architecture as the file")
    missing = [o for o, _, _ in rows if o not in keys]
    if missing:
        raise ModelError(f"checkpoint {path} lacks {missing[0]!r} ({len(missing)} of the {len(rows)} weights of "
                         f"{against} are missing): the file is incomplete or of another architecture; {hint}")
    for o, ds, how in rows:
        want = shapes[ds[0]]
        have = keys[o][1]
        ok = {"copy": lambda: math.prod(have) == math.prod(want) and (len(have) == len(want) or o.endswith("weight")),
              "qkv": lambda: have == (3 * want[0],) + want[1:],
              "T": lambda: have == want[::-1]}[how]()
        if not ok:
            raise ModelError(f"checkpoint {path}: {o!r} has shape {list(have)} where {against} has "
                             f"{list(want)}; {hint}")


def _fill(module, rows, read) -> None:
    """Load the module (built on the meta device) from the checkpoint, tensor by tensor."""
    import torch
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sd = {}
    for o, ds, how in rows:
        t = read(o)
        if how == "qkv":
            for d, part in zip(ds, t.chunk(3, 0)):
                sd[d] = part.contiguous()
        elif how == "T":
            sd[ds[0]] = t.t().contiguous()
        else:
            sd[ds[0]] = t.reshape(shapes[ds[0]])
    module.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf != "position_ids":
            raise ModelError(f"cannot build {type(module).__name__}: its buffer {name!r} has no value")
        owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers: CLIP's BPE vocabulary, found offline.

CLIP_VOCAB_REPOS = (("openai/clip-vit-large-patch14", ""),
                    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
                    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"),
                    ("stabilityai/stable-diffusion-2-1", "tokenizer/"),
                    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""))
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGES = ("open_clip", "clip")   # pip: open-clip-torch (or openai-clip / clip-anytorch) ship CLIP's BPE file
CLIP_MERGES = 49152 - 256 - 2         # the merges CLIP uses from its BPE file: vocab = 2 x 256 bytes + merges + 2


def cache_dir() -> Path:
    """Where derived files are kept: $EMBEDTRAIN_CACHE, else $XDG_CACHE_HOME/embedtrain, else ~/.cache/embedtrain."""
    if os.environ.get("EMBEDTRAIN_CACHE"):
        return Path(os.environ["EMBEDTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedtrain"


def _hub_vocab() -> tuple[Path, Path] | None:
    """vocab.json + merges.txt of a CLIP tokenizer already in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo, sub in CLIP_VOCAB_REPOS:
        found = [try_to_load_from_cache(repo, sub + name) for name in ("vocab.json", "merges.txt")]
        if all(isinstance(f, str) and Path(f).is_file() for f in found):
            return Path(found[0]), Path(found[1])
    return None


def _download_vocab() -> tuple[Path, Path] | None:
    """vocab.json + merges.txt of OpenAI's CLIP ViT-L/14 fetched into the Hugging Face cache, when the hub can be
    reached and HF_HUB_OFFLINE is not set (two small files, once); None otherwise."""
    try:
        from huggingface_hub import constants, hf_hub_download
        if constants.HF_HUB_OFFLINE:
            return None
        repo, sub = CLIP_VOCAB_REPOS[0]
        return tuple(Path(hf_hub_download(repo, sub + name)) for name in ("vocab.json", "merges.txt"))
    except Exception:   # noqa: BLE001  offline, a proxy, a gated mirror: the caller's error says what to do
        return None


def _bpe_file() -> Path | None:
    """CLIP's BPE merges file shipped inside an installed package (found without importing the package)."""
    import importlib.util
    for name in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / BPE_FILE).is_file():
                return Path(folder) / BPE_FILE
    return None


def clip_byte_chars() -> list[str]:
    """CLIP's byte-level alphabet in its vocabulary order: the printable Latin-1 bytes as themselves, then the
    other bytes mapped to chr(256 + n) in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def vocab_from_bpe(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merge list from its BPE file: the byte alphabet, the same with `</w>`, the first
    CLIP_MERGES merges joined, then <|startoftext|> and <|endoftext|>; 49408 entries."""
    import gzip
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:CLIP_MERGES + 1]
    merges = [" ".join(line.split()) for line in lines if line.strip()]
    chars = clip_byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer_folder(pad: str = "<|endoftext|>") -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) with CLIP's real vocabulary and
    the given pad token, made once in cache_dir(). The vocabulary comes from the Hugging Face cache (any of
    CLIP_VOCAB_REPOS already downloaded) or from CLIP's BPE file inside an installed open-clip-torch; with
    neither, a ModelError says what to get once."""
    import shutil
    folder = cache_dir() / ("clip-tokenizer" + ("-pad-bang" if pad == "!" else ""))
    if all((folder / f).is_file() for f in ("vocab.json", "merges.txt", "tokenizer_config.json")):
        return folder
    hub = _hub_vocab()
    bpe = None if hub else _bpe_file()
    if not hub and not bpe:
        hub = _download_vocab()
    if not hub and not bpe:
        raise ModelError("no CLIP tokenizer vocabulary on this machine (a single-file checkpoint has none): install "
                         "it once with `pip install --no-deps open-clip-torch` (it ships CLIP's BPE file), or "
                         "download it once with `hf download openai/clip-vit-large-patch14 vocab.json merges.txt`")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    if hub:
        shutil.copyfile(hub[0], tmp / "vocab.json")
        shutil.copyfile(hub[1], tmp / "merges.txt")
    else:
        vocab, merges = vocab_from_bpe(bpe)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad}), encoding="utf-8")
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)   # an incomplete earlier attempt
    try:
        os.replace(tmp, folder)
    except OSError:   # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Loading.

def _te_layouts(arch: str, keys: dict) -> list[tuple[str, str]]:
    """(component, prefix) of each text encoder: "clip" (HF layout) or "openclip" (fused q/k/v)."""
    te = _te_arch(arch, keys)
    if te == "SDXL":
        return [("clip", XL_TE1.removesuffix("text_model.")), ("openclip", XL_TE2)]
    if te == "SD 1.x":
        return [("clip", SD1_TE.removesuffix("text_model."))]
    return [("openclip", SD2_TE)]


def _build(configs: dict, family: str) -> dict:
    """The pipeline's models on the meta device (shapes only, nothing allocated or initialised)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clean(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(clean(configs["unet"]))
            vae = AutoencoderKL.from_config(clean(configs["vae"]))
            encoders = []
            for i, cfg in enumerate(configs["text_encoders"]):
                cls = CLIPTextModelWithProjection if family == "SDXL" and i == 1 else CLIPTextModel
                cfg = {k: v for k, v in clean(cfg).items() if k not in ("architectures", "model_type", "dtype",
                                                                           "torch_dtype", "transformers_version")}
                encoders.append(cls(CLIPTextConfig(**cfg)))
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"cannot build the model from its config: {str(e).splitlines()[0][:200]}") from None
    return dict(unet=unet, vae=vae, text_encoders=encoders)


def _scheduler(cfg: dict):
    import diffusers
    cfg = dict(cfg)
    name = cfg.pop("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if cls is None:
        raise ModelError(f"scheduler {name!r} in the model config is not a diffusers scheduler")
    return cls.from_config(cfg)


def _tokenizers(configs: dict, tokenizer) -> list:
    """One CLIPTokenizer per text encoder: the caller's folder(s), else the model config's, else CLIP's real
    vocabulary (clip_tokenizer_folder) with each encoder's pad token."""
    from transformers import CLIPTokenizer
    n = len(configs["text_encoders"])
    given = [tokenizer] * n if isinstance(tokenizer, (str, Path)) and tokenizer else list(tokenizer or [])
    given = given or configs.get("tokenizers") or [None] * n
    out = []
    for i in range(n):
        folder = given[i] if i < len(given) and given[i] else clip_tokenizer_folder(
            (configs.get("pads") or ["<|endoftext|>"] * n)[i])
        try:
            out.append(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"cannot read tokenizer folder {folder}: {str(e).splitlines()[0][:200]}") from None
    return out


def load_single_file(path, model_config: str = "", tokenizer=None, prediction: str = ""):
    """A StableDiffusionPipeline (SD 1.x/2.x) or StableDiffusionXLPipeline (SDXL) from a single-file checkpoint
    in the original layout, offline: on the CPU, fp32 (fp16/bf16 files are upcast), progress bars off,
    safety checker none, weights frozen (requires_grad False, eval mode).

    model_config: a diffusers folder of the same architecture whose configs (and tokenizers) are used instead
    of the standard ones (needed for non-standard sizes, e.g. the demo model). tokenizer: a CLIPTokenizer
    folder, or one per text encoder (default: the model config's, else CLIP's vocabulary found offline).
    prediction: "epsilon" / "v_prediction" to override detection (see the module docstring)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    path = Path(path)
    info = detect(path, prediction)
    arch, family = info["arch"], info["family"]
    if model_config:
        folder = Path(model_config)
        if not folder.is_dir():
            raise ModelError(f"model config {folder} is not a folder: give a diffusers folder of the same architecture")
        configs = _folder_configs(folder, family)
        if prediction:
            configs["scheduler"]["prediction_type"] = prediction
    elif arch.startswith("tiny"):
        raise ModelError(f"checkpoint {path} is a non-standard {arch[5:]} model (text width "
                         f"{'+'.join(map(str, info['token_dims']))}): give --model-config, a diffusers folder of "
                         "the same architecture")
    else:
        configs = standard_configs(arch, info["resolution"], info["prediction"])
    raw, _ = read_header(path)
    names = _normalize_keys(raw)
    keys = {n: raw[o] for n, o in names.items()}
    models = _build(configs, family)
    parts = [("unet", models["unet"], "", configs["unet"]), ("vae", models["vae"], "", configs["vae"])]
    parts += [(c, m, p, {}) for (c, p), m in zip(_te_layouts(arch, keys), models["text_encoders"])]
    plans = [(m, _rows(c, m, p, cfg)) for c, m, p, cfg in parts]
    against = f"model config {model_config}" if model_config else f"the standard {arch} architecture"
    for m, rows in plans:
        _check_rows(path, against, rows, m, keys)
    reader = _Reader(path)
    for m, rows in plans:
        _fill(m, rows, lambda k: reader(names[k]))
    toks = _tokenizers(configs, tokenizer)
    sched = _scheduler(configs["scheduler"])
    if family == "SDXL":
        pipe = StableDiffusionXLPipeline(vae=models["vae"], text_encoder=models["text_encoders"][0],
                                         text_encoder_2=models["text_encoders"][1], tokenizer=toks[0],
                                         tokenizer_2=toks[1], unet=models["unet"], scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoders"][0], tokenizer=toks[0],
                                       unet=models["unet"], scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in [models["unet"], models["vae"], *models["text_encoders"]]:
        module.requires_grad_(False)
        module.eval()
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Writing (tests, benchmarks): a pipeline in the original single-file layout.

def original_state_dict(pipe, dtype=None, ema: bool = False, layout: str = "") -> dict:
    """A diffusers SD/SDXL pipeline's weights under their original single-file keys, as released files have
    them: SD 1.x/CLIP-L encoders with `position_ids`, OpenCLIP ones fused (SD 2.x with the 24th layer the
    diffusers encoder drops, zero-filled, plus text_projection and logit_scale). ema: add `model_ema.*` copies
    of the UNet (a non-pruned file). layout: "SD 1.x" / "SD 2.x" for an SD pipeline's encoder (default: by its
    width, 1024 -> SD 2.x's OpenCLIP)."""
    import torch
    xl = getattr(pipe, "text_encoder_2", None) is not None
    sd2 = layout == "SD 2.x" or (not layout and pipe.text_encoder.config.hidden_size == 1024)
    layouts = ([("clip", XL_TE1.removesuffix("text_model.")), ("openclip", XL_TE2)] if xl else
               [("openclip", SD2_TE)] if sd2 else [("clip", SD1_TE.removesuffix("text_model."))])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
    parts = [("unet", pipe.unet, "", dict(pipe.unet.config)), ("vae", pipe.vae, "", dict(pipe.vae.config))]
    parts += [(c, m, p, {}) for (c, p), m in zip(layouts, encoders)]
    out = {}
    for component, module, prefix, cfg in parts:
        sd = module.state_dict()
        for o, ds, how in _rows(component, module, prefix, cfg):
            t = {"qkv": lambda: torch.cat([sd[d] for d in ds]), "T": lambda: sd[ds[0]].t()}.get(
                how, lambda: sd[ds[0]])()
            if component == "vae" and ".mid.attn_1." in o and t.dim() == 2:
                t = t[:, :, None, None]          # the original VAE attention is 1x1 convolutions
            out[o] = t.contiguous()
        if component == "clip":
            out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if not xl and sd2:
        _sd2_extras(out, pipe.text_encoder)
    if xl:
        out[XL_TE2 + "logit_scale"] = torch.tensor(4.6052)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    if ema:
        out.update({"model_ema." + k[len("model."):].replace(".", ""): v.clone() for k, v in out.items()
                    if k.startswith(UNET)})
        out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0)
    return out


def _sd2_extras(out: dict, encoder) -> None:
    """What a released SD 2.x file has beyond the diffusers encoder: the last OpenCLIP layer, text_projection,
    logit_scale (all unused by SD 2.x; zeros here)."""
    import torch
    last = encoder.config.num_hidden_layers - 1
    src, dst = f"{SD2_TE}transformer.resblocks.{last}.", f"{SD2_TE}transformer.resblocks.{last + 1}."
    for k in [k for k in out if k.startswith(src)]:
        out[dst + k[len(src):]] = torch.zeros_like(out[k])
    width = encoder.config.hidden_size
    out[SD2_TE + "text_projection"] = torch.zeros(width, width)
    out[SD2_TE + "logit_scale"] = torch.tensor(4.6052)


def write_single_file(pipe, path, dtype=None, ema: bool = False, layout: str = "") -> Path:
    """Write a pipeline as one .safetensors (or .ckpt, a {"state_dict": ...} torch.save) in the original layout.
    The .safetensors is streamed tensor by tensor (no second copy of the weights in memory)."""
    import torch
    path = Path(path)
    sd = original_state_dict(pipe, dtype, ema, layout)
    if path.suffix.lower() == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 0}, path)
        return path
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, t in sd.items():
        size = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for t in sd.values():   # raw little-endian bytes, one tensor at a time
            fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return path
