"""Load a Stable Diffusion 1.x/2.x pipeline, and pick the device and precision.

Sources: "demo" (the built-in demo model in assets/demo_model, or a tiny model built from config
while none is shipped), "tiny" (tests), a diffusers folder, or a single .safetensors/.ckpt file
(read offline with a local `model_config` folder). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import re
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}")


def is_hub_id(source: str) -> bool:
    """`org/name` that is not a local path: a Hugging Face hub model id."""
    return bool(HUB_ID.fullmatch(source or "")) and not Path(source).exists() and ".." not in source


def hub_cache() -> str:
    """The Hugging Face cache folder hub models are kept in (HF_HOME / HF_HUB_CACHE decide it)."""
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def _from_hub(repo_id: str, torch_dtype):
    """A hub model through the Hugging Face cache: downloaded when the hub can be reached (huggingface_hub
    shows its progress bars), read from the cache when offline. HF_HUB_OFFLINE is the user's to set."""
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        return StableDiffusionPipeline.from_pretrained(repo_id, torch_dtype=torch_dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except GatedRepoError:
        raise ModelError(f"model {repo_id!r} is gated on the Hugging Face hub: accept its terms on its page, log "
                         "in (`hf auth login`) and try again") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model {repo_id!r} is not on the Hugging Face hub (or it is private: log in with "
                         "`hf auth login`)") from None
    except (OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        if "cached" in str(e) or "connect" in str(e).lower() or constants.HF_HUB_OFFLINE:
            raise ModelError(f"model {repo_id!r} is not in the Hugging Face cache ({hub_cache()}) and the hub "
                             f"cannot be reached{offline}: download it once while online, or give a local "
                             "diffusers folder") from None
        raise ModelError(f"cannot load hub model {repo_id!r}: {str(e).splitlines()[0][:300]}") from None


def load_pipeline(source: str, model_config: str = ""):
    """Return (pipeline, ModelInfo). The pipeline is on the CPU in fp32, with progress bars off.

    source: "demo", "tiny", a diffusers folder, a .safetensors/.ckpt checkpoint, or a hub id (org/name)."""
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
    elif is_hub_id(source):
        pipe = _from_hub(source, torch.float32)
        info = _info(pipe, source, source.split("/")[1])
    else:
        raise ModelError(f"model {shown(source)} not found: use 'demo', a diffusers folder, a .safetensors/.ckpt "
                         "file or a Hugging Face hub id (org/name)")
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe, info
