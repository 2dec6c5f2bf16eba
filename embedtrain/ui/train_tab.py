"""Train tab: the form (one input per TrainConfig field it shows), the derived numbers and schedule
preview before training, then live progress, plots, previews and files while the job process runs.

The page never trains itself: Train starts `python -m embedtrain train --config job.json` through the
JobManager, and a 1 s timer reads the run folder. Closing or reloading the page loses nothing: the
timer finds the running job again. The pure helpers (form_config, derived_text, schedule_frame,
status_view) are tested without a browser.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from embedtrain import EmbedtrainError
from embedtrain.config import (OPTIMIZERS, REPORT_TO, SAVE_FORMATS, STEP_UNITS, TEMPLATES, TRAIN_ENCODERS,
                               TrainConfig, apply_preset, lr_fields)
from embedtrain.ui.context import api_parameters, servable_files
from embedtrain.ui.plots import typed_frame, with_series

SCHEDULES = ["constant", "linear", "cosine", "cosine_restarts", "polynomial", "piecewise", "triangular",
             "triangular2", "exp_range", "cosine_cycles", "one_cycle"]

# Issue 23's captions, loss and output options, on the page in their own accordion (last in FIELDS).
RECIPE_FIELDS = ["shuffle_tags", "keep_tokens", "tag_dropout", "caption_dropout", "noise_offset", "min_snr_gamma",
                 "report_to", "save_formats"]

# Form fields in the order the callbacks receive them.
FIELDS = ["model", "data", "name", "init_text", "vectors", "template", "batch_size", "grad_accum", "steps",
          "step_unit", "lr", "lr_schedule", "lr_piecewise", "lr_warmup", "lr_min", "lr_cycles", "lr_step_size",
          "lr_step_size_epochs", "lr_cycle_start", "lr_power", "lr_gamma", "lr_cycle_decay", "lr_decay_factor",
          "lr_extend", "lr_pct_start", "lr_div_factor", "lr_final_div_factor", "optimizer", "val_split", "val_every", "save_every",
          "preview_every", "preview_prompt", "seed", "resolution", "flip", "run_name", "init_embedding",
          "train_encoders", *RECIPE_FIELDS]   # new fields go last: API callers passing them by position keep working

INFO = {
    "batch_size": "images per batch (per process)",
    "grad_accum": "gradient accumulation: batches summed into one weight update",
    "steps": "training length, counted in the step unit",
    "step_unit": "update = weight updates (A1111's code, diffusers, kohya); batch = batches shown (the A1111 wiki and "
                 "the 'Steps and GA' write-up; see the Guide tab)",
    "lr": "learning rate; the top of a cyclical schedule. A1111 syntax such as 0.005:100, 1e-3:1000, 1e-5 "
          "also works here",
    "val_split": "fraction of the images held out for validation loss (0 = none)",
    "vectors": "vectors per token; with a start embedding, its file's count is used",
    "init_embedding": "an embedding file of the model's family (.safetensors, .pt, .bin, A1111 .png) whose vectors "
                      "start the training; a relative path is inside the outputs folder. Empty = start from the "
                      "initialization text",
    "train_encoders": "SDXL only: train the vectors of both text encoders, or only clip_l (CLIP-L) or clip_g "
                      "(OpenCLIP-bigG; the other keeps its start vectors). SD 1.x/2.x models have one encoder: both",
    "resolution": "0 = the model's own: SD 1.x 512, SD 2.x 768, SDXL 1024",
    "shuffle_tags": "shuffle a caption's comma-separated tags for every sample (templates with [filewords])",
    "keep_tokens": "the first N tags stay in place: not shuffled, never dropped",
    "tag_dropout": "probability that each (not kept) tag is left out of a sample's caption",
    "caption_dropout": "probability that a sample's whole caption is left out (the template alone)",
    "noise_offset": "a per-channel constant added to the noise, for very dark or bright images (0.05-0.1 is "
                    "usual; 0 = off)",
    "min_snr_gamma": "min-SNR loss weighting: each timestep's loss weighted by min(SNR, gamma) (5 is usual; 0 = off)",
    "report_to": "tensorboard: also log loss, LR and previews to RUN/tensorboard (view with `tensorboard --logdir "
                 "outputs`)",
    "save_formats": "safetensors; a1111 (.pt); diffusers (diffusers/NAME.safetensors); png (A1111's embedding card: "
                    "the last preview with the embedding inside)",
}


def default_config(ctx) -> TrainConfig:
    """What the form shows on first open: the model's preset (the demo's for `demo`) on the default data."""
    cfg = TrainConfig(model=ctx.model, data=ctx.data, name="purplestar" if ctx.model == "demo" else "mytoken",
                      out=str(ctx.outputs))
    return apply_preset(cfg, explicit={"name", "data", "model", "out"})


def form_config(ctx, values: dict) -> TrainConfig:
    """The form's values as a validated TrainConfig (every shown field counts as typed: presets don't apply)."""
    data = dict(values)
    data["run_name"] = str(data.get("run_name") or "").strip()
    data["init_embedding"] = start_embedding_path(ctx, data.get("init_embedding"))
    data.update(lr_fields(data.get("lr", "")))   # a number, or A1111's piecewise text typed into the LR box
    data["out"] = str(ctx.outputs)
    if isinstance(data.get("save_formats"), (list, tuple)):   # the page's checkboxes; the API may send the text
        data["save_formats"] = ",".join(map(str, data["save_formats"]))
    if data.get("report_to") is None or data.get("report_to") == "none":
        data["report_to"] = ""
    cfg = TrainConfig.from_dict(data).validate()   # types first: a preset is looked up by the model's text
    return apply_preset(cfg, explicit=set(data)).validate()  # presets fill only what the form doesn't show


def start_embedding_path(ctx, path) -> str:
    """The "Start from embedding" path as the job gets it: absolute (a relative one lies in the outputs
    folder), and refused (NotAllowed, naming init_embedding) unless the web UI may read it, before anything
    looks at whether it exists. Empty stays empty."""
    raw = str(path or "").strip()
    if not raw:
        return ""
    p = Path(raw).expanduser()
    p = p if p.is_absolute() else ctx.outputs / p
    return str(ctx.allowed_folder(p, "init_embedding file", "init_embedding"))


def vectors_box(path) -> dict:
    """The vectors box for a "Start from embedding" value: the file's count replaces it while one is set."""
    if str(path or "").strip():
        return gr.update(interactive=False, info="from the start embedding: its file's vector count is used")
    return gr.update(interactive=True, info=INFO["vectors"])


def encoders_box(model) -> dict:
    """The encoders dropdown for a typed model: fixed at 'both' on a model its configs say is SD 1.x/2.x (one
    text encoder); open on SDXL and wherever only a load can tell (a single file: the job checks it)."""
    from embedtrain.preflight import model_kind
    try:
        kind = model_kind(str(model or ""))
    except (EmbedtrainError, OSError, ValueError):
        kind = None
    if kind is not None and kind.family == "SD":
        return gr.update(value="both", interactive=False, info=f"{kind.label} has one text encoder: both")
    return gr.update(interactive=True, info=INFO["train_encoders"])


def derived_text(ctx, values: dict) -> str:
    """One line of the calculator's numbers for the form's settings, or the error that stops them."""
    from embedtrain.calculator import CalcError, derive, split_counts
    try:
        cfg = form_config(ctx, values)
        images = _count_images(cfg.data, ctx)
        train, val = split_counts(images, cfg.val_split)
        d = derive(train, cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.step_unit, repeats=1)
    except (EmbedtrainError, CalcError, ValueError) as e:
        return f"Error: {e}"
    full = "**full-cycle**" if d.full_cycle else f"not full-cycle (full-cycle needs BS x GA = {d.images})"
    extra = f", {val} held out for validation" if val else ""
    return (f"**{d.images} images**{extra} · {d.weight_updates} weight updates · {d.batches} batches · "
            f"**{d.epochs:.2f} epochs** ({d.updates_per_epoch:.3g} updates per epoch) · {full}")


# Where a problem with a field is shown: beside the model, the dataset, the name row, the start-embedding
# row, or under the derived numbers (everything about length, batch and schedule).
CHECK_SLOTS = ["model", "data", "name", "init", "plan"]
SLOT_OF = {"model": "model", "model_config": "model", "data": "data", "val_data": "data", "val_split": "data",
           "name": "name", "init_text": "name", "vectors": "name", "template": "name",
           "init_embedding": "init", "train_encoders": "init", "save_formats": "model"}


def form_checks(ctx, values: dict, labels: dict | None = None) -> tuple[dict, list]:
    """The form's problems, as the engine would find them before a job starts (preflight.check_run).

    Returns ({slot: markdown} for CHECK_SLOTS, [label of each field with a problem]); no problems means
    Train may start. `labels` maps field names to the form's labels (the field name where missing)."""
    from embedtrain.preflight import Problem, check_run, field_of, model_tokenizer
    labels = labels or {}
    try:
        cfg = form_config(ctx, values)
        try:
            ctx.jobs.check_readable(cfg)   # the dataset, validation folder and template file the job would read
        except EmbedtrainError as e:    # not looked at further; the model is still checked (it reads no data)
            problems = [Problem(field_of(e), str(e))]
            try:
                model_tokenizer(cfg.model)
            except EmbedtrainError as m:
                problems.insert(0, Problem("model", str(m)))
        else:
            problems = check_run(cfg, count_images=lambda folder: _count_images(folder, ctx))
    except EmbedtrainError as e:
        problems = [Problem(field_of(e), str(e))]
    slots = {k: [] for k in CHECK_SLOTS}
    for p in problems:
        label = labels.get(p.field) or p.field or "Settings"
        slots[SLOT_OF.get(p.field, "plan")].append(f"⚠️ **{label}**: {p.message}")
    names = list(dict.fromkeys(labels.get(p.field) or p.field or "Settings" for p in problems))
    return {k: "  \n".join(v) for k, v in slots.items()}, names


def schedule_frame(ctx, values: dict) -> tuple[pd.DataFrame, str]:
    """LR against weight update for the form's schedule (at most ~400 points), and a description or error."""
    from embedtrain.calculator import derive, split_counts
    from embedtrain.schedules import describe_schedule, from_config
    try:
        cfg = form_config(ctx, values)
        train, _ = split_counts(_count_images(cfg.data, ctx), cfg.val_split)
        d = derive(train, cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.step_unit)
        s = from_config(cfg, d)
    except Exception as e:  # any bad setting: show why instead of a plot
        return typed_frame([], {"update": int, "lr": float}), f"Error: {e}"
    n = d.weight_updates
    stride = max(1, n // 400)
    us = list(range(0, n, stride)) + [n - 1]
    return pd.DataFrame({"update": [u + 1 for u in us], "lr": [s(u) for u in us]}), describe_schedule(s)


_count_cache: dict = {}


def _count_images(folder: str, ctx=None) -> int:
    """Usable images in a folder (cached on the folder's mtime: the form calls this on every keystroke).

    Counted the way the dataset box sees them (data.inspect_folder: headers and cheap checks, no image
    decoded whole), and only in a folder the web UI may read."""
    from embedtrain.data import inspect_folder
    from embedtrain.ui.context import readable_folder
    p = readable_folder(folder, ctx)
    key = (str(p), p.stat().st_mtime if p.is_dir() else None)
    if key not in _count_cache:
        samples, _ = inspect_folder(p, thumbs=0)
        if len(_count_cache) > 256:
            _count_cache.clear()
        _count_cache[key] = len(samples)
    return _count_cache[key]


def dataset_view(folder: str, ctx=None):
    """(markdown, thumbnails) for a dataset folder: usable images, skipped files with reasons.

    Runs on every keystroke of the dataset field: thumbnails come from data.inspect_folder, which decodes
    at most PREVIEW_MAX_PIXELS per image (a larger one gets a grey placeholder and a note), and only a
    folder the web UI may read is looked at."""
    from PIL import Image

    from embedtrain.data import display_name, inspect_folder
    from embedtrain.ui.context import readable_folder
    try:
        p = readable_folder(folder, ctx)
        samples, skipped = inspect_folder(p, 96, thumbs=24)
        if len(_count_cache) > 256:
            _count_cache.clear()
        _count_cache[(str(p), p.stat().st_mtime)] = len(samples)  # the derived-numbers line needs no second scan
    except (EmbedtrainError, OSError) as e:
        return f"Error: {display_name(str(e))}", []
    text = f"{len(samples)} usable images"
    notes = [s for s in samples[:24] if s.note]
    if notes:
        text += "; no thumbnail for " + "; ".join(f"{display_name(s.path.name)} ({s.note})" for s in notes[:5])
    if skipped:
        text += f"; skipped {len(skipped)}: " + "; ".join(f"{display_name(s.path.name)} ({s.reason})"
                                                          for s in skipped[:5])
    pics = [(s.image if s.image is not None else Image.new("RGB", (96, 96), (200, 200, 200)),
             s.caption if s.image is not None else f"{s.caption} · {s.note}") for s in samples[:24]]
    return text, pics


# ---------------------------------------------------------------- live status

def _fmt_eta(s) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 60}:{s % 60:02d}" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}"


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = done / total if total else 0.0
    fill = int(round(width * frac))
    return "█" * fill + "░" * (width - fill) + f" {frac:.0%}"


PLOT_POINTS = 600   # a plot needs no more points per series than it has pixels
PLOT_REFRESH_S = 2.0   # while a job runs, plots and previews are rebuilt at most this often


SMOOTHING = 0.9   # weight of the past in the smoothed loss line (TensorBoard's slider, its usual value)
# Every series the plots can show, present from their first value on (embedtrain.ui.plots says why).
LOSS_SERIES = ["loss", f"loss (smoothed {SMOOTHING})", "loss (epoch mean)", "validation loss", "stabilized train loss"]
LR_SERIES = ["lr", "effective lr (d x lr)"]
# The raw loss pale, its trends strong, validation red (the colours follow the series, not their order).
# Gradio's chart draws no legend entries for these plots, so the colours are named under them.
PLOT_KEY = ("<small>Loss: <b style='color:#a9bfd6'>each update</b> · <b style='color:#1f5fa8'>smoothed (0.9)</b> · "
            "<b style='color:#e07b00'>mean per epoch</b> · <b style='color:#c0392b'>validation</b> · "
            "<b style='color:#2e8b57'>stabilized train</b>. LR: <b style='color:#1f5fa8'>schedule</b> · "
            "<b style='color:#e07b00'>effective (d x lr, D-Adaptation / Prodigy)</b></small>")
SERIES_COLORS = dict(zip(LOSS_SERIES, ["#a9bfd6", "#1f5fa8", "#e07b00", "#c0392b", "#2e8b57"])) | \
    dict(zip(LR_SERIES, ["#1f5fa8", "#e07b00"]))


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None   # NaN counts as missing


def loss_trends(rows: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """(smoothed, epoch means) of the per-update loss, as (update, value) pairs.

    smoothed: an exponential moving average with the start-up bias removed, so the line starts at the
    first loss instead of rising from zero. epoch means: the mean loss of the updates of each epoch
    (A1111's "loss" column), plotted at the epoch's last update; only when epochs span at least two
    updates (with more epochs than updates a mean per epoch says nothing the raw loss does not)."""
    pts = [(int(r["update"]), _num(r.get("loss")), _num(r.get("epoch"))) for r in rows
           if str(r.get("update", "")).isdigit()]
    pts = [p for p in pts if p[1] is not None]
    smooth, avg, weight = [], 0.0, 0.0
    for u, loss, _ in pts:
        avg, weight = SMOOTHING * avg + (1 - SMOOTHING) * loss, SMOOTHING * weight + (1 - SMOOTHING)
        smooth.append((u, avg / weight))
    means, group, current = [], [], None
    for u, loss, epoch in pts:
        if epoch is None:
            return smooth, []
        e = -int(-epoch // 1)   # the epoch this update ends in (1-based): 0.5 -> 1, 1.0 -> 1, 1.25 -> 2
        if current is not None and e != current and group:
            means.append((group[-1][0], sum(x for _, x in group) / len(group)))
            group = []
        current = e
        group.append((u, loss))
        if epoch == e and group:   # this update closed its epoch exactly
            means.append((u, sum(x for _, x in group) / len(group)))
            group, current = [], None
    if len(means) < 2 or len(pts) < 2 * len(means):
        means = []
    return smooth, means


def plot_frames(rows: list[dict], max_points: int = PLOT_POINTS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """log.csv rows -> (loss frame in long form: update, value, series; lr frame: update, lr, series).

    The loss frame holds the raw per-update loss, its smoothed line, the per-epoch mean and the
    validation losses. Long runs are thinned to about `max_points` rows (evenly spaced, always the last
    one, and every row that carries a validation loss, which is rare and must not be dropped); the
    smoothed line and the epoch means are computed from every row before thinning."""
    smooth, means = loss_trends(rows)
    keep = None
    if len(rows) > max_points:
        stride = -(-len(rows) // max_points)
        rows = [r for i, r in enumerate(rows) if i % stride == 0 or i == len(rows) - 1
                or r.get("val_loss") not in (None, "") or r.get("val_train_loss") not in (None, "")]
        keep = {str(r.get("update")) for r in rows}
    loss, lr = [], []
    for r in rows:
        try:
            u = int(r["update"])
        except (KeyError, ValueError):
            continue
        for key, label in (("loss", "loss"), ("val_loss", "validation loss"), ("val_train_loss", "stabilized train loss")):
            v = _num(r.get(key))
            if v is not None:
                loss.append((u, v, label))
        if r.get("lr") not in (None, ""):
            lr.append((u, float(r["lr"]), "lr"))
        e = r.get("effective_lr")
        if e not in (None, "") and r.get("lr") not in (None, "") and abs(float(e) - float(r["lr"])) > 1e-12:
            lr.append((u, float(e), "effective lr (d x lr)"))
    loss += [(u, v, f"loss (smoothed {SMOOTHING})") for u, v in smooth if keep is None or str(u) in keep]
    loss += [(u, v, "loss (epoch mean)") for u, v in means]
    return (with_series(loss, {"update": float, "value": float, "series": str}, LOSS_SERIES),
            with_series(lr, {"update": float, "lr": float, "series": str}, LR_SERIES))


def form_values(cfg: TrainConfig) -> list:
    """The Train form's values (FIELDS order) for a config; the LR as text and the save formats as a list, as the
    form holds them."""
    shown = {"lr": str(cfg.lr), "save_formats": cfg.formats(), "report_to": cfg.report_to or "none"}
    return [shown.get(k, getattr(cfg, k)) for k in FIELDS]


def preview_caption(path) -> str:
    """"update 40 · a photo of purplestar · seed 0" from the parameters chunk the trainer writes into every
    preview (read without decoding the pixels); the file name's update when the chunk is missing."""
    from PIL import Image
    path = Path(path)
    update = path.stem.rsplit("-", 1)[-1]
    try:
        with Image.open(path) as img:
            text = img.text.get("parameters", "") if hasattr(img, "text") else ""
    except OSError:
        text = ""
    lines = text.splitlines()
    fields = dict(kv.split(": ", 1) for kv in (lines[-1].split(", ") if len(lines) > 1 else []) if ": " in kv)
    name = fields.get("Embedding", "")
    prompt = lines[0].replace("[name]", name) if lines else ""
    parts = [f"update {fields.get('Update', update)}", prompt, f"seed {fields['Seed']}" if "Seed" in fields else ""]
    return " · ".join(p for p in parts if p)


def running_config(jobs) -> TrainConfig | None:
    """The settings of the job running now (run_name cleared: a new run needs its own folder)."""
    st = jobs.status()
    if not st.running:
        return None
    for name in ("config.json", "job.json"):
        try:
            return TrainConfig.load(Path(st.run_dir) / name).replace(run_name="")
        except (EmbedtrainError, OSError):
            continue
    return None


def status_view(st, plots: bool = True) -> dict:
    """A JobStatus as the strings and frames the page shows (`plots=False`: only the text parts)."""
    if st.state == "idle":
        return dict(progress="No job running. Fill the form and press **Train**.", loss=plot_frames([])[0],
                    lr=plot_frames([])[1], previews=[], files=[], run="", running=False, summary="")
    head = {"running": "Training", "finished": "Finished", "stopped": "Stopped", "failed": "Failed",
            "crashed": "Crashed"}.get(st.state, st.state)
    lines = [f"**{head}: {st.name}**", f"`{_bar(st.update, st.weight_updates)}`  update {st.update} / "
             f"{st.weight_updates or '?'}"]
    if st.state == "running" and not st.weight_updates:
        lines[-1] = "starting: loading the model and encoding the images (the first update follows)"
    elif st.state == "running":
        lines[-1] += f" · ETA {_fmt_eta(st.eta_s)}"
    if st.loss is not None:
        lines.append(f"loss {st.loss:.4f}" + (f" · validation loss {float(st.val_loss):.4f}"
                                              if st.val_loss not in (None, "") else ""))
    if st.stopping:
        lines.append("**Stopping:** the current update finishes, then a resumable state is saved")
    message = st.message
    if st.state == "stopped":   # the trainer's message names the CLI flag; on this page the button does it
        message = message.split("; resume with")[0] + ". Press **Resume** to continue it."
    if message:
        lines.append(("**Error:** " if st.state in ("failed", "crashed") else "") + message.replace("\n", "  \n"))
    text = dict(progress="  \n".join(lines), running=st.state == "running", summary=st.summary)
    if not plots:
        return text
    loss, lr = plot_frames(st.rows)
    run = Path(st.run_dir) if st.run_dir else None
    # only regular files inside the run folder: a planted `x.json -> /etc/passwd` must not be handed out
    files = servable_files(sorted(str(p) for p in [*run.glob("*"), *run.glob("diffusers/*.safetensors")]
                                  if p.suffix in (".safetensors", ".pt", ".json", ".csv", ".bin")), run) if run else []
    previews = [(p, preview_caption(p)) for p in servable_files(st.previews[-8:][::-1], run)] if run else []
    return dict(progress="  \n".join(lines), loss=loss, lr=lr, previews=previews, files=files,
                run=st.run_dir, running=st.state == "running", summary=st.summary)


def history_frame(jobs) -> pd.DataFrame:
    rows = []
    for st in jobs.history()[:50]:
        rows.append({"run": Path(st.run_dir).name, "embedding": st.name, "state": st.state,
                     "updates": f"{st.update}/{st.weight_updates}",
                     "final loss": None if st.loss is None else round(st.loss, 4),
                     "validation loss": None if st.val_loss in (None, "") else round(float(st.val_loss), 4)})
    return pd.DataFrame(rows, columns=["run", "embedding", "state", "updates", "final loss", "validation loss"])


def history_markdown(frame: pd.DataFrame) -> str:
    """The run history as a Markdown table: it wraps to the column's width (a data grid in a closed
    accordion was drawn cut off on the right, and at times without its rows)."""
    if frame.empty:
        return "No runs yet."
    def cell(v):
        return "–" if v is None or v != v else str(v).replace("|", "\\|")
    head = "| run | state | updates | last loss | val. loss |\n|---|---|---|---|---|\n"
    return head + "\n".join(f"| `{r['run']}` | {r['state']} | {r['updates']} | {cell(r['final loss'])} | "
                             f"{cell(r['validation loss'])} |" for _, r in frame.iterrows())


# ---------------------------------------------------------------- the tab

def build(ctx) -> None:
    cfg = default_config(ctx)
    c: dict = {}    # the form: one component per TrainConfig field (FIELDS)
    ui: dict = {}   # everything else, by name
    with gr.Row():
        with gr.Column(scale=3):
            _model_and_data(ctx, cfg, c, ui)
            _length_and_lr(cfg, c, ui)
            _more_settings(cfg, c, ui)
        with gr.Column(scale=2):
            _status_column(ctx, ui)
    ctx.train.update(c)
    ctx.train_message = ui["message"]
    _wire_checks(ctx, c, ui)
    _wire_jobs(ctx, c, ui)
    _wire_poll(ctx, ui)
    _wire_settings_and_load(ctx, c, ui)


MODEL_INFO = ("'demo' (built in), a diffusers folder, a .safetensors/.ckpt file, or a Hugging Face hub id "
              "(org/name: downloaded once, then read from the cache)")


def model_box(ctx, value, elem_id: str, info: str = MODEL_INFO, **kw):
    """The model box of a tab: a textbox, or with --models-dir a dropdown of the models found there (labelled
    with their architecture, read from each file's header) that still takes any typed source. Its choices
    are refreshed on every page load (new files; a .ckpt's architecture once read)."""
    lib = ctx.model_library()
    if lib is None:
        return gr.Textbox(value, label="Model", info=info, elem_id=elem_id, **kw)
    box = gr.Dropdown(ctx.model_choices(lib), value=value, label="Model", allow_custom_value=True, filterable=True,
                      info=f"{info}. Models folder: {lib.summary()}", elem_id=elem_id, **kw)
    ctx.on_load.append((lambda: gr.update(choices=ctx.model_choices()), None, box))
    return box


def _model_and_data(ctx, cfg, c: dict, ui: dict) -> None:
    with gr.Row():
        c["model"] = model_box(ctx, cfg.model, "train-model", scale=4)
        ui["load_btn"] = gr.Button("Load", scale=1, size="sm")
    ui["model_info"] = gr.Markdown("", elem_id="model-info", label="model")
    ui["check_model"] = gr.Markdown("", elem_id="check-model")
    with gr.Row():
        c["data"] = gr.Textbox(cfg.data, label="Dataset folder", scale=4,
                               info="images (png/jpg/webp/bmp) with optional caption .txt files")
    ui["data_info"] = gr.Markdown("", elem_id="data-info")
    ui["check_data"] = gr.Markdown("", elem_id="check-data")
    ui["thumbs"] = gr.Gallery(label="Dataset", columns=8, height=120, allow_preview=False, show_label=False)
    with gr.Row():
        c["name"] = gr.Textbox(cfg.name, label="Embedding name", info="also the word you write in prompts")
        c["init_text"] = gr.Textbox(cfg.init_text, label="Initialization text")
        c["vectors"] = gr.Number(cfg.vectors, label="Vectors per token", precision=0, minimum=1, maximum=75,
                                 info=INFO["vectors"])
        c["template"] = gr.Dropdown(list(TEMPLATES), value=cfg.template, label="Prompt template",
                                    allow_custom_value=True)
    ui["check_name"] = gr.Markdown("", elem_id="check-name")
    with gr.Row():
        c["init_embedding"] = gr.Textbox(cfg.init_embedding, label="Start from embedding", scale=3,
                                         placeholder="empty: start from the initialization text",
                                         info=INFO["init_embedding"], elem_id="init-embedding")
        box = encoders_box(cfg.model)   # fixed at 'both' while the model is SD 1.x/2.x
        c["train_encoders"] = gr.Dropdown(list(TRAIN_ENCODERS), value=cfg.train_encoders,
                                          label="Text encoders trained (SDXL)", info=box["info"],
                                          interactive=box["interactive"], elem_id="train-encoders", scale=2)
    ui["check_init"] = gr.Markdown("", elem_id="check-init")


def _length_and_lr(cfg, c: dict, ui: dict) -> None:
    with gr.Row():
        c["batch_size"] = gr.Number(cfg.batch_size, label="Batch size", precision=0, minimum=1,
                                    info=INFO["batch_size"])
        c["grad_accum"] = gr.Number(cfg.grad_accum, label="Gradient accumulation steps", precision=0,
                                    minimum=1, info=INFO["grad_accum"])
        c["steps"] = gr.Number(cfg.steps, label="Max steps", precision=0, minimum=1, info=INFO["steps"])
        c["step_unit"] = gr.Radio(list(STEP_UNITS), value=cfg.step_unit, label="Steps count",
                                  info=INFO["step_unit"])
    ui["derived"] = gr.Markdown("", elem_id="derived", elem_classes="et-derived")
    ui["check_plan"] = gr.Markdown("", elem_id="check-plan")
    with gr.Row():
        c["lr"] = gr.Textbox(str(cfg.lr), label="Learning rate", info=INFO["lr"])
        c["lr_schedule"] = gr.Dropdown(SCHEDULES, value=cfg.lr_schedule, label="LR schedule")
        c["optimizer"] = gr.Dropdown(list(OPTIMIZERS), value=cfg.optimizer, label="Optimizer",
                                     info="dadapt_adam / prodigy / schedulefree_adamw find their own "
                                          "step size (use LR 1.0)")
    with gr.Accordion("Schedule parameters", open=False):
        with gr.Row():
            c["lr_piecewise"] = gr.Textbox(cfg.lr_piecewise, label="Piecewise (A1111 syntax)",
                                           placeholder="0.005:100, 1e-3:1000, 1e-5")
            c["lr_warmup"] = gr.Number(cfg.lr_warmup, label="Warmup (updates)", precision=0, minimum=0)
            c["lr_min"] = gr.Number(cfg.lr_min, label="Min LR (end of decay / bottom of cycle)", minimum=0)
        with gr.Row():
            c["lr_cycles"] = gr.Number(cfg.lr_cycles, label="Cycles", minimum=0)
            c["lr_step_size"] = gr.Number(cfg.lr_step_size, label="Cycle step size (updates per half "
                                          "cycle, 0 = derive)", precision=0, minimum=0)
            c["lr_step_size_epochs"] = gr.Number(cfg.lr_step_size_epochs, label="Step size as k x epoch",
                                                 minimum=0)
            c["lr_cycle_start"] = gr.Radio(["low", "high"], value=cfg.lr_cycle_start, label="Cycle starts")
        with gr.Row():   # every schedule field is reachable from the page (exp_range ran as triangular)
            c["lr_power"] = gr.Number(cfg.lr_power, label="Polynomial power", minimum=0,
                                      info="polynomial: 1 = linear decay")
            c["lr_gamma"] = gr.Number(cfg.lr_gamma, label="exp_range gamma", minimum=0,
                                      info="amplitude x gamma^update; 1 = triangular")
            c["lr_cycle_decay"] = gr.Textbox(cfg.lr_cycle_decay, label="Stepped top: cycles per stage",
                                             placeholder="3,2,1.5")
            c["lr_decay_factor"] = gr.Number(cfg.lr_decay_factor, label="Stepped top: factor per stage",
                                             minimum=0)
            c["lr_extend"] = gr.Checkbox(cfg.lr_extend, label="Hold the last piecewise LR to the end",
                                         info="instead of refusing a schedule shorter than the run")
        with gr.Row():
            c["lr_pct_start"] = gr.Number(cfg.lr_pct_start, label="one_cycle: rising part", minimum=0, maximum=1,
                                          info="fraction of the run spent rising to the LR")
            c["lr_div_factor"] = gr.Number(cfg.lr_div_factor, label="one_cycle: start = LR / this", minimum=1)
            c["lr_final_div_factor"] = gr.Number(cfg.lr_final_div_factor, label="one_cycle: end = start / this",
                                                 minimum=1)
    ui["schedule_plot"] = gr.LinePlot(x="update", y="lr", title="Learning rate schedule (preview)", height=200,
                                      x_title="weight update", y_title="learning rate")
    ui["schedule_desc"] = gr.Markdown("")


def _more_settings(cfg, c: dict, ui: dict) -> None:
    with gr.Accordion("Validation, saving, previews, seed", open=False):
        with gr.Row():
            c["val_split"] = gr.Number(cfg.val_split, label="Validation split", minimum=0, maximum=0.9,
                                       info=INFO["val_split"])
            c["val_every"] = gr.Number(cfg.val_every, label="Validation every (updates)", precision=0, minimum=0)
            c["save_every"] = gr.Number(cfg.save_every, label="Save a snapshot every (updates)", precision=0,
                                        minimum=0)
            c["preview_every"] = gr.Number(cfg.preview_every, label="Preview every (updates)", precision=0,
                                           minimum=0)
        with gr.Row():
            c["preview_prompt"] = gr.Textbox(cfg.preview_prompt, label="Preview prompt")
            c["seed"] = gr.Number(cfg.seed, label="Seed", precision=0)
            c["resolution"] = gr.Number(cfg.resolution, label="Resolution (px)", precision=0, minimum=0, step=8,
                                        info=INFO["resolution"])
            c["flip"] = gr.Checkbox(cfg.flip, label="Random horizontal flip")
            c["run_name"] = gr.Textbox("", label="Run folder name", placeholder="NAME-date-time")
    _recipe_settings(cfg, c)
    with gr.Accordion("Settings file", open=False):
        with gr.Row():
            ui["save_cfg"] = gr.Button("Save settings as JSON", size="sm")
            ui["cfg_file"] = gr.File(label="Settings JSON (download, or drop one here to load it)",
                                     file_types=[".json"], elem_id="settings-file")


def _recipe_settings(cfg, c: dict) -> None:
    """RECIPE_FIELDS: caption shuffling and dropout, the loss options, the files written and the logs."""
    with gr.Accordion("Captions, loss and outputs", open=False, elem_id="recipe"):
        with gr.Row():
            c["shuffle_tags"] = gr.Checkbox(cfg.shuffle_tags, label="Shuffle tags", info=INFO["shuffle_tags"])
            c["keep_tokens"] = gr.Number(cfg.keep_tokens, label="Keep tokens (tags)", precision=0, minimum=0,
                                         info=INFO["keep_tokens"])
            c["tag_dropout"] = gr.Number(cfg.tag_dropout, label="Tag dropout", minimum=0, maximum=1, step=0.05,
                                         info=INFO["tag_dropout"])
            c["caption_dropout"] = gr.Number(cfg.caption_dropout, label="Caption dropout", minimum=0, maximum=1,
                                             step=0.05, info=INFO["caption_dropout"])
        with gr.Row():
            c["noise_offset"] = gr.Number(cfg.noise_offset, label="Noise offset", minimum=0, maximum=1, step=0.01,
                                          info=INFO["noise_offset"])
            c["min_snr_gamma"] = gr.Number(cfg.min_snr_gamma, label="Min-SNR gamma", minimum=0, step=1,
                                           info=INFO["min_snr_gamma"])
        with gr.Row():
            c["save_formats"] = gr.CheckboxGroup(list(SAVE_FORMATS), value=cfg.formats(), label="Save formats",
                                                 info=INFO["save_formats"], elem_id="save-formats")
            c["report_to"] = gr.Radio(["none", *(r for r in REPORT_TO if r)], value=cfg.report_to or "none",
                                      label="Also log to", info=INFO["report_to"], elem_id="report-to")


def _status_column(ctx, ui: dict) -> None:
    with gr.Row():
        ui["train_btn"] = gr.Button("Train", variant="primary", elem_id="train-button", scale=3)
        ui["stop_btn"] = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1, interactive=False)
        ui["resume_btn"] = gr.Button("Resume", elem_id="resume-button", scale=1, interactive=False)
    ui["form_check"] = gr.Markdown("", elem_id="form-check")
    ui["message"] = gr.Markdown("", elem_id="train-message", label="message")
    ui["form_ok"] = gr.State(True)     # this page's form passes the checks (Train may start)
    ui["seen"] = gr.State("")          # the job state this page last drew (a change clears old messages)
    ui["progress"] = gr.Markdown("", elem_id="progress", label="progress")
    ui["loss_plot"] = gr.LinePlot(x="update", y="value", color="series", title="Loss", height=320, label="loss",
                                  color_map=SERIES_COLORS, x_title="weight update", y_title="loss",
                                  elem_id="loss-plot")
    ui["lr_plot"] = gr.LinePlot(x="update", y="lr", color="series", title="Learning rate", height=220,
                                color_map=SERIES_COLORS, label="learning rate", x_title="weight update",
                                elem_id="lr-plot")
    gr.Markdown(PLOT_KEY, elem_id="plot-key")
    ui["previews"] = gr.Gallery(label="Latest previews (update · prompt · seed)", columns=4, height=260,
                                object_fit="contain", elem_id="previews")
    ui["run_dir"] = gr.Textbox(label="Run folder", interactive=False, elem_id="run-dir")
    ui["files"] = gr.File(label="Files written", file_count="multiple", interactive=False, elem_id="run-files")
    with gr.Accordion("Run summary", open=False):
        ui["summary"] = gr.Code(label="Running training", language=None, interactive=False, wrap_lines=True)
    with gr.Accordion("Run history", open=False):
        ui["refresh_hist"] = gr.Button("Refresh", size="sm")
        ui["history"] = gr.Markdown(history_markdown(history_frame(ctx.jobs)), elem_id="history",
                                    label="Run history")
        ui["resume_pick"] = gr.Dropdown([], label="Run to resume / open", allow_custom_value=False)


def _values_of(args) -> dict:
    return dict(zip(FIELDS, args))


def _check_outputs(ui: dict) -> list:
    return [ui["derived"], ui["schedule_plot"], ui["schedule_desc"], *(ui[f"check_{k}"] for k in CHECK_SLOTS),
            ui["form_check"], ui["form_ok"]]


def _checked(ctx, values: dict, labels: dict) -> tuple:
    """What _check_outputs show for the form's values: derived numbers, schedule preview, problems."""
    frame, desc = schedule_frame(ctx, values)
    slots, bad = form_checks(ctx, values, labels)
    told = f"Train is off until the form is fixed: {', '.join(bad)}" if bad else ""
    return (derived_text(ctx, values) if not bad else "", frame, desc if not bad else "",
            *(slots[k] for k in CHECK_SLOTS), told, not bad)


def _wire_checks(ctx, c: dict, ui: dict) -> None:
    """Before training: the checks, derived numbers and schedule preview on every change; dataset view; Load."""
    inputs = [c[k] for k in FIELDS]
    labels = {k: comp.label for k, comp in c.items()}
    gr.on([c[k].change for k in FIELDS], lambda *args: _checked(ctx, _values_of(args), labels), inputs,
          _check_outputs(ui), show_progress="hidden", api_visibility="private")
    c["data"].change(lambda folder: dataset_view(folder, ctx), c["data"], [ui["data_info"], ui["thumbs"]],
                     show_progress="hidden", api_name="dataset_view", api_visibility="private")
    c["init_embedding"].change(vectors_box, c["init_embedding"], c["vectors"], show_progress="hidden",
                               api_visibility="private")
    c["model"].change(encoders_box, c["model"], c["train_encoders"], show_progress="hidden", api_visibility="private")

    def load_model(source):
        from embedtrain import models
        try:
            _, info = models.load_pipeline(source.strip())
        except EmbedtrainError as e:
            return f"Error: {e}"
        return f"Loaded **{info.describe()}**"

    ui["load_btn"].click(load_model, c["model"], ui["model_info"], api_name="load_model")


def _wire_jobs(ctx, c: dict, ui: dict) -> None:
    """Train, Stop, Resume (also the API's /train, /stop, /resume)."""
    def start(*args):
        try:
            run = ctx.jobs.start(form_config(ctx, _values_of(args)))
        except EmbedtrainError as e:
            return f"Error: {e}"
        return f"Started: `{run}`"

    def stop():
        said = ctx.jobs.stop()
        return "" if said.startswith("stopping") else said   # the progress line says "Stopping" while it is

    def resume(pick):
        runs = {Path(st.run_dir).name: st.run_dir for st in ctx.jobs.history()}
        target = runs.get(pick or "")
        if not target:
            stopped = [st for st in ctx.jobs.history() if st.state == "stopped"]
            if not stopped:
                return "Error: no stopped run to resume"
            target = stopped[0].run_dir
        try:
            run = ctx.jobs.start(None, resume_dir=target)
        except EmbedtrainError as e:
            return f"Error: {e}"
        return f"Resumed: `{run}`"

    # API callers see /train's parameters by their config names (model, data, name, ...), not param_0..28.
    api_parameters(start, FIELDS)
    ui["train_btn"].click(start, [c[k] for k in FIELDS], ui["message"], api_name="train")
    ui["stop_btn"].click(stop, None, ui["message"], api_name="stop")
    ui["resume_btn"].click(resume, ui["resume_pick"], ui["message"], api_name="resume")


def _wire_poll(ctx, ui: dict) -> None:
    """Every open page polls once a second. They share one view per state of the run, and its heavy
    parts (plots, previews, files) are rebuilt at most every PLOT_REFRESH_S while a job runs: twenty
    open pages cost the job a few percent (bench/bench_polling.py). What differs per page (its form is
    valid, the job state it drew last) comes in as gr.State, which costs nothing to send."""
    view = {"key": None, "light": None, "heavy": None, "heavy_key": None, "built": 0.0, "history": None}
    view_lock = threading.Lock()

    def poll(ok, seen):
        st = ctx.jobs.status()
        key = (st.run_dir, st.state, st.update, len(st.rows), len(st.previews), st.message, st.weight_updates,
               st.stopping)
        with view_lock:
            if view["key"] != key:
                heavy_key = (st.run_dir, st.state, len(st.previews), st.message)
                due = time.monotonic() - view["built"] >= PLOT_REFRESH_S
                v = status_view(st, plots=heavy_key != view["heavy_key"] or due or not st.running)
                if view["key"] is None or view["key"][:2] != key[:2]:   # a job started or ended
                    view["history"] = history_frame(ctx.jobs)
                resumable = not st.running and "stopped" in set(view["history"]["state"])
                view["light"] = (v["progress"], v["summary"], st.running, resumable)
                if "loss" in v:
                    view["heavy"] = (v["loss"], v["lr"], v["previews"], v["run"], v["files"] or None)
                    view["heavy_key"], view["built"] = heavy_key, time.monotonic()
                view["key"] = key
            progress_, summary_, running, resumable = view["light"]
            heavy, hist = view["heavy"], view["history"]
        drawn = f"{st.run_dir}|{st.state}"
        changed = drawn != seen
        return (progress_, *heavy, summary_,
                gr.update(interactive=bool(ok) and not running), gr.update(interactive=running),
                gr.update(interactive=resumable),
                history_markdown(hist) if changed else gr.skip(),
                gr.update(choices=list(hist["run"])) if changed else gr.skip(),
                "" if changed and seen and not running else gr.skip(),   # "stopping ..." ends with the job
                drawn)

    outputs = [ui[k] for k in ("progress", "loss_plot", "lr_plot", "previews", "run_dir", "files", "summary",
                               "train_btn", "stop_btn", "resume_btn", "history", "resume_pick", "message", "seen")]
    gr.Timer(1.0).tick(poll, [ui["form_ok"], ui["seen"]], outputs, show_progress="hidden", api_name="status")

    def refresh_history():
        frame = history_frame(ctx.jobs)
        return history_markdown(frame), gr.update(choices=list(frame["run"]))

    ui["refresh_hist"].click(refresh_history, None, [ui["history"], ui["resume_pick"]], api_visibility="private")

    def open_run(pick):
        if not pick:
            return gr.update(), gr.update()
        try:
            run = ctx.inside_outputs(ctx.outputs / pick)
        except ValueError as e:
            return f"Error: {e}", None
        v = status_view(ctx.jobs.status(str(run)))
        return v["run"], ctx.servable(v["files"]) or None   # no symlink out of outputs, nothing but files

    ui["resume_pick"].change(open_run, ui["resume_pick"], [ui["run_dir"], ui["files"]], api_visibility="private")


def _wire_settings_and_load(ctx, c: dict, ui: dict) -> None:
    """The settings JSON (save / load), and the first paint of every page (open or reload)."""
    inputs = [c[k] for k in FIELDS]
    labels = {k: comp.label for k, comp in c.items()}

    def save_settings(*args):
        try:
            cfg_ = form_config(ctx, _values_of(args))
        except EmbedtrainError as e:
            return None, f"Error: {e}"
        folder = ctx.outputs / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{cfg_.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        cfg_.save(path)
        return str(path), f"Saved settings to `{path}`"

    def load_settings(file):
        if file is None:
            return [gr.update() for _ in FIELDS] + [""]
        path = file if isinstance(file, str) else getattr(file, "name", "")
        try:
            loaded = TrainConfig.load(path)
        except EmbedtrainError as e:
            return [gr.update() for _ in FIELDS] + [f"Error: {e}"]
        return form_values(loaded) + [f"Loaded settings from {Path(path).name}"]

    ui["save_cfg"].click(save_settings, inputs, [ui["cfg_file"], ui["message"]], api_visibility="private")
    ui["cfg_file"].upload(load_settings, ui["cfg_file"], inputs + [ui["message"]], api_visibility="private")

    def on_load(*args):
        # A page opened while a job runs shows that job's settings, not the defaults.
        running = running_config(ctx.jobs)
        form = form_values(running) if running else [gr.update() for _ in FIELDS]
        if running:
            args = form
        values = _values_of(args)
        text, pics = dataset_view(values["data"], ctx)
        frame_h = history_frame(ctx.jobs)
        return (*_checked(ctx, values, labels), text, pics, history_markdown(frame_h),
                gr.update(choices=list(frame_h["run"])), *form)

    ctx.on_load.append((on_load, inputs, [*_check_outputs(ui), ui["data_info"], ui["thumbs"], ui["history"],
                                          ui["resume_pick"], *inputs]))
