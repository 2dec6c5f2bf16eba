"""What can be checked about a run before anything heavy happens: the settings, the dataset, the plan
(batch size vs images, steps vs gradient accumulation), the model source, and the name and init text
against the model's tokenizer. The web UI calls this on every form change (Train stays disabled while
it finds a problem) and before it starts a job, so an invalid form never leaves a run folder behind.

No torch import: the tokenizer is read with transformers alone, once per model source.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from embedtrain import EmbedtrainError
from embedtrain.config import TrainConfig


@dataclass(frozen=True)
class Problem:
    field: str        # the TrainConfig field the message is about ("" when no single field is)
    message: str

    def __str__(self) -> str:
        return self.message


def field_of(error: Exception, default: str = "") -> str:
    """The config field an engine error is about: its `field` attribute, else the first word of the message
    when that word is a field name (ConfigError messages start with the field)."""
    named = getattr(error, "field", None)
    if named:
        return named
    first = str(error).split(" ", 1)[0].strip(":'\"")
    return first if first in {f.name for f in fields(TrainConfig)} else default


def check_run(cfg: TrainConfig, count_images=None, tokenizer_for=None) -> list[Problem]:
    """Every problem this config would hit before its first weight update, in form order.

    Args:
        cfg: the run's settings (validated here; not changed).
        count_images: folder -> number of usable images (default: data.scan_folder; the UI passes a cached one).
        tokenizer_for: model source -> tokenizer or None (default: `model_tokenizer`).
    """
    from embedtrain.calculator import derive, split_counts
    try:
        cfg = TrainConfig.from_dict(cfg.to_dict()).validate()
    except EmbedtrainError as e:
        return [Problem(field_of(e), str(e))]
    problems: list[Problem] = []
    try:
        tokenizer = (tokenizer_for or model_tokenizer)(cfg.model)
    except EmbedtrainError as e:
        problems.append(Problem("model", str(e)))
        tokenizer = None
    if tokenizer is not None:
        from embedtrain.embedding import _init_ids, check_name
        try:
            check_name(cfg.name, tokenizer)
        except EmbedtrainError as e:
            problems.append(Problem("name", str(e)))
        try:
            _init_ids(tokenizer, cfg.init_text, cfg.vectors)
        except EmbedtrainError as e:
            problems.append(Problem("init_text", str(e)))
    try:
        images = (count_images or _count)(cfg.data)
        if cfg.val_data:
            train, val = images, (count_images or _count)(cfg.val_data)
        else:
            train, val = split_counts(images, cfg.val_split)
        plan = derive(train, cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.step_unit, repeats=cfg.repeats)
    except EmbedtrainError as e:
        problems.append(Problem(field_of(e, "data"), str(e)))
        return problems
    from embedtrain.schedules import from_config
    try:
        from_config(cfg, plan)
    except EmbedtrainError as e:
        problems.append(Problem(field_of(e, "lr_schedule"), str(e)))
    problem = _template_problem(cfg)
    return problems + ([problem] if problem else [])


def unreached_name(cfg: TrainConfig, templates: list[str], captions) -> str | None:
    """The rule the trainer and these checks share: the name must reach a prompt, through a template line's
    [name] or a caption that mentions it. The reason when it does not; None when it does."""
    if any("[name]" in t for t in templates):
        return None
    low = cfg.name.lower()
    if any(low in caption.lower() for caption in captions):
        return None
    return (f"template {cfg.template!r} has no [name] and no caption mentions {cfg.name!r}: the embedding would "
            "never be trained; use a template with [name]")


def _template_problem(cfg: TrainConfig) -> Problem | None:
    from embedtrain.data import IMAGE_EXTS, caption_for, load_templates
    try:
        templates = load_templates(cfg.template)
    except EmbedtrainError as e:
        return Problem("template", str(e))
    captions = (caption_for(p) for p in Path(cfg.data).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    reason = unreached_name(cfg, templates, captions)
    return Problem("template", reason) if reason else None


def _count(folder) -> int:
    from embedtrain.data import inspect_folder
    return len(inspect_folder(folder, thumbs=0)[0])   # headers and cheap checks: no image decoded whole


_TOKENIZERS: dict = {}


def _hub_tokenizer(repo_id: str):
    """A hub model's tokenizer from the Hugging Face cache, or None when it is not cached yet (the job
    downloads the model; nothing is fetched from the web server's checks)."""
    if repo_id not in _TOKENIZERS:
        try:
            from transformers import CLIPTokenizer
            _TOKENIZERS[repo_id] = CLIPTokenizer.from_pretrained(repo_id, subfolder="tokenizer", local_files_only=True)
        except (OSError, ValueError):
            return None
    return _TOKENIZERS[repo_id]


def model_tokenizer(source: str):
    """The tokenizer of a model source, without loading its weights; None where it cannot be read alone
    (a single-file checkpoint: its tokenizer is checked when the job loads it). A source that does not
    exist raises ModelError, worded as the loader words it."""
    from embedtrain import shown
    from embedtrain.models import DEMO_MODEL, ModelError, _is
    source = (source or "").strip()
    if source == "tiny":
        return None   # built in memory by the job itself
    folder = DEMO_MODEL if source == "demo" else Path(source).expanduser()
    if source != "demo" and _is(folder, "file"):
        if folder.suffix.lower() not in (".safetensors", ".ckpt"):
            raise ModelError(f"model file {folder} must be a .safetensors or .ckpt checkpoint")
        return None
    from embedtrain.models import is_hub_id
    if source != "demo" and not _is(folder, "dir") and is_hub_id(source):
        return _hub_tokenizer(source)
    if not _is(folder, "dir"):
        raise ModelError(f"model {shown(source)} not found: use 'demo', a diffusers folder or a .safetensors/.ckpt file")
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"model folder {folder} has no model_index.json; it is not a diffusers pipeline folder")
    key = (str(folder.resolve()), (folder / "tokenizer").stat().st_mtime if (folder / "tokenizer").is_dir() else 0)
    if key not in _TOKENIZERS:
        try:
            from transformers import CLIPTokenizer
            _TOKENIZERS[key] = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        except (OSError, ValueError):
            _TOKENIZERS[key] = None   # unusual layout: the job's own load says what is wrong
    return _TOKENIZERS[key]
