"""Load a Stable Diffusion 1.x/2.x pipeline, and pick the device and precision.

Sources: "demo" (the built-in demo model in assets/demo_model, or a tiny model built from config
while none is shipped), "tiny" (tests), a diffusers folder, or a single .safetensors/.ckpt file
(read offline with a local `model_config` folder). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from embedtrain import ASSETS, EmbedtrainError, shown

DEMO_MODEL = ASSETS / "demo_model"


class ModelError(EmbedtrainError):
    """A model cannot be loaded; the message says which and why."""


@dataclass
class ModelInfo:
    source: str        # what the user typed
    name: str          # short name for metadata and labels
    architecture: str  # "SD 1.x", "SD 2.x", "tiny SD" ...
    token_dim: int     # width of one embedding vector
    resolution: int    # native image size in pixels
    hash: str = ""     # A1111-style short sha256 of a single-file checkpoint

    def describe(self) -> str:
        h = f", hash {self.hash}" if self.hash else ""
        return f"{self.name}: {self.architecture}, token dim {self.token_dim}, {self.resolution} px{h}"


def resolve_device(pref: str = "auto"):
    import torch
    if pref in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise ModelError(f"device must be auto, cpu, cuda, cuda:N or mps, got {pref!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {pref!r} asked for, but no CUDA GPU is available; use --device cpu or auto")
    return dev


def resolve_precision(pref: str, device):
    """The autocast dtype (None = plain fp32). CUDA: bf16 where supported, else fp16; CPU/MPS: fp32."""
    import torch
    if pref == "no":
        return None
    if pref == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise ModelError(f"mixed_precision {pref!r} needs a CUDA GPU; on {device.type} use 'no' or 'auto'")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[pref]


def short_hash(path: Path) -> str:
    """A1111's short hash: the first 10 hex digits of the file's sha256 (cached beside nothing)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def _info(pipe, source: str, name: str, file_hash: str = "") -> ModelInfo:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ModelError(f"model {source!r} is an SDXL pipeline; training supports SD 1.x/2.x for now")
    dim = pipe.text_encoder.config.hidden_size
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arch = {768: "SD 1.x", 1024: "SD 2.x"}.get(dim, "tiny SD")
    return ModelInfo(source=source, name=name, architecture=arch, token_dim=dim, resolution=res, hash=file_hash)


def _is(path: Path, kind: str) -> bool:
    """Path.is_dir / is_file, False for a path the OS refuses to look up (too long, bad bytes)."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except (OSError, ValueError):
        return False


def load_pipeline(source: str, model_config: str = ""):
    """Return (pipeline, ModelInfo). The pipeline is on the CPU in fp32, with progress bars off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: it is unreachable and slow to fail
    import torch
    from diffusers import StableDiffusionPipeline

    source = (source or "").strip()
    if source == "tiny" or (source == "demo" and not (DEMO_MODEL / "model_index.json").is_file()):
        from embedtrain.demo.model import build_pipeline
        pipe = build_pipeline("tiny" if source == "tiny" else "demo")
        info = _info(pipe, source, source)
    elif source == "demo" or _is(Path(source), "dir"):
        folder = DEMO_MODEL if source == "demo" else Path(source)
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"model folder {folder} has no model_index.json; it is not a diffusers pipeline folder")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
                local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load model folder {folder}: {e}") from None
        info = _info(pipe, source, "demo" if source == "demo" else folder.name)
    elif _is(Path(source), "file"):
        path = Path(source)
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise ModelError(f"model file {path} must be a .safetensors or .ckpt checkpoint")
        kwargs = dict(torch_dtype=torch.float32, local_files_only=True, safety_checker=None,
                      requires_safety_checker=False)
        if model_config:
            kwargs["config"] = model_config
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        except Exception as e:  # diffusers raises many types here; all mean "cannot load this file"
            hint = "" if model_config else (" Offline, single files need --model-config: a local diffusers folder "
                                             "of the same architecture (its configs and tokenizer are used).")
            raise ModelError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:300]}.{hint}") from None
        info = _info(pipe, source, path.stem, short_hash(path))
    else:
        raise ModelError(f"model {shown(source)} not found: use 'demo', a diffusers folder or a .safetensors/.ckpt file")
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe, info
