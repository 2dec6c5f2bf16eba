"""Grid tab: seed-locked comparison grids of embeddings from the run history, and the steps-vs-GA study.

The page never renders itself: Render starts `python -m embedtrain grid ... --progress json` (Study:
`python -m embedtrain study ...`) in its own process and follows its JSON lines, so torch is never
imported by the web server and a crash cannot take the page down. Only files inside the outputs folder
are offered, read or written (with --models-dir, the files of its embeddings folders are offered and read
too). The pure helpers (embedding_choices, grid_command, study_command, settings_of) are tested without a
browser.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import gradio as gr

from embedtrain import EmbedtrainError
from embedtrain.config import model_cfg_scale
from embedtrain.fileio import is_embedding_file
from embedtrain.grid import (DEFAULT_PROMPTS, SAMPLERS, GridError, GridSettings, parse_pair, default_out,
                             parse_prompts, parse_seeds)
from embedtrain.ui.context import api_parameters
from embedtrain.ui.jobs import Job, job_alive, tail

BASELINES = ["none", "init text", "no embedding", "this text"]
# The Train tab inputs "Use these settings" fills from a run's config.json (those that exist are used).
SEND = ("model", "data", "name", "init_text", "vectors", "batch_size", "grad_accum", "steps", "step_unit", "lr",
        "lr_schedule", "lr_min", "lr_step_size", "lr_step_size_epochs", "lr_cycles", "lr_cycle_start",
        "optimizer", "seed", "resolution", "val_split", "shuffle_tags", "keep_tokens", "tag_dropout", "caption_dropout",
        "noise_offset", "min_snr_gamma")
GRID_FIELDS = ["model", "picked", "extra", "prompts", "seeds", "sample_steps", "cfg_scale", "sampler", "width",
               "height", "negative_prompt", "baseline", "baseline_text", "swap_axes", "legend", "margin",
               "demo_scores"]
STUDY_FIELDS = ["data", "name", "init_text", "low", "high", "low_steps", "high_steps", "step_unit", "lr",
                "val_split", "seed"]


# ------------------------------------------------------------------ pure helpers
def embedding_choices(outputs: Path, limit: int = 300) -> list[str]:
    """Embedding files under the outputs folder (final files, snapshots, A1111 embedding PNGs; not previews,
    grids or resume states), newest first, as relative paths."""
    outputs = Path(outputs)
    if not outputs.is_dir():
        return []
    found = []
    for p in outputs.rglob("*"):
        rel = p.relative_to(outputs)
        if (p.name != "resume.pt" and not any(part.startswith(".") for part in rel.parts)
                and is_embedding_file(p)):
            try:
                found.append((p.stat().st_mtime, rel.as_posix()))
            except OSError:  # deleted meanwhile (a run cleaning up)
                continue
    return [rel for _, rel in sorted(found, reverse=True)[:limit]]


def grid_embedding_choices(ctx) -> list[tuple[str, str]]:
    """The embeddings the Grid tab offers, as (label, value): the outputs folder's (embedding_choices; value the
    path relative to it), then the files in the --models-dir embeddings folders (value the absolute path;
    label "webui/embeddings/NAME.safetensors")."""
    choices = [(c, c) for c in embedding_choices(ctx.outputs)]
    lib = ctx.model_library()
    for path in (lib.embeddings if lib is not None else []):
        folder = next((d for d in lib.embedding_dirs if d in path.parents), path.parent)
        label = f"{folder.parent.name}/{folder.name}/{path.relative_to(folder).as_posix()}"
        choices.append((label, str(path)))
    return choices


def _readable_embedding(ctx, p: Path) -> Path:
    """An embedding path the grid may read: inside the outputs folder, or inside a --models-dir embeddings
    folder (and one the web UI may read); else the outputs folder's refusal, naming the path."""
    from embedtrain.library import inside, places
    emb_dirs = [d for folder in ctx.models_dirs for d in places(folder)[1]]
    if emb_dirs and inside(p, emb_dirs):
        return ctx.allowed_folder(p, "embedding file", "picked")
    return ctx.inside_outputs(p)


def _files(ctx, picked, extra: str) -> list[Path]:
    paths = [ctx.outputs / p for p in (picked or [])]   # an absolute path (a models folder's) stays itself
    for line in str(extra or "").splitlines():
        if line.strip():
            p = Path(line.strip()).expanduser()
            paths.append(p if p.is_absolute() else ctx.outputs / p)
    files = []
    for p in paths:
        p = _readable_embedding(ctx, p)  # raises, naming the path, for anything outside outputs and the models dirs
        if not p.is_file():
            raise GridError(f"embedding file {p} does not exist")
        files.append(p)
    return files


def _number(v, name: str, kind=int):
    try:
        x = float(v)
        return int(x) if kind is int and x.is_integer() else kind(x)
    except (TypeError, ValueError):
        raise GridError(f"{name} must be a number, got {v!r}") from None


def _grid_flags(v: dict, baseline_flag: bool = True) -> list[str]:
    """Grid CLI flags from the form; checks everything first (errors name the field)."""
    prompts = parse_prompts(v.get("prompts", ""))
    seeds = parse_seeds(v.get("seeds", ""))
    s = GridSettings(prompts=prompts, seeds=seeds, sample_steps=_number(v.get("sample_steps"), "sample_steps"),
                     cfg_scale=_number(v.get("cfg_scale"), "cfg_scale", float), sampler=v.get("sampler") or "default",
                     width=_number(v.get("width") or 0, "width"), height=_number(v.get("height") or 0, "height"),
                     margin=_number(v.get("margin") or 0, "margin")).validate()
    for p in prompts:
        if p.startswith("-"):
            raise GridError(f"prompts: {p!r} must not start with '-'")
    argv = ["--prompts", *prompts, "--seeds", *map(str, seeds), "--sample-steps", str(s.sample_steps),
            "--cfg-scale", str(s.cfg_scale), "--sampler", s.sampler, "--width", str(s.width), "--height",
            str(s.height), "--margin", str(s.margin), "--progress", "json"]
    if v.get("negative_prompt", "").strip():
        argv += ["--negative-prompt=" + v["negative_prompt"].strip()]
    if v.get("swap_axes"):
        argv.append("--swap-axes")
    if v.get("legend") is False:
        argv.append("--no-legend")
    if v.get("demo_scores"):
        argv.append("--demo-scores")
    baseline = v.get("baseline") or "none"
    if baseline not in BASELINES:
        raise GridError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    text = str(v.get("baseline_text") or "").strip()
    if baseline == "this text" and not text:
        raise GridError("baseline_text must hold the words to put in place of the embedding (e.g. the init text)")
    if baseline_flag:
        argv += {"none": [], "init text": ["--baseline"], "no embedding": ["--baseline="],
                 "this text": [f"--baseline={text}"]}[baseline]
    else:  # the study's flag: a value, 'none', or its default (the init text)
        argv += {"none": ["--baseline=none"], "init text": [], "no embedding": ["--baseline="],
                 "this text": [f"--baseline={text}"]}[baseline]
    return argv


def grid_command(ctx, v: dict) -> tuple[list[str], Path]:
    """(argv after `python -m embedtrain`, the grid PNG it will write) for the form's values."""
    files = _files(ctx, v.get("picked"), v.get("extra", ""))
    if not files and (v.get("baseline") or "none") == "none":
        raise GridError("embeddings: pick one or more embeddings (or type their paths inside the outputs folder)")
    model = str(v.get("model") or "").strip()
    if not model:
        raise GridError("model must be 'demo', a diffusers folder or a checkpoint file")
    out = default_out(ctx.outputs)
    argv = ["grid", "--model", model, "--out", str(out), *_grid_flags(v)]
    if files:
        argv[1:1] = ["--embeddings", *map(str, files)]
    return argv, out


def study_command(ctx, v: dict, grid_values: dict) -> tuple[list[str], Path]:
    """(argv, study folder) for the study form plus the grid form's prompts, seeds and sampler settings."""
    low, high = parse_pair(v.get("low", ""), "low"), parse_pair(v.get("high", ""), "high")
    data = str(v.get("data") or "").strip()
    if data:
        ctx.allowed_folder(data)   # refused alike whether or not it exists: the page must not probe the disk
    if not data or not Path(data).is_dir():
        raise GridError(f"data must be a folder of training images, got {data!r}")
    name = str(v.get("name") or "").strip() or "study"
    folder = ctx.inside_outputs(ctx.outputs / f"study-{time.strftime('%Y%m%d-%H%M%S')}")
    argv = ["study", "--model", str(grid_values.get("model") or "demo").strip(), "--data", data, "--name", name,
            "--low", f"{low[0]},{low[1]}", "--high", f"{high[0]},{high[1]}",
            "--low-steps", str(_number(v.get("low_steps"), "low_steps")),
            "--high-steps", str(_number(v.get("high_steps"), "high_steps")),
            "--step-unit", str(v.get("step_unit") or "batch"), "--study-out", str(folder)]
    for key, flag in (("init_text", "--init-text"), ("lr", "--lr"), ("val_split", "--val-split"), ("seed", "--seed")):
        val = v.get(key)
        if val not in (None, ""):
            argv += [flag, str(val)]
    return argv + _grid_flags(grid_values, baseline_flag=False), folder


def settings_of(ctx, picked) -> dict:
    """The training settings of the first picked embedding's run (its config.json), for the Train tab."""
    from embedtrain.config import TrainConfig
    if not picked:
        raise GridError("pick an embedding first: its run's settings are sent to the Train tab")
    path = ctx.inside_outputs(ctx.outputs / picked[0])
    for name in ("config.json", "job.json"):
        if (path.parent / name).is_file():
            cfg = TrainConfig.load(path.parent / name)
            return {k: (str(getattr(cfg, k)) if k == "lr" else getattr(cfg, k)) for k in SEND}
    raise GridError(f"{picked[0]} has no config.json beside it: it was not trained by embedtrain here")


# ------------------------------------------------------------------ the render process
class Runner:
    """Grids and studies: the web UI's "grid" Job (one job of any kind at a time per outputs folder).

    The process runs in its own session and writes its JSON events to grids/.job-events.jsonl (stderr to
    grids/.last-render.log), so it outlives a restarted web server, and a page opened later (or after the
    restart) finds it through `job_view` and follows the same file."""

    def __init__(self, outputs: Path):
        self.outputs = Path(outputs)
        self.job = Job(outputs, "grid")
        self.lock = threading.Lock()
        self.events = self.outputs / "grids" / ".job-events.jsonl"
        self.log = self.outputs / "grids" / ".last-render.log"

    def _result_in(self) -> bool:
        events = list(follow_events(self.events, lambda: False))
        return bool(events) and events[-1].get("event") in ("done", "error")

    def stream(self, argv: list[str]):
        """Start `python -m embedtrain ARGV` and yield its JSON events until its result is in.

        Once the process has sent `done` or `error` the generator ends at once; the process's own
        teardown (freeing the model, interpreter exit) is waited for on a background thread, so the
        page's event finishes with the result and the next Render is accepted straight away (a process
        still tearing down after its result is ended then).
        """
        with self.lock:
            old = self.job.running()
            if old and self._result_in():   # its result is in: it is only tearing down
                self.job.slot.signal(old, signal.SIGKILL)
                deadline = time.time() + 10
                while job_alive(old) and time.time() < deadline:
                    time.sleep(0.05)
            self.events.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.job.start(argv, self.events, stderr=self.log, name=argv[0])
            except EmbedtrainError as e:
                raise GridError(str(e)) from None
            proc = self.job.proc
        for ev in follow_events(self.events, lambda: proc.poll() is None):
            if ev.get("event") in ("done", "error"):
                threading.Thread(target=proc.wait, daemon=True).start()
            yield ev
            if ev.get("event") in ("done", "error"):
                return
        rc = proc.wait()
        last = tail(self.log, 1500)
        yield {"event": "error", "message": f"the render process ended with code {rc}"
               + (" (stopped)" if rc < 0 else "") + (f". Last output:\n{last}" if last.strip() else "")}

    def stop(self) -> str:
        return self.job.stop()

    def job_view(self) -> dict:
        """The last grid or study job as a page opened now sees it: running (with its latest progress
        line), finished (its result event), failed, or none. For pages that did not start it."""
        job = self.job.record()
        if not job:
            return {"state": "none"}
        events = list(follow_events(self.events, lambda: False))
        last = events[-1] if events else {}
        if job_alive(job) and last.get("event") not in ("done", "error"):
            what = "study" if job.get("name") == "study" else "grid"
            text = _progress_text(last) if last.get("event") == "progress" else "starting"
            return {"state": "running", "text": f"A {what} is running (started "
                    f"{time.strftime('%H:%M:%S', time.localtime(job.get('started', 0)))}): {text}"}
        if last.get("event") == "done":
            return {"state": "done", "event": last}
        return {"state": "failed", "text": last.get("message") or tail(self.log, 1500)}


def follow_events(path: Path, alive, poll_s: float = 0.1):
    """The JSON events written to `path`, one per complete line, as they come; ends at a `done` or `error`
    event, or once `alive()` is false and nothing more is in the file."""
    pos, pending = 0, b""
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        pos += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                ev = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(ev, dict):
                yield ev
                if ev.get("event") in ("done", "error"):
                    return
        if not chunk and not alive():
            return
        if not chunk:
            time.sleep(poll_s)


def _progress_text(ev: dict) -> str:
    return f"{ev['message']} ({ev['done']:.0f} of {ev['total']})"


# ------------------------------------------------------------------ layout and wiring
def _grid_form(ctx) -> dict:
    """The grid's settings (GRID_FIELDS, as components) and its buttons."""
    from embedtrain.ui.train_tab import model_box
    ui = {"model": model_box(ctx, ctx.model, "grid-model", info="'demo', a diffusers folder or a checkpoint file")}
    with gr.Row():
        where = " and the models folders' embeddings" if ctx.models_dirs else ""
        ui["picked"] = gr.CheckboxGroup(grid_embedding_choices(ctx), label="Embeddings from the outputs folder "
                                        f"(runs, snapshots, studies; newest first){where}", elem_id="grid-embeddings",
                                        scale=4)
        ui["refresh"] = gr.Button("Refresh", size="sm", scale=0, min_width=90, elem_id="grid-refresh")
    ui["extra"] = gr.Textbox(label="More embedding files", lines=2, elem_id="grid-extra",
                             info="paths inside the outputs folder, one per line")
    ui["prompts"] = gr.Textbox("\n".join(DEFAULT_PROMPTS), label="Prompts (one per line)", lines=3,
                               elem_id="grid-prompts")
    ui["seeds"] = gr.Textbox("1 2", label="Seeds", info="e.g. 1 2 3 or 1-4; one row per prompt and seed",
                             elem_id="grid-seeds")
    with gr.Row():
        ui["sample_steps"] = gr.Number(20, label="Sampling steps", precision=0, minimum=1,
                                       elem_id="grid-sample-steps")
        ui["cfg_scale"] = gr.Number(model_cfg_scale(ctx.model), label="CFG scale", minimum=0, elem_id="grid-cfg",
                                    info=f"demo model: {model_cfg_scale('demo'):g}; Stable Diffusion: "
                                         f"{model_cfg_scale(''):g} is usual")
        ui["sampler"] = gr.Dropdown(list(SAMPLERS), value="default", label="Sampler", elem_id="grid-sampler")
    with gr.Row():
        ui["width"] = gr.Number(0, label="Width (0 = model's)", precision=0, minimum=0)
        ui["height"] = gr.Number(0, label="Height (0 = model's)", precision=0, minimum=0)
        ui["margin"] = gr.Number(0, label="Margin (px)", precision=0, minimum=0)
    ui["negative_prompt"] = gr.Textbox(label="Negative prompt")
    with gr.Row():
        ui["baseline"] = gr.Radio(BASELINES, value="none", label="Baseline column", elem_id="grid-baseline")
        ui["baseline_text"] = gr.Textbox(label="Baseline text", info="for 'this text'")
    with gr.Row():
        ui["swap_axes"] = gr.Checkbox(False, label="Swap axes (embeddings as rows)", elem_id="grid-swap")
        ui["legend"] = gr.Checkbox(True, label="Legend", elem_id="grid-legend")
        ui["demo_scores"] = gr.Checkbox(ctx.model == "demo", label="Demo scores (demo model: cells the judge "
                                        "reads as a purple star)", elem_id="grid-demo-scores")
    with gr.Row():
        ui["render_btn"] = gr.Button("Render grid", variant="primary", elem_id="grid-render")
        ui["stop_btn"] = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="grid-stop")
        ui["use_btn"] = gr.Button("Use these settings", scale=0, min_width=170, elem_id="grid-use")
    return ui


def _study_form(ctx) -> dict:
    """The steps-vs-GA study's settings (STUDY_FIELDS, as components) and its button."""
    ui = {}
    with gr.Accordion("Steps vs gradient accumulation study (gaST, gast, GAST, GAst)", open=False,
                      elem_id="grid-study"):
        gr.Markdown("Trains four embeddings with the same seed and data (two BS,GA settings x two run "
                    "lengths; lower case = low), then grids them with the prompts and seeds above and "
                    "writes the four pairwise comparisons of the 'Steps and GA' write-up (Guide tab) and a table.")
        with gr.Row():
            ui["data"] = gr.Textbox(ctx.data, label="Data folder", scale=3)
            ui["name"] = gr.Textbox("study", label="Name prefix")
            ui["init_text"] = gr.Textbox("star" if ctx.model == "demo" else "", label="Init text")
        with gr.Row():
            ui["low"] = gr.Textbox("13,2", label="Setting 1: BS,GA")
            ui["high"] = gr.Textbox("3,17", label="Setting 2: BS,GA")
            ui["low_steps"] = gr.Number(150, label="Low steps", precision=0)
            ui["high_steps"] = gr.Number(3000, label="High steps", precision=0)
        with gr.Row():
            ui["step_unit"] = gr.Radio(["batch", "update"], value="batch", label="Step unit")
            ui["lr"] = gr.Textbox("", label="LR (empty = model preset)")
            ui["val_split"] = gr.Number(0.0, label="Validation split")
            ui["seed"] = gr.Number(0, label="Seed", precision=0)
        ui["study_btn"] = gr.Button("Run study", variant="primary", elem_id="grid-study-run")
    return ui


def _results() -> dict:
    return {"status": gr.Markdown("", elem_id="grid-status", label="status"),
            "image": gr.Image(label="Grid", type="filepath", interactive=False, elem_id="grid-image"),
            "download": gr.File(label="Download", file_count="multiple", interactive=False, elem_id="grid-file"),
            "pairs": gr.Gallery(label="Study: pairwise comparisons", columns=2, height=320, visible=False,
                                elem_id="grid-pairs"),
            "table": gr.Dataframe(label="Study: runs", interactive=False, visible=False, elem_id="grid-table"),
            "timer": gr.Timer(1.0, active=False)}   # follows a job this page did not start (job_view)


def build(ctx) -> None:
    runner = Runner(ctx.outputs)
    gr.Markdown("Same prompts, same seeds, one column per embedding: every column starts from the same noise, "
                "so the only difference you see is the embedding. Write `{}` or `[name]` where the embedding goes.")
    with gr.Row():
        with gr.Column(scale=2):
            grid = _grid_form(ctx)
            study = _study_form(ctx)
        with gr.Column(scale=3):
            out = _results()
    _wire_render(ctx, runner, grid, study, out)
    _wire_use(ctx, grid, out)


def _grid_result(ctx, done: dict) -> tuple:
    """(status, image, files) for a finished grid's or study's `done` event."""
    grid = Path(done["grid"])
    if "pairs" in done:   # a study
        return (f"Study written to `{Path(done['folder']).relative_to(ctx.outputs)}/`", str(grid),
                ctx.servable([done["grid"], done["table"], *done["pairs"].values()]))
    cells = sorted(Path(done["folder"]).glob("*.png"))
    return (f"Wrote `{grid.relative_to(ctx.outputs)}`: {done['cells']} cells in {done['seconds']} s (plus the "
            f"model load); the cells are in `{Path(done['folder']).relative_to(ctx.outputs)}/`",
            str(grid), ctx.servable([done["grid"], *map(str, cells)]))


def _follow(runner: Runner, argv, progress):
    """Yield (status text, done event or None) while the process runs."""
    yield "Starting…", None
    for ev in runner.stream(argv):
        if ev["event"] == "progress":
            progress(min(1.0, ev["done"] / max(ev["total"], 1)), desc=ev["message"])
            yield _progress_text(ev), None
        elif ev["event"] == "error":
            yield f"**Error:** {ev['message']}", None
            return
        elif ev["event"] == "done":
            yield "", ev
            return


def _wire_render(ctx, runner: Runner, grid: dict, study_ui: dict, out: dict) -> None:
    """Refresh, Render, Stop and Run study."""
    grid_inputs = [grid[k] for k in GRID_FIELDS]
    study_inputs = [study_ui[k] for k in STUDY_FIELDS]
    status, image, download, pairs, table = (out[k] for k in ("status", "image", "download", "pairs", "table"))

    def do_refresh(current):
        choices = grid_embedding_choices(ctx)
        values = {v for _, v in choices}
        return gr.update(choices=choices, value=[c for c in (current or []) if c in values])

    grid["refresh"].click(do_refresh, grid["picked"], grid["picked"], show_progress="hidden",
                          api_name="grid_embeddings")

    def render(*args, progress=gr.Progress()):
        v = dict(zip(GRID_FIELDS, args))
        try:
            argv, _ = grid_command(ctx, v)
            for text, done in _follow(runner, argv, progress):
                yield (text, gr.update(), gr.update()) if done is None else _grid_result(ctx, done)
        except (EmbedtrainError, ValueError) as e:
            yield f"**Error:** {e}", gr.update(), gr.update()

    api_parameters(render, GRID_FIELDS)
    grid["render_btn"].click(render, grid_inputs, [status, image, download], api_name="grid", concurrency_limit=1)
    grid["stop_btn"].click(lambda: runner.stop(), None, status, api_name="grid_stop")

    def study(*args, progress=gr.Progress()):
        v = dict(zip(STUDY_FIELDS, args[:len(STUDY_FIELDS)]))
        g = dict(zip(GRID_FIELDS, args[len(STUDY_FIELDS):]))
        keep = (gr.update(),) * 4
        try:
            argv, _ = study_command(ctx, v, g)
            for text, done in _follow(runner, argv, progress):
                if done is None:
                    yield (text, *keep)
                    continue
                import pandas as pd
                frame = pd.read_csv(done["table"], dtype=str, keep_default_na=False)
                pair_items = [(p, name) for name, p in done["pairs"].items()]
                yield (*_grid_result(ctx, done), gr.update(value=pair_items, visible=True),
                       gr.update(value=frame, visible=True))
        except (EmbedtrainError, ValueError) as e:
            yield (f"**Error:** {e}", *keep)

    api_parameters(study, STUDY_FIELDS + GRID_FIELDS)
    study_ui["study_btn"].click(study, study_inputs + grid_inputs, [status, image, download, pairs, table],
                                api_name="study", concurrency_limit=1)
    # on (re)load only the choices change: what the user ticks meanwhile is kept
    ctx.on_load.append((lambda: gr.update(choices=grid_embedding_choices(ctx)), None, grid["picked"]))

    # A grid or study started by another page, or before the server restarted: follow it until its result.
    def follow_other(on_load: bool):
        v = runner.job_view()
        if v["state"] == "running":
            return v["text"], gr.skip(), gr.skip(), gr.Timer(active=True)
        if on_load:   # an old result or error is not news on every reload
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        if v["state"] == "done":
            return (*_grid_result(ctx, v["event"]), gr.Timer(active=False))
        return f"**Error:** {v.get('text', 'the grid ended without a result')}", gr.skip(), gr.skip(), \
            gr.Timer(active=False)

    watch = [status, image, download, out["timer"]]
    out["timer"].tick(lambda: follow_other(False), None, watch, show_progress="hidden", api_visibility="private")
    ctx.on_load.append((lambda: follow_other(True), None, watch))


def _wire_use(ctx, grid: dict, out: dict) -> None:
    """"Use these settings": the first picked embedding's training settings go to the Train tab."""
    targets = [(k, ctx.train[k]) for k in SEND if ctx.train.get(k) is not None]

    def use(chosen):
        try:
            settings = settings_of(ctx, chosen)
        except (EmbedtrainError, ValueError) as e:
            return [gr.update() for _ in targets] + ([gr.update()] if ctx.tabs is not None else []) + [
                f"**Error:** {e}"]
        return [settings[k] for k, _ in targets] + ([gr.Tabs(selected="train")] if ctx.tabs is not None else []) \
            + [f"Sent the settings of `{chosen[0]}` to the Train tab"]

    grid["use_btn"].click(use, grid["picked"], [c for _, c in targets] + ([ctx.tabs] if ctx.tabs is not None else [])
                          + [out["status"]], api_name="grid_use_settings")
