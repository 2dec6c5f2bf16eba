"""What can be checked about a run before anything heavy happens: the settings, the dataset, the plan
(batch size vs images, steps vs gradient accumulation), the model source, the name and init text
against the model's tokenizer, and what depends on the model's family (SD or SDXL, read from its
configs): the start embedding's family and widths, train_encoders, the a1111 save format. The web UI calls this on every form change (Train stays disabled while
it finds a problem) and before it starts a job, so an invalid form never leaves a run folder behind.

No torch import: the tokenizer is read with transformers alone, once per model source.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from embedtrain import EmbedtrainError, SD_WIDTHS
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
            if not cfg.init_embedding:   # a start embedding replaces the init text and its vector count
                _init_ids(tokenizer, cfg.init_text, cfg.vectors)
        except EmbedtrainError as e:
            problems.append(Problem("init_text", str(e)))
    if not any(p.field == "model" for p in problems):
        problems += family_problems(cfg)
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


@dataclass(frozen=True)
class ModelKind:
    """What a model source is, read from its configs without loading weights."""
    name: str        # as the loader names it (a folder's name, a hub id's name, 'demo', 'tiny-xl')
    family: str      # "SD" (1.x / 2.x: one text encoder) or "SDXL" (two)
    dims: tuple      # the token width of each text encoder, () when the configs do not say

    @property
    def label(self) -> str:
        """'SDXL', 'SD 1.x', 'SD 2.x' or 'SD' (a width of neither), as textside names a family."""
        if self.family == "SDXL":
            return "SDXL"
        return SD_WIDTHS.get(self.dims[0] if self.dims else 0, "SD")


def model_kind(source: str) -> ModelKind | None:
    """The family and token widths of a model source, from model_index.json and the text encoders' configs
    (the rule of models.folder_pipeline_class: an SDXL pipeline class or a text_encoder_2 folder), without
    importing diffusers or torch; a single-file checkpoint's from its header (checkpoints.detect). None when only
    loading it would tell (a hub model that is not cached, a folder without readable configs, a file that is
    not a model)."""
    from embedtrain.models import DEMO_MODEL, PIPELINES, _is, is_hub_id
    source = (source or "").strip()
    if source in ("tiny", "tiny-xl") or (source == "demo" and not (DEMO_MODEL / "model_index.json").is_file()):
        from embedtrain.demo.model import SIZES, XL_SIZES
        if source == "tiny-xl":
            return ModelKind(source, "SDXL", tuple(XL_SIZES["tiny"]["te_dims"]))
        return ModelKind(source, "SD", (SIZES["tiny" if source == "tiny" else "demo"]["cross_dim"],))
    folder = DEMO_MODEL if source == "demo" else Path(source).expanduser()
    if source == "demo" or _is(folder, "dir"):
        read = lambda part: folder / part   # noqa: E731
        name = "demo" if source == "demo" else folder.name
    elif _is(folder, "file") and folder.suffix.lower() in (".safetensors", ".ckpt"):
        from embedtrain.checkpoints import ModelError, detect   # the header's keys and shapes, no weights
        try:
            found = detect(folder)
        except ModelError:
            return None   # not a model (a LoRA, an embedding): the job's load says so in one line
        return ModelKind(folder.stem, found["family"], tuple(found["token_dims"]))
    elif is_hub_id(source):
        from huggingface_hub import try_to_load_from_cache

        def read(part):
            found = try_to_load_from_cache(source, part)
            return Path(found) if isinstance(found, str) else None
        name = source.split("/")[1]
    else:
        return None
    index = _json(read("model_index.json"))
    if not isinstance(index, dict):
        return None
    cls = str(index.get("_class_name", ""))
    if cls and cls not in PIPELINES and "Img2Img" not in cls and "Inpaint" not in cls:
        return None   # not an SD pipeline at all: the job's load says so
    xl = cls == "StableDiffusionXLPipeline" or isinstance(_json(read("text_encoder_2/config.json")), dict)
    parts = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    dims = tuple(c.get("hidden_size") for c in (_json(read(f"{p}/config.json")) for p in parts) if isinstance(c, dict))
    ok = len(dims) == len(parts) and all(isinstance(d, int) for d in dims)
    return ModelKind(name, "SDXL" if xl else "SD", dims if ok else ())


def _json(path):
    import json
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _valid_init(kind: str = "") -> str:
    """What init_embedding would be valid: an embedding file (of `kind`), or nothing."""
    return (f"give an {kind + ' ' if kind else ''}embedding file (.safetensors, .pt, .bin or an A1111 .png), or "
            "leave init_embedding empty to start from the init text")


def family_problems(cfg: TrainConfig) -> list[Problem]:
    """What the model's family rules out, found before the slow load: a start embedding of the other family
    or of other widths, train_encoders other than 'both' on an SD model, save format a1111 on SDXL. Nothing
    when the family cannot be told without loading the model (the job's own load checks it then)."""
    formats = cfg.formats()
    if not (cfg.init_embedding or cfg.train_encoders != "both" or "a1111" in formats):
        return []   # nothing here depends on the family: no config read
    try:
        kind = model_kind(cfg.model)
    except EmbedtrainError:
        return []
    if kind is None:
        return []
    problems = []
    if kind.family == "SD" and cfg.train_encoders != "both":
        problems.append(Problem("train_encoders", f"train_encoders {cfg.train_encoders!r} applies to SDXL models "
                                f"(clip_l or clip_g); model {kind.name} is {kind.label}, which has one text "
                                "encoder: use 'both'"))
    if kind.family == "SDXL" and "a1111" in formats:
        problems.append(Problem("save_formats", f"save_formats: a1111 (.pt) holds one text encoder's vectors and "
                                f"model {kind.name} is SDXL: use safetensors (clip_l + clip_g, what AUTOMATIC1111, "
                                "ComfyUI and kohya read) and/or diffusers"))
    if cfg.init_embedding:
        problem = _init_embedding_problem(cfg.init_embedding, kind)
        if problem:
            problems.append(Problem("init_embedding", problem))
    return problems


def _init_embedding_problem(path: str, kind: ModelKind) -> str | None:
    """Why the start embedding cannot start a run on this model (one line), or None."""
    from embedtrain.embedding import load_embedding
    try:
        emb = load_embedding(Path(path).expanduser())
    except EmbedtrainError as e:
        return f"init_embedding: {e}; {_valid_init()}"
    what = f"init_embedding {Path(path).name}"
    if emb.vectors_g is not None and kind.family != "SDXL":
        return (f"{what} is an SDXL embedding (clip_l + clip_g); model {kind.name} is {kind.label}: "
                f"{_valid_init(kind.label)}")
    if emb.vectors_g is None and kind.family == "SDXL":
        width = emb.vectors.shape[1]
        made = SD_WIDTHS.get(width, "SD-style")
        return (f"{what} is an {made} embedding (one vector set, {width} wide); model {kind.name} is SDXL, which "
                f"needs clip_l + clip_g vectors: {_valid_init('SDXL')}")
    widths = tuple(v.shape[1] for v in (emb.vectors, emb.vectors_g) if v is not None)
    if kind.dims and widths != kind.dims:
        n = emb.vectors.shape[0]
        shape = lambda dims: " + ".join(f"{k}[{n}, {d}]" for k, d in zip(_keys(kind), dims))   # noqa: E731
        return (f"{what} has vectors {shape(widths)}; model {kind.name} ({kind.label}) needs {shape(kind.dims)}: "
                f"it was made for another model; {_valid_init(kind.label)}")
    return None


def _keys(kind: ModelKind) -> tuple:
    return ("clip_l ", "clip_g ") if kind.family == "SDXL" else ("",)


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
    if source in ("tiny", "tiny-xl"):
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
