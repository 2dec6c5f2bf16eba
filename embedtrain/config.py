"""TrainConfig: every number a user sets, in one place.

The web UI, the CLI flags and JSON files all fill this same dataclass; `validate()` is the one place
that checks it, and its errors name the field, the bad value and what would be valid.
Field names use the words defined in calculator.py and README's "The words" (batch_size, grad_accum,
steps, step_unit, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from embedtrain import EmbedtrainError


class ConfigError(EmbedtrainError):
    """A setting is invalid; the message names it."""


WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 128   # name + "-20250101-120000" + ".learned_embeds.safetensors" stays under 255 bytes


def check_safe_name(name, field_name: str = "name") -> str:
    """An embedding or run name, which also becomes a file or folder name: return it stripped and
    NFC-normalised, or raise ConfigError naming the field and saying what is allowed."""
    import re
    import unicodedata
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{field_name} must not be empty: type the word you will write in prompts")
    name = unicodedata.normalize("NFC", name.strip())
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"{field_name} is {len(name)} characters ({len(name.encode('utf-8'))} bytes) long; use at "
                          f"most {MAX_NAME_CHARS} characters and {MAX_NAME_BYTES} bytes (it becomes a file name)")
    if not re.fullmatch(r"\w[\w.\-]*", name) or ".." in name or name.endswith("."):
        raise ConfigError(f"{field_name} {name!r} may hold only letters, digits, '_', '-' and '.', must not start "
                          "with '.' or '-', end with '.' or hold '..' (it becomes a file name)")
    if name.lower().split(".")[0] in WINDOWS_RESERVED:
        raise ConfigError(f"{field_name} {name!r} is a reserved file name on Windows; pick another")
    return name


def _f(default, help_, **kw):
    return field(default=default, metadata={"help": help_, **kw})


OPTIMIZERS = ("adamw", "adam", "sgd", "dadapt_adam", "prodigy", "schedulefree_adamw")
STEP_UNITS = ("update", "batch")
LATENT_SAMPLING = ("deterministic", "once", "random")
PRECISIONS = ("auto", "no", "fp16", "bf16")
SAVE_FORMATS = ("safetensors", "a1111", "diffusers")
TEMPLATES = ("object", "style", "object_filewords", "style_filewords", "filewords", "name")


@dataclass
class TrainConfig:
    # --- model and data ---
    model: str = _f("demo", "'demo', a diffusers folder, or a single .safetensors/.ckpt checkpoint")
    model_config: str = _f("", "local diffusers folder with the configs of a single-file checkpoint (offline)")
    data: str = _f("", "folder of training images (png/jpg/jpeg/webp/bmp), captions in sidecar .txt files")
    val_data: str = _f("", "separate folder of validation images; overrides val_split")
    out: str = _f("outputs", "folder in which the run folder is created")
    run_name: str = _f("", "run folder name; default NAME-YYYYmmdd-HHMMSS")
    name: str = _f("", "embedding name, also the token written in prompts")
    init_text: str = _f("*", "text whose token vectors initialise the embedding")
    vectors: int = _f(1, "vectors per token (1-75)")
    template: str = _f("object", "prompt templates: object, style, object_filewords, style_filewords, "
                                 "filewords, name, or a path to a .txt file with [name]/[filewords]")
    repeats: int = _f(1, "times each training image is repeated per epoch (A1111 style)")
    resolution: int = _f(512, "training resolution in pixels (images are resized and center-cropped)")
    flip: bool = _f(False, "randomly mirror images horizontally")
    latent_sampling: str = _f("deterministic", "VAE latents: deterministic (posterior mean), once, random")
    # --- how long and how big ---
    batch_size: int = _f(1, "images per batch (per process)")
    grad_accum: int = _f(1, "gradient accumulation: batches summed into one weight update")
    steps: int = _f(1000, "training length, counted in step_unit")
    step_unit: str = _f("update", "what `steps` counts: update (weight updates) or batch (batches shown)")
    seed: int = _f(0, "seed for the split, data order, noise, timesteps and previews")
    # --- learning rate ---
    lr: float = _f(5e-3, "learning rate (the top of a cyclical schedule)")
    lr_schedule: str = _f("constant", "constant, linear, cosine, cosine_restarts, polynomial, piecewise, "
                                      "triangular, triangular2, exp_range, cosine_cycles, one_cycle")
    lr_piecewise: str = _f("", "A1111 syntax for lr_schedule=piecewise, e.g. '0.005:100, 1e-3:1000, 1e-5'")
    lr_warmup: int = _f(0, "linear warmup, in weight updates")
    lr_min: float = _f(0.0, "lowest LR: the end of a decay, the bottom of a cycle")
    lr_cycles: float = _f(1.0, "restarts for cosine_restarts; cycles over the run for cyclical schedules")
    lr_power: float = _f(1.0, "power of the polynomial decay")
    lr_step_size: int = _f(0, "cyclical: updates per half cycle (0 = derive from lr_step_size_epochs or lr_cycles)")
    lr_step_size_epochs: float = _f(0.0, "cyclical: half cycle as k x epoch (Smith: k = 2..10)")
    lr_gamma: float = _f(1.0, "exp_range: amplitude multiplied by gamma**update")
    lr_cycle_decay: str = _f("", "cyclical: cycles per stage of a stepped top, e.g. '3,2,1.5'")
    lr_decay_factor: float = _f(0.5, "cyclical: top multiplier from one stage of lr_cycle_decay to the next")
    lr_cycle_start: str = _f("low", "cyclical: start a cycle at the low point (Smith) or at the top (5.5 cycles "
                                    "then end low; docs/guide.md#cyclical-lr)")
    lr_extend: bool = _f(False, "piecewise schedule shorter than the run: hold its last LR instead of refusing")
    # --- optimizer ---
    optimizer: str = _f("adamw", "adamw, adam, sgd, dadapt_adam, prodigy, schedulefree_adamw")
    weight_decay: float = _f(0.0, "weight decay")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    max_grad_norm: float = _f(0.0, "clip the gradient norm to this (0 = off)")
    clip_grad_value: float = _f(0.0, "clip each gradient value to +-this (0 = off)")
    # --- hardware ---
    device: str = _f("auto", "auto, cpu, cuda, cuda:N, mps")
    mixed_precision: str = _f("auto", "auto (bf16/fp16 on CUDA, fp32 on CPU), no, fp16, bf16")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet and text encoder")
    # --- validation, logging, saving ---
    val_split: float = _f(0.0, "fraction of images held out for validation loss (0 = none)")
    val_every: int = _f(0, "validation loss every N weight updates (0 = only at the end, if any validation images)")
    val_train_subset: int = _f(0, "also a fixed-noise 'stabilized' loss on this many training images")
    log_every: int = _f(1, "write a log row every N weight updates")
    save_every: int = _f(0, "write a snapshot NAME-<update>.safetensors every N weight updates (0 = off)")
    save_formats: str = _f("safetensors", "comma list of safetensors, a1111 (.pt), diffusers (learned_embeds)")
    preview_every: int = _f(0, "render a preview image every N weight updates (0 = off)")
    preview_prompt: str = _f("a photo of [name]", "preview prompt; [name] is the embedding")
    preview_steps: int = _f(20, "sampler steps of a preview")
    preview_cfg: float = _f(7.5, "CFG scale of a preview")
    preview_seed: int = _f(-1, "seed of previews (-1 = seed)")

    # ---------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Check every field (errors name it); strip and NFC-normalise `name` and `run_name`; return self."""
        def need(cond, name, valid):
            if not cond:
                raise ConfigError(f"{name} must be {valid}, got {getattr(self, name)!r}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{f.name} must be a whole number, got {v!r}")
            if f.type == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"{f.name} must be a finite number, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true or false, got {v!r}")
            if f.type == "str" and not isinstance(v, str):
                raise ConfigError(f"{f.name} must be text, got {v!r}")
        need(self.model.strip(), "model", "'demo', a diffusers folder or a checkpoint file")
        need(self.data.strip(), "data", "a folder of training images")
        # Normalised in place: " zorb" or a decomposed "é" would otherwise name files and prompts differently
        # from the embedding's token, which then never appears in a prompt and is silently never trained.
        self.name = check_safe_name(self.name, "name")
        self.run_name = check_safe_name(self.run_name, "run_name") if self.run_name.strip() else ""
        need(1 <= self.vectors <= 75, "vectors", "between 1 and 75")
        need(self.repeats >= 1, "repeats", ">= 1")
        need(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "a multiple of 8, >= 8")
        need(self.latent_sampling in LATENT_SAMPLING, "latent_sampling", f"one of {', '.join(LATENT_SAMPLING)}")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.steps >= 1, "steps", ">= 1")
        need(self.step_unit in STEP_UNITS, "step_unit", f"one of {', '.join(STEP_UNITS)}")
        if self.lr_schedule != "piecewise":
            need(self.lr > 0, "lr", "> 0")
        need(self.lr_min >= 0, "lr_min", ">= 0")
        need(self.lr_warmup >= 0, "lr_warmup", ">= 0 updates")
        need(self.lr_cycle_start in ("low", "high"), "lr_cycle_start", "low or high")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "> 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = off)")
        need(self.clip_grad_value >= 0, "clip_grad_value", ">= 0 (0 = off)")
        need(self.mixed_precision in PRECISIONS, "mixed_precision", f"one of {', '.join(PRECISIONS)}")
        need(0 <= self.val_split < 1, "val_split", "in [0, 1)")
        for name in ("val_every", "val_train_subset", "save_every", "preview_every"):
            need(getattr(self, name) >= 0, name, ">= 0 (0 = off)")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.preview_steps >= 1, "preview_steps", ">= 1")
        formats = [s.strip() for s in self.save_formats.split(",") if s.strip()]
        need(formats and all(s in SAVE_FORMATS for s in formats), "save_formats",
             f"a comma list of {', '.join(SAVE_FORMATS)}")
        if self.template not in TEMPLATES and not Path(self.template).is_file():
            raise ConfigError(f"template must be one of {', '.join(TEMPLATES)} or an existing .txt file, "
                              f"got {self.template!r}")
        return self

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        from embedtrain.fileio import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(known))}")
        cfg = cls(**{k: _coerce(cls, k, v) for k, v in data.items()})
        return cfg

    @classmethod
    def load(cls, path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of settings")
        return cls.from_dict(data)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def formats(self) -> list[str]:
        return [s.strip() for s in self.save_formats.split(",") if s.strip()]


def _coerce(cls, name, value):
    """JSON and the UI hand over 13.0 for 13 and "1e-3" for 0.001: accept what is unambiguous."""
    ftype = {f.name: f.type for f in fields(cls)}[name]
    if ftype == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if ftype == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


# Settings a model brings with it; explicit flags and config keys still win. The demo model is sampled
# at CFG 5: at 7.5 its colours drift (its card's Status has the measurements).
MODEL_PRESETS: dict[str, dict] = {
    "demo": dict(resolution=64, steps=200, lr=5e-3, init_text="star", template="object_filewords",
                 batch_size=4, preview_steps=20, preview_every=50, val_every=25, preview_cfg=5.0),
    "tiny": dict(resolution=32, preview_steps=4),
}


def model_cfg_scale(model: str) -> float:
    """The CFG scale a model is sampled at unless one is given: its preset's, else the usual 7.5."""
    return MODEL_PRESETS.get(model, {}).get("preview_cfg", TrainConfig.preview_cfg)


def apply_preset(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    preset = MODEL_PRESETS.get(cfg.model, {})
    return cfg.replace(**{k: v for k, v in preset.items() if k not in explicit})


# ---------------------------------------------------------------- CLI flags from the dataclass
def preset_note(name: str) -> str:
    """'; model presets change it: demo 5.0' for a field some MODEL_PRESETS set, else ''. Read from the
    presets themselves, so `--help` never shows a default that the chosen model quietly replaces."""
    sets = [f"{model} {preset[name]!r}" for model, preset in MODEL_PRESETS.items() if name in preset]
    return f"; model presets change it: {', '.join(sets)}" if sets else ""


def add_arguments(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """One flag per field (`batch_size` -> `--batch-size`), help text from the field's comment.

    Defaults are SUPPRESSed so the caller can tell which flags were typed (they beat presets)."""
    for f in fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} (default: {f.default!r}{preset_note(f.name)})".replace("%", "%%")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            # lr also accepts A1111's piecewise syntax; it is split off in config_from_args.
            typ = {"int": int, "float": float, "str": str}[f.type] if f.name != "lr" else str
            parser.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_, dest=f.name)


def config_from_args(args: argparse.Namespace, config_file: str | None = None) -> TrainConfig:
    """Config file (if any) < model preset < typed flags."""
    data: dict = {}
    if config_file:
        data = TrainConfig.load(config_file).to_dict()
        explicit = set(json.loads(Path(config_file).read_text(encoding="utf-8")))
    else:
        explicit = set()
    typed = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "lr" in typed:
        text = typed["lr"].strip()
        try:
            typed["lr"] = float(text)
        except ValueError:
            # "0.005:100, 1e-3:1000, 1e-5" typed into --lr, as in A1111's learning-rate box.
            typed.pop("lr")
            typed["lr_piecewise"] = text
            typed["lr_schedule"] = "piecewise"
    data.update(typed)
    explicit |= set(typed)
    cfg = TrainConfig.from_dict(data)
    return apply_preset(cfg, explicit)
