"""Load a Stable Diffusion 1.x/2.x or SDXL pipeline, and pick the device and precision.

Sources: "demo" (the built-in demo model in assets/demo_model, or a tiny model built from config
while none is shipped), "tiny" / "tiny-xl" (tests: tiny SD and SDXL built from config), a diffusers
folder, a single .safetensors/.ckpt file, or a Hugging Face hub id (through the hub cache).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from embedtrain import ASSETS, SD_WIDTHS, shown

DEMO_MODEL = ASSETS / "demo_model"


from embedtrain.checkpoints import ModelError  # noqa: E402  (one class: checkpoints.py raises it too)


@dataclass
class ModelInfo:
    source: str        # what the user typed
    name: str          # short name for metadata and labels
    architecture: str  # "SD 1.x", "SD 2.x", "SDXL", "tiny SD" ...
    token_dim: int     # width of one embedding vector (SDXL: the first encoder's)
    resolution: int    # native image size in pixels
    hash: str = ""     # A1111-style short sha256 of a single-file checkpoint
    family: str = "SD"                 # "SD" (1.x / 2.x: one text encoder) or "SDXL" (two)
    token_dims: tuple = ()             # the width in each text encoder: (768,) or (768, 1280)

    def describe(self) -> str:
        h = f", hash {self.hash}" if self.hash else ""
        dims = self.token_dims or (self.token_dim,)
        word = "token dims" if len(dims) > 1 else "token dim"
        return f"{self.name}: {self.architecture}, {word} {' + '.join(map(str, dims))}, {self.resolution} px{h}"


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


PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _info(pipe, source: str, name: str, file_hash: str = "") -> ModelInfo:
    from embedtrain.textside import text_side
    if type(pipe).__name__ not in PIPELINES:
        raise ModelError(f"model {shown(source)} is a {type(pipe).__name__}; embedtrain trains embeddings for Stable "
                         "Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline)")
    side = text_side(pipe)
    dims = tuple(side.dims.values())
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if side.family == "SDXL":
        arch = "SDXL" if dims == (768, 1280) else "tiny SDXL"
    else:
        arch = SD_WIDTHS.get(dims[0], "tiny SD")
    return ModelInfo(source=source, name=name, architecture=arch, token_dim=dims[0], resolution=res, hash=file_hash,
                     family=side.family, token_dims=dims)


def folder_pipeline_class(folder: Path):
    """The diffusers pipeline class a model folder names in its model_index.json (SD or SDXL)."""
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        name = ""
    if name == "StableDiffusionXLPipeline" or (folder / "text_encoder_2").is_dir():
        return StableDiffusionXLPipeline
    if name and name not in PIPELINES and "Img2Img" not in name and "Inpaint" not in name:
        raise ModelError(f"model folder {folder} holds a {name}; embedtrain trains embeddings for Stable Diffusion "
                         "1.x/2.x and SDXL pipelines")
    return StableDiffusionPipeline


def native_resolution(source: str) -> int | None:
    """The image size a model was trained at, read from a diffusers folder's configs (no weights), or None
    when it cannot be told without loading the model."""
    import json
    folder = DEMO_MODEL if source == "demo" else Path(source or "")
    if _is(folder, "file"):   # a single-file checkpoint: its architecture from the header (0 for odd sizes)
        from embedtrain.checkpoints import detect
        try:
            return detect(folder).get("resolution") or None
        except ModelError:
            return None   # the load says what is wrong with it
    files = [folder / "unet" / "config.json", folder / "vae" / "config.json"]
    if not _is(folder, "dir") and is_hub_id(source):   # a hub model's configs, when the cache holds them
        from huggingface_hub import try_to_load_from_cache
        files = [try_to_load_from_cache(source, f"{part}/config.json") for part in ("unet", "vae")]
        if not all(isinstance(f, str) for f in files):
            return None
    try:
        unet, vae = (json.loads(Path(f).read_text(encoding="utf-8")) for f in files)
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:   # DiffusionPipeline picks the class the repo's model_index.json names (SD or SDXL; _info checks)
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=torch_dtype, safety_checker=None,
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

    source = (source or "").strip()
    if source == "tiny-xl":
        from embedtrain.demo.model import build_sdxl_pipeline
        pipe = build_sdxl_pipeline("tiny")
        info = _info(pipe, source, source)
    elif source == "tiny" or (source == "demo" and not (DEMO_MODEL / "model_index.json").is_file()):
        from embedtrain.demo.model import build_pipeline
        pipe = build_pipeline("tiny" if source == "tiny" else "demo")
        info = _info(pipe, source, source)
    elif source == "demo" or _is(Path(source), "dir"):
        folder = DEMO_MODEL if source == "demo" else Path(source)
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"model folder {folder} has no model_index.json; it is not a diffusers pipeline folder")
        try:
            pipe = folder_pipeline_class(folder).from_pretrained(
                str(folder), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
                local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load model folder {folder}: {e}") from None
        info = _info(pipe, source, "demo" if source == "demo" else folder.name)
    elif _is(Path(source), "file"):
        path = Path(source)
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            raise ModelError(f"model file {path} must be a .safetensors or .ckpt checkpoint")
        from embedtrain.checkpoints import load_single_file
        # the architecture from the keys, its configs built in (checkpoints.py); --model-config for others
        pipe = load_single_file(path, model_config)
        info = _info(pipe, source, path.stem, short_hash(path))
    elif is_hub_id(source):
        pipe = _from_hub(source, torch.float32)
        info = _info(pipe, source, source.split("/")[1])
    else:
        raise ModelError(f"model {shown(source)} not found: use 'demo', a diffusers folder, a .safetensors/.ckpt "
                         "file or a Hugging Face hub id (org/name)")
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe, info
