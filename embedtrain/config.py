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


# Windows reserves these device names with any extension, and counts the ISO 8859-1 superscripts
# ¹ ² ³ as digits in COM#/LPT# (COM¹ is a device, not a file).
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"{dev}{i}" for dev in ("com", "lpt") for i in "0123456789¹²³")}
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 128   # name + "-20250101-120000" + ".learned_embeds.safetensors" stays under 255 bytes
MAX_SETTINGS_FILE = 1024 * 1024   # a settings JSON is a few kB; larger ones are refused unread
MAX_TEMPLATE_FILE = 256 * 1024    # a template file, one prompt per line (data.MAX_TEMPLATE_BYTES, which reads it)

# Upper bounds no real run reaches; past them a typo costs gigabytes or an overflow, not a run.
MAX_RESOLUTION = 4096        # SDXL trains at 1024; 4096 px latents already need tens of GB
MAX_BATCH_SIZE = 1024
MAX_GRAD_ACCUM = 4096
MAX_STEPS = 10_000_000       # interval fields (val_every, save_every, lr_warmup, ...) share this bound
MAX_REPEATS = 1000
MAX_PREVIEW_STEPS = 1000
MAX_VECTORS_TAGS = 1000      # keep_tokens: a caption is read to 75 tokens, so far fewer tags ever matter
MAX_VAL_TRAIN_SUBSET = 100_000
MAX_EPOCH_IMAGES = 10_000_000  # images x repeats: the data order holds one shuffled list of them per epoch
# The highest learning rate accepted anywhere (lr, piecewise rates, lr_min, sweep candidates, range test):
# 2 million times the usual 5e-3, beyond any optimizer's useful range (LR-free ones take a multiplier near
# 1, SGD on an embedding's small gradients a few hundred at most); far above it AdamW's step overflows
# float32 (3.4e38) and torch raises instead of returning NaN.
MAX_LR = 1e4
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # what torch.Generator.manual_seed accepts for both signs


def _is_file(path: str) -> bool:
    """Path.is_file, False for a path the OS refuses to look up (too long, bad bytes)."""
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):
        return False


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


def default_run_name(name: str, kind: str = "", when: float | None = None) -> str:
    """The run folder a run gets when no run_name is typed: NAME[-KIND]-YYYYmmdd-HHMMSS. The name part is
    shortened when the whole would pass the name limits, so a name that is valid on its own always gets a
    valid folder (the timestamp is ours, not the user's to fit)."""
    import time
    suffix = (f"-{kind}" if kind else "") + "-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    head = name
    while head and (len(head) + len(suffix) > MAX_NAME_CHARS
                    or len((head + suffix).encode("utf-8")) > MAX_NAME_BYTES):
        head = head[:-1]
    if head != name:
        head = head.rstrip(".-") or "run"
    return head + suffix


def _utf8(raw: bytes, what: str, hint: str, encoding: str = "utf-8") -> str:
    """A settings or template file's bytes as text, or one ConfigError saying where the first byte that is
    not UTF-8 is and what to do (`hint`)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); "
                          f"{hint}") from None


def read_settings(path, what: str = "config file") -> dict:
    """A settings JSON file as a dict, or one ConfigError naming the file and what is wrong: missing, a
    folder, unreadable, over MAX_SETTINGS_FILE, not UTF-8, not JSON (numbers past Python's int limit or
    nesting past its recursion limit included), or not a JSON object."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a folder; --config needs a settings JSON file, such as a run "
                              "folder's config.json")
        size = path.stat().st_size
        if size > MAX_SETTINGS_FILE:
            raise ConfigError(f"{what} {path} is {size / 2**20:.1f} MB; a settings JSON file is a few kB (at most "
                              f"{MAX_SETTINGS_FILE // 2**20} MB): is it the right file?")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    text = _utf8(raw, f"{what} {path}", "save it as UTF-8 JSON", "utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be settings; settings are one JSON object of "
                          "plain values") from None
    except ValueError as e:  # an integer of thousands of digits: Python's int-conversion limit
        raise ConfigError(f"{what} {path} holds a number Python refuses to read ({' '.join(str(e).split()[:9])}"
                          "...); settings are ordinary numbers") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object of settings")
    return data


def _f(default, help_, **kw):
    return field(default=default, metadata={"help": help_, **kw})


OPTIMIZERS = ("adamw", "adam", "sgd", "dadapt_adam", "prodigy", "schedulefree_adamw")
STEP_UNITS = ("update", "batch")
LATENT_SAMPLING = ("deterministic", "once", "random")
PRECISIONS = ("auto", "no", "fp16", "bf16")
SAVE_FORMATS = ("safetensors", "a1111", "diffusers", "png")
REPORT_TO = ("", "tensorboard")
TRAIN_ENCODERS = ("both", "clip_l", "clip_g")
TEMPLATES = ("object", "style", "object_filewords", "style_filewords", "filewords", "name")


@dataclass
class TrainConfig:
    # --- model and data ---
    model: str = _f("demo", "'demo', a diffusers folder (SD 1.x/2.x or SDXL), a single .safetensors/.ckpt checkpoint "
                            "or a Hugging Face hub id (org/name)")
    model_config: str = _f("", "local diffusers folder with the configs of a single-file checkpoint (offline)")
    data: str = _f("", "folder of training images (png/jpg/jpeg/webp/bmp), captions in sidecar .txt files")
    val_data: str = _f("", "separate folder of validation images; overrides val_split")
    out: str = _f("outputs", "folder in which the run folder is created")
    run_name: str = _f("", "run folder name; default NAME-YYYYmmdd-HHMMSS")
    name: str = _f("", "embedding name, also the token written in prompts")
    init_text: str = _f("*", "text whose token vectors initialise the embedding")
    vectors: int = _f(1, "vectors per token (1-75)")
    init_embedding: str = _f("", "start from this embedding file's vectors instead of init_text (any format read; "
                                 "its vector count replaces vectors)")
    train_encoders: str = _f("both", "SDXL: which text encoder's vectors are trained: both, clip_l or clip_g (the "
                                     "other keeps its initial vectors)")
    template: str = _f("object", "prompt templates: object, style, object_filewords, style_filewords, "
                                 "filewords, name, or a path to a .txt file with [name]/[filewords]")
    repeats: int = _f(1, "times each training image is repeated per epoch (A1111 style)")
    resolution: int = _f(0, "training resolution in pixels (images are resized and center-cropped); 0 = the "
                            "model's own (SD 1.x 512, SD 2.x 768, SDXL 1024)")
    flip: bool = _f(False, "randomly mirror images horizontally")
    latent_sampling: str = _f("deterministic", "VAE latents: deterministic (posterior mean), once, random")
    shuffle_tags: bool = _f(False, "shuffle a caption's comma-separated tags for every sample ([filewords])")
    keep_tokens: int = _f(0, "the first N tags of a caption stay in place (not shuffled, never dropped)")
    tag_dropout: float = _f(0.0, "probability that each (not kept) tag is left out of a sample's caption")
    caption_dropout: float = _f(0.0, "probability that a sample's caption is left out entirely ([filewords] "
                                     "empty: the template alone)")
    noise_offset: float = _f(0.0, "noise offset: a per-channel constant added to the noise (0.05-0.1 is usual), "
                                  "so the embedding can carry very dark or bright images")
    min_snr_gamma: float = _f(0.0, "min-SNR loss weighting with this gamma (5 is usual; 0 = off): each timestep's "
                                   "loss weighted by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)")
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
    lr_pct_start: float = _f(0.3, "one_cycle: fraction of the run spent rising to lr (lr_warmup, when set, is the "
                                  "rise in updates instead)")
    lr_div_factor: float = _f(25.0, "one_cycle: the rise starts at lr / lr_div_factor")
    lr_final_div_factor: float = _f(1e4, "one_cycle: the anneal ends at lr / lr_div_factor / lr_final_div_factor "
                                         "(lr_min, when set, is the end instead)")
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
    save_formats: str = _f("safetensors", "comma list of safetensors, a1111 (.pt), diffusers (diffusers/NAME."
                                          "safetensors), png (A1111's embedding card: the last preview with the "
                                          "embedding inside)")
    report_to: str = _f("", "also log loss, validation loss, LR and previews to: tensorboard (RUN/tensorboard; "
                            "view with `tensorboard --logdir outputs`), or empty for none")
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
        need(1 <= self.repeats <= MAX_REPEATS, "repeats", f">= 1 and <= {MAX_REPEATS}")
        need(self.resolution == 0 or 8 <= self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0,
             "resolution", f"0 (the model's own) or a multiple of 8, >= 8 and <= {MAX_RESOLUTION} pixels")
        need(self.train_encoders in TRAIN_ENCODERS, "train_encoders", f"one of {', '.join(TRAIN_ENCODERS)}")
        need(self.report_to in REPORT_TO, "report_to", "tensorboard, or empty for none")
        if self.init_embedding.strip():
            need(_is_file(self.init_embedding), "init_embedding",
                 "an existing embedding file (.safetensors, .pt, .bin or an A1111 .png), or empty for init_text")
        need(self.latent_sampling in LATENT_SAMPLING, "latent_sampling", f"one of {', '.join(LATENT_SAMPLING)}")
        need(1 <= self.batch_size <= MAX_BATCH_SIZE, "batch_size", f">= 1 and <= {MAX_BATCH_SIZE}")
        need(1 <= self.grad_accum <= MAX_GRAD_ACCUM, "grad_accum", f">= 1 and <= {MAX_GRAD_ACCUM}")
        need(1 <= self.steps <= MAX_STEPS, "steps", f">= 1 and <= {MAX_STEPS}")
        need(self.step_unit in STEP_UNITS, "step_unit", f"one of {', '.join(STEP_UNITS)}")
        need(SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "seed", "a whole number between -2**63 and 2**63-1")
        need(-1 <= self.preview_seed <= SEED_RANGE[1], "preview_seed", "-1 (the run's seed) or a whole number "
             "between 0 and 2**63-1")
        from embedtrain.schedules import SCHEDULES   # pure Python, as light as this module
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"one of {', '.join(SCHEDULES)}")
        if self.lr_schedule != "piecewise":
            need(0 < self.lr <= MAX_LR, "lr", f"> 0 and <= {MAX_LR:g}")
        else:
            need(self.lr <= MAX_LR, "lr", f"<= {MAX_LR:g} (piecewise takes its rates from lr_piecewise)")
            self._check_piecewise_rates()
        need(0 <= self.lr_min <= MAX_LR, "lr_min", f">= 0 and <= {MAX_LR:g}")
        need(0 <= self.lr_warmup <= MAX_STEPS, "lr_warmup", f">= 0 and <= {MAX_STEPS} updates")
        need(0 <= self.lr_step_size <= MAX_STEPS, "lr_step_size", f">= 0 (0 = derive it) and <= {MAX_STEPS} updates")
        need(self.lr_cycle_start in ("low", "high"), "lr_cycle_start", "low or high")
        need(0 < self.lr_pct_start < 1, "lr_pct_start", "in (0, 1) (the fraction of the run spent rising)")
        need(self.lr_div_factor >= 1, "lr_div_factor", ">= 1 (one_cycle starts at lr / lr_div_factor)")
        need(self.lr_final_div_factor >= 1, "lr_final_div_factor", ">= 1 (one_cycle ends at its start LR / "
             "lr_final_div_factor)")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "> 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = off)")
        need(self.clip_grad_value >= 0, "clip_grad_value", ">= 0 (0 = off)")
        need(self.mixed_precision in PRECISIONS, "mixed_precision", f"one of {', '.join(PRECISIONS)}")
        need(0 <= self.val_split < 1, "val_split", "in [0, 1)")
        need(0 <= self.keep_tokens <= MAX_VECTORS_TAGS, "keep_tokens", f">= 0 and <= {MAX_VECTORS_TAGS} tags")
        for name in ("tag_dropout", "caption_dropout"):
            need(0 <= getattr(self, name) <= 1, name, "a probability in [0, 1]")
        need(0 <= self.noise_offset <= 1, "noise_offset", "in [0, 1] (0.05-0.1 is usual; 0 = off)")
        need(0 <= self.min_snr_gamma <= 1000, "min_snr_gamma", "in [0, 1000] (5 is usual; 0 = off)")
        for name in ("val_every", "save_every", "preview_every"):
            need(0 <= getattr(self, name) <= MAX_STEPS, name, f">= 0 (0 = off) and <= {MAX_STEPS} updates")
        need(0 <= self.val_train_subset <= MAX_VAL_TRAIN_SUBSET, "val_train_subset",
             f">= 0 (0 = off) and <= {MAX_VAL_TRAIN_SUBSET} images")
        need(1 <= self.log_every <= MAX_STEPS, "log_every", f">= 1 and <= {MAX_STEPS} updates")
        need(1 <= self.preview_steps <= MAX_PREVIEW_STEPS, "preview_steps", f">= 1 and <= {MAX_PREVIEW_STEPS}")
        formats = [s.strip() for s in self.save_formats.split(",") if s.strip()]
        need(formats and all(s in SAVE_FORMATS for s in formats), "save_formats",
             f"a comma list of {', '.join(SAVE_FORMATS)}")
        if self.template not in TEMPLATES and not _is_file(self.template):
            from embedtrain import shown
            raise ConfigError(f"template must be one of {', '.join(TEMPLATES)} or an existing .txt file, "
                              f"got {shown(self.template)}")
        if self.template not in TEMPLATES and _is_file(self.template):   # the file the run will read (data.load_templates reads it first)
            _check_template_file(Path(self.template))
        return self

    def _check_piecewise_rates(self) -> None:
        """Piecewise text carries its own rates: past MAX_LR they overflow the optimizer. A text that does not
        parse is left to the schedule builder, whose errors say which part is wrong."""
        from embedtrain.schedules import ScheduleError, parse_piecewise
        try:
            parts = parse_piecewise(self.lr_piecewise)
        except ScheduleError:
            return
        for i, (rate, _) in enumerate(parts, start=1):
            if rate > MAX_LR:
                raise ConfigError(f"lr_piecewise part {i}: rate {rate:g} is above the highest accepted learning "
                                  f"rate {MAX_LR:g}; rates must be >= 0 and <= {MAX_LR:g}")

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
        return cls.from_dict(read_settings(path))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def formats(self) -> list[str]:
        return [s.strip() for s in self.save_formats.split(",") if s.strip()]


def _check_template_file(path: Path) -> None:
    """A template file must be UTF-8 text with at least one line (checked here, so a bad file is one line
    naming it before anything loads; text in another encoding is refused rather than trained with its
    accented letters replaced)."""
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_FILE:
            raise ConfigError(f"template file {path} holds {size:,} bytes; a template file may hold at most "
                              f"{MAX_TEMPLATE_FILE // 1024} KB (one prompt per line)")
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"template file {path} cannot be read ({e.strerror or e})") from None
    text = _utf8(raw, f"template file {path}", "save it as UTF-8, one prompt per line with [name]")
    if not any(line.strip() for line in text.splitlines()):
        raise ConfigError(f"template file {path} has no lines; write one prompt per line with [name]")


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
    "tiny-xl": dict(resolution=32, preview_steps=4),
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
            typ = {"int": _whole, "float": _number, "str": str}[f.type] if f.name != "lr" else str
            parser.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_, dest=f.name)


def _whole(text: str) -> int:
    """argparse's int, with an error that quotes the value shortened (a 5000-digit value stays one line)."""
    from embedtrain import shown
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {shown(text)}") from None


def _number(text: str) -> float:
    from embedtrain import shown
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {shown(text)}") from None


LR_EXAMPLE = "'0.005:100, 1e-3:1000, 1e-5'"


def lr_fields(text) -> dict:
    """The settings that a learning rate, as typed, stands for: the one reading of `--lr` and of the web
    form's LR box.

    A number sets lr. A1111's piecewise text (its learning-rate box: "0.005:100, 1e-3:1000, 1e-5") sets
    lr_schedule "piecewise", lr_piecewise to the text and lr to 0 (a piecewise schedule takes its rates
    from the text); the text is parsed here, so a typo is refused before anything loads. Anything else is
    a ConfigError naming lr and saying what is valid. Whether the number is in range, and whether the
    piecewise rates are, is validate()'s to say."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return {"lr": float(text)}
    typed = text.strip() if isinstance(text, str) else repr(text)
    try:
        return {"lr": float(typed)}
    except ValueError:
        pass
    if ":" not in typed:
        raise ConfigError(f"lr must be a number such as 0.005 or A1111's piecewise text such as {LR_EXAMPLE}, "
                          f"got {typed[:120]!r}")
    from embedtrain.schedules import ScheduleError, parse_piecewise
    try:
        parse_piecewise(typed)
    except ScheduleError as e:
        raise ConfigError(f"lr {typed[:120]!r} is not a number, so it is read as A1111's piecewise text "
                          f"'rate:end_update, ..., rate' (e.g. {LR_EXAMPLE}), and that has an error: "
                          f"{str(e)[:300]}") from None
    return {"lr": 0.0, "lr_schedule": "piecewise", "lr_piecewise": typed}


def config_from_args(args: argparse.Namespace, config_file: str | None = None) -> TrainConfig:
    """Config file (if any) < model preset < typed flags."""
    data: dict = {}
    if config_file:
        settings = read_settings(config_file)
        data = TrainConfig.from_dict(settings).to_dict()
        explicit = set(settings)
    else:
        explicit = set()
    typed = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "lr" in typed:
        typed.update(lr_fields(typed["lr"]))   # a number, or A1111's piecewise text typed into --lr
    data.update(typed)
    explicit |= set(typed)
    cfg = TrainConfig.from_dict(data)
    return apply_preset(cfg, explicit)
