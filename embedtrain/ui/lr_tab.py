"""LR finder tab: the range test and the sweep, with live plots, the verdict in words, and buttons that send
the result to the Train tab.

The model, dataset and token come from the Train tab's inputs (one place to set them); only when the Train
tab does not offer one does this tab show its own. A run is `python -m embedtrain lr-find|sweep ...` in its
own process, writing under outputs/lr/<run>/; a 1 s timer reads that folder (the trainer's log.csv of each
run for the live curve, lr_find.json / sweep.json for the verdict), so closing the page stops nothing and
reopening it shows the job again (outputs/lr/.job.json). The pure helpers (finder_settings, progress_frame,
verdict_markdown, range_settings, lr_settings) are tested without a browser. No torch import here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from embedtrain import EmbedtrainError
from embedtrain.calculator import step_size_for_k
from embedtrain.config import TEMPLATES, TrainConfig, apply_preset, default_run_name
from embedtrain.fileio import atomic_write_text, read_log_rows
from embedtrain.ui.jobs import Job, job_alive, tail
from embedtrain.ui.plots import typed_frame, with_series

# Train-tab settings the finder runs with (TrainConfig field names), in the order callbacks get them.
SOURCE = ["model", "data", "name", "init_text", "vectors", "template", "batch_size", "grad_accum", "optimizer",
          "seed", "resolution", "val_split", "lr"]
COMMAND = {"range": "lr-find", "sweep": "sweep"}
RESULT = {"range": "lr_find", "sweep": "sweep"}

INTRO = """\
Find a learning rate before a long run (the **Guide** tab explains both tests and what the users found with them,
also in `docs/guide.md`). **Range test**: one run whose LR
rises from a low to a high value; the validation loss says where learning starts (lower bound) and where it
stops helping (upper bound). **Sweep**: a few short constant-LR runs from the same fresh embedding; the
recommendation is the highest LR whose validation loss keeps falling (the users found the range test reads
too low on small datasets). Both use the model, dataset and token of the **Train** tab, and the Train tab's
validation split (when it is 0, 25% of the images are held out here).
"""


# ---------------------------------------------------------------- pure helpers

def _num(x):
    return "" if x is None or (isinstance(x, str) and not x.strip()) else str(x).strip()


def finder_settings(values: dict, out: Path, run_name: str) -> dict:
    """The Train tab's values as the finder's settings (TrainConfig fields): empty boxes left out, and a
    validation split of 0 too (the finder then holds out its default share)."""
    settings = {k: v.strip() if isinstance(v, str) else v for k, v in values.items()
                if k in SOURCE and v is not None and not (isinstance(v, str) and not v.strip())}
    if not settings.get("val_split"):
        settings.pop("val_split", None)
    return {**settings, "out": str(out), "run_name": run_name}


def finder_options(kind: str, opts: dict) -> dict:
    """The tab's option boxes as the finder's options (empty boxes: the finder's defaults)."""
    keys = ("ramp", "updates", "start_lr", "end_lr") if kind == "range" else ("candidates", "epochs")
    out = {}
    for k in keys:
        v = opts.get(k)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if k in ("start_lr", "end_lr"):
            try:
                v = float(v)
            except ValueError:
                raise EmbedtrainError(f"{k} must be a number, got {v!r}") from None
        out[k] = v.strip() if isinstance(v, str) else v
    return out


def _val(row: dict):
    for key in ("val_loss", "val_train_loss"):
        v = row.get(key)
        if v not in (None, ""):
            return float(v)
    return None


def progress_frame(kind: str, run_dir: Path) -> pd.DataFrame:
    """The live curve(s) from the run folders' log.csv: range -> (lr, value, series); sweep -> (update,
    value, series, log10 LR) with one series per candidate LR, coloured by its log10 LR (the candidates
    are not known when the page draws the chart, so they cannot be named colours; embedtrain.ui.plots)."""
    run_dir = Path(run_dir)
    rows = []
    if kind == "range":
        for r in read_log_rows(run_dir / "range" / "log.csv", missing_ok=True):
            v = _val(r)
            if v is not None:
                rows.append((float(r["lr"]), v, "validation loss"))
        return with_series(rows, {"lr": float, "value": float, "series": str}, ["validation loss"])
    dirs = [d for d in run_dir.glob("lr*-*") if d.is_dir()] if run_dir.is_dir() else []
    for d in sorted(dirs, key=lambda d: int(d.name[2:].split("-")[0]) if d.name[2:].split("-")[0].isdigit() else 0):
        lr_text = d.name.split("-", 1)[1]
        try:
            shade = math.log10(float(lr_text))
        except ValueError:
            continue
        for r in read_log_rows(d / "log.csv", missing_ok=True):
            v = _val(r)
            if v is not None:
                rows.append((int(r["update"]), v, "LR " + lr_text, shade))
    return typed_frame(rows, {"update": float, "value": float, "series": str, "log10 LR": float})


def verdict_markdown(kind: str, report: dict) -> str:
    """The finder's JSON in words: the suggestion (or why there is none), the reasons, the warnings."""
    lines = []
    for w in report.get("warnings", []):
        lines.append(f"> ⚠️ **Warning:** {w}")
    if lines:
        lines.append("")
    if kind == "range":
        if report.get("lower") is None:
            lines.append("**No suggestion.**")
        else:
            lines.append(f"**Suggested range: {report['lower']:.3g} to {report['upper']:.3g}** "
                         f"(midpoint {report['midpoint']:.3g})")
        lines += [f"- {r}" for r in report.get("reasons", [])]
    else:
        rec = report.get("recommended_lr")
        lines.append(f"**Recommended LR: {rec:.3g}**" if rec is not None else "**No recommendation.**")
        lines += [f"- {r}" for r in report.get("reasons", [])]
        lines.append("")
        lines += [f"- {c['sentence']}" for c in report.get("candidates", [])]
    return "\n".join(lines)


def range_settings(report: dict, k: float) -> dict:
    """Train-tab values for "Use this range": a triangular cycle between the bounds, half a cycle lasting
    k x epoch (Smith: k = 2..10)."""
    if report.get("lower") is None:
        raise EmbedtrainError("the range test gave no range to use; read its reasons, change the ramp and run again")
    if not (isinstance(k, (int, float)) and k > 0):
        raise EmbedtrainError(f"half cycle (k x epoch) must be > 0, got {k!r}")
    step = step_size_for_k(k, report["updates_per_epoch"], minimum=1)
    return {"lr_schedule": "triangular", "lr_min": float(f"{report['lower']:.3g}"),
            "lr": f"{report['upper']:.3g}", "lr_step_size": step, "lr_step_size_epochs": 0,
            "lr_cycle_start": "low"}


def describe_changes(settings: dict, before: dict, labels: dict) -> str:
    """What sending `settings` changes in the Train tab, in words: "LR schedule: constant -> triangular; ...".
    Values already equal are left out; `labels` maps field names to the Train tab's labels."""
    def same(a, b):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a).strip() == str(b).strip()
    changed = [f"{labels.get(k, k)}: {before.get(k)!s} → {v!s}" for k, v in settings.items()
               if k in before and not same(before[k], v)]
    return "; ".join(changed) if changed else "nothing: the Train tab already had these values"


def lr_settings(report: dict) -> dict:
    """Train-tab values for "Use this LR": the sweep's recommendation, constant."""
    if report.get("recommended_lr") is None:
        raise EmbedtrainError("the sweep recommended no LR; read its reasons, change the candidates and run again")
    return {"lr": f"{report['recommended_lr']:.3g}", "lr_schedule": "constant"}


# ---------------------------------------------------------------- jobs (one at a time per outputs folder)

class FinderJobs:
    """Range tests and sweeps: the web UI's "lr" Job, one run folder each under outputs/lr/."""

    def __init__(self, outputs: Path):
        self.root = Path(outputs) / "lr"
        self.job = Job(outputs, "lr")

    def current(self) -> dict | None:
        return self.job.record()

    def running(self) -> dict | None:
        return self.job.running()

    def start(self, kind: str, values: dict, opts: dict) -> dict:
        """Check the settings as the finder's command line would (lr_finder.request, no argparse here), then
        start the process on the checked settings (written to the run folder's job.json)."""
        from embedtrain.lr_finder import request
        self.job.refuse_if_busy()
        name = str(values.get("name") or "embedding").strip() or "embedding"
        run_name = default_run_name(name, "lrfind" if kind == "range" else "sweep")
        settings = finder_settings(values, self.root, run_name)
        _, _, run_dir, argv = request(COMMAND[kind], settings, finder_options(kind, opts))

        def prepare():
            if run_dir.exists():
                raise EmbedtrainError(f"{run_dir.name} already exists; wait a second and run again")
            run_dir.mkdir(parents=True)
            atomic_write_text(run_dir / "job.json", json.dumps(settings, indent=1))

        return self.job.start(argv, run_dir / "job.log", prepare=prepare, kind=kind, run_dir=str(run_dir))

    def stop(self) -> str:
        return self.job.stop()

    def latest(self, kind: str) -> tuple[Path, dict] | tuple[None, None]:
        """The most recent finished result of this kind (its folder and JSON)."""
        found = sorted(self.root.glob(f"*/{RESULT[kind]}.json"), key=lambda p: p.stat().st_mtime) \
            if self.root.is_dir() else []
        for path in reversed(found):
            try:
                return path.parent, json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
        return None, None


def job_view(jobs: FinderJobs) -> dict:
    """What the page shows for the current (or last) finder job."""
    job = jobs.current()
    empty = dict(status="No LR finder run yet.", kind=None, frame=None, verdict="", image=None, running=False)
    if not job:
        return empty
    kind, run_dir = job["kind"], Path(job["run_dir"])
    running = job_alive(job)
    frame = progress_frame(kind, run_dir)
    result = run_dir / f"{RESULT[kind]}.json"
    what = "Range test" if kind == "range" else "Sweep"
    if running:
        n = int(frame["value"].notna().sum())   # not the placeholder rows
        detail = f"{n} validation measurement{'s' if n != 1 else ''} so far"
        if kind == "sweep" and n:
            detail += f" · running {frame['series'].iloc[-1]}"
        status = f"**{what} running** ({run_dir.name}): {detail}"
        return dict(status=status, kind=kind, frame=frame, verdict="", image=None, running=True)
    if result.is_file():
        report = json.loads(result.read_text(encoding="utf-8"))
        png = run_dir / f"{RESULT[kind]}.png"
        return dict(status=f"**{what} finished** ({run_dir.name}) · files in `{run_dir}`", kind=kind, frame=frame,
                    verdict=verdict_markdown(kind, report), image=str(png) if png.is_file() else None, running=False)
    return dict(status=f"**{what} failed** ({run_dir.name}):\n```\n{tail(run_dir / 'job.log', 1200)}\n```", kind=kind,
                frame=frame, verdict="", image=None, running=False)


# ---------------------------------------------------------------- the tab

def _fallback_config(ctx) -> TrainConfig:
    cfg = TrainConfig(model=ctx.model, data=ctx.data, name="purplestar" if ctx.model == "demo" else "mytoken",
                      out=str(ctx.outputs))
    return apply_preset(cfg, explicit={"name", "data", "model", "out"})


def _source_inputs(ctx, cfg: TrainConfig) -> dict:
    """The Train tab's inputs the finder runs with, keyed by field; own inputs for any it does not offer."""
    missing = [k for k in SOURCE if ctx.train.get(k) is None]
    src = {k: ctx.train[k] for k in SOURCE if k not in missing}
    if missing:
        with gr.Accordion("Model and data (the Train tab does not offer these)", open=True):
            with gr.Row():
                for k in missing:
                    v = getattr(cfg, k)
                    if k == "template":
                        src[k] = gr.Dropdown(list(TEMPLATES), value=v, label=k, allow_custom_value=True)
                    elif isinstance(v, str):
                        src[k] = gr.Textbox(v, label=k)
                    else:
                        src[k] = gr.Number(v, label=k, precision=0 if isinstance(v, int) else None)
    return src


def _controls(cfg: TrainConfig) -> dict:
    """The left column: the range test's and the sweep's settings, their buttons, Stop and the message."""
    from embedtrain.lr_finder import default_candidates
    ui = {}
    with gr.Group():
        gr.Markdown("### Range test")
        with gr.Row():
            ui["ramp"] = gr.Radio(["linear", "exponential"], value="linear", label="Ramp",
                                  info="linear is what the users ran; exponential spans several decades")
            ui["updates"] = gr.Number(60, label="Length (weight updates)", precision=0, minimum=5,
                                      elem_id="lr-updates")
        with gr.Row():
            ui["start_lr"] = gr.Textbox("", label="Start LR", placeholder="0 (linear) / end / 1000 (exponential)",
                                        elem_id="lr-start")
            ui["end_lr"] = gr.Textbox("", label="End LR", placeholder="10 x the Train tab's LR", elem_id="lr-end")
        ui["range_btn"] = gr.Button("Run range test", variant="primary", elem_id="lr-run-range")
    with gr.Group():
        gr.Markdown("### Sweep")
        with gr.Row():
            ui["candidates"] = gr.Textbox(", ".join(f"{c:g}" for c in default_candidates(cfg.lr)),
                                          label="Candidate LRs", info="log-spaced around the LR; edit freely",
                                          elem_id="lr-candidates")
            ui["epochs"] = gr.Number(8, label="Epochs per candidate", minimum=0.1, elem_id="lr-epochs")
        ui["sweep_btn"] = gr.Button("Run sweep", variant="primary", elem_id="lr-run-sweep")
    ui["stop_btn"] = gr.Button("Stop", variant="stop", elem_id="lr-stop")
    ui["message"] = gr.Markdown("", elem_id="lr-message")
    return ui


def _results() -> dict:
    """The right column: status, live plots, the verdict and its image, and the buttons that send it on."""
    ui = {"status": gr.Markdown("", elem_id="lr-status")}
    ui["range_plot"] = gr.LinePlot(x="lr", y="value", color="series", title="Range test: validation loss vs LR",
                                   x_title="learning rate", y_title="validation loss", height=260,
                                   elem_id="lr-range-plot")
    ui["sweep_plot"] = gr.LinePlot(x="update", y="value", color="log10 LR", title="Sweep: validation loss per LR",
                                   x_title="weight update", y_title="validation loss", height=260,
                                   elem_id="lr-sweep-plot")
    ui["verdict"] = gr.Markdown("", elem_id="lr-verdict")
    ui["image"] = gr.Image(label="Result plot", type="filepath", interactive=False, height=340, elem_id="lr-image")
    with gr.Row():
        ui["k_epochs"] = gr.Number(4, label="Half cycle = k x epoch", minimum=0.5, info="Smith: k = 2 to 10",
                                   elem_id="lr-k", scale=1)
        ui["use_range"] = gr.Button("Use this range", elem_id="lr-use-range", interactive=False, scale=1)
        ui["use_lr"] = gr.Button("Use this LR", elem_id="lr-use-lr", interactive=False, scale=1)
    ui["sent"] = gr.Markdown("", elem_id="lr-sent")
    return ui


def build(ctx) -> None:
    jobs = FinderJobs(ctx.outputs)
    cfg = _fallback_config(ctx)
    gr.Markdown(INTRO)
    src = _source_inputs(ctx, cfg)
    with gr.Row():
        with gr.Column(scale=2):
            ui = _controls(cfg)
        with gr.Column(scale=3):
            ui.update(_results())
    ui["timer"] = gr.Timer(1.0, active=False)
    _wire_jobs(ctx, jobs, src, ui)
    _wire_send(ctx, jobs, ui)


def _wire_jobs(ctx, jobs: FinderJobs, src: dict, ui: dict) -> None:
    """Run / Stop, and the 1 s timer that follows the job's folder while it runs."""
    src_keys = list(src)
    src_inputs = [src[k] for k in src_keys]

    def start(kind, *args):
        values = dict(zip(src_keys, args[:len(src_keys)]))
        rest = args[len(src_keys):]
        opts = dict(zip(["ramp", "updates", "start_lr", "end_lr"], rest)) if kind == "range" else \
            dict(zip(["candidates", "epochs"], rest))
        try:
            ctx.allowed_folder(values.get("data"))   # the finder reads the Train tab's dataset
            job = jobs.start(kind, values, opts)
        except EmbedtrainError as e:
            return f"**Error:** {e}", gr.Timer(active=False)
        return f"Started `{' '.join(job['argv'][:1])}` in `{job['run_dir']}`", gr.Timer(active=True)

    out = [ui["message"], ui["timer"]]
    ui["range_btn"].click(lambda *a: start("range", *a),
                          src_inputs + [ui[k] for k in ("ramp", "updates", "start_lr", "end_lr")], out,
                          api_visibility="private")
    ui["sweep_btn"].click(lambda *a: start("sweep", *a), src_inputs + [ui["candidates"], ui["epochs"]], out,
                          api_visibility="private")
    ui["stop_btn"].click(jobs.stop, None, ui["message"], api_visibility="private")

    def refresh():
        v = job_view(jobs)
        _, rng = jobs.latest("range")
        _, swp = jobs.latest("sweep")
        frames = [gr.skip(), gr.skip()]
        if v["kind"] == "range":
            frames[0] = v["frame"]
        elif v["kind"] == "sweep":
            frames[1] = v["frame"]
        return (v["status"], *frames, v["verdict"], (ctx.servable([v["image"]]) or [None])[0],
                gr.update(interactive=bool(rng and rng.get("lower") is not None)),
                gr.update(interactive=bool(swp and swp.get("recommended_lr") is not None)),
                gr.Timer(active=v["running"]))

    outs = [ui[k] for k in ("status", "range_plot", "sweep_plot", "verdict", "image", "use_range", "use_lr", "timer")]
    ui["timer"].tick(refresh, None, outs, show_progress="hidden", api_visibility="private")
    ctx.on_load.append((refresh, None, outs))


def _wire_send(ctx, jobs: FinderJobs, ui: dict) -> None:
    """"Use this range" / "Use this LR": fill the Train tab's inputs, switch to it, say what changed."""
    switch = ctx.tabs
    send_keys = [k for k in ("lr_schedule", "lr_min", "lr", "lr_step_size", "lr_step_size_epochs", "lr_cycle_start")
                 if ctx.train.get(k) is not None]
    labels = {k: ctx.train[k].label for k in send_keys}
    told = [ctx.train_message] if ctx.train_message is not None else []
    send_outputs = [ui["sent"]] + [ctx.train[k] for k in send_keys] + told + ([switch] if switch is not None else [])

    def send(settings: dict, what: str, before: dict):
        targets = [k for k in settings if k in send_keys]
        if not targets:
            return [f"The Train tab has no LR inputs to fill; set these by hand: {settings}"] + \
                [gr.skip() for _ in send_outputs[1:]]
        said = f"Sent {what} to the Train tab. Changed {describe_changes(settings, before, labels)}."
        out = [said] + [settings[k] if k in targets else gr.skip() for k in send_keys]
        return out + [said for _ in told] + ([gr.Tabs(selected="train")] if switch is not None else [])

    def refused(e):
        return [f"**Error:** {e}"] + [gr.skip()] * (len(send_outputs) - 1)

    def send_range(k, *current):
        _, report = jobs.latest("range")
        try:
            return send(range_settings(report or {}, k), "the range (a triangular cycle between its bounds)",
                        dict(zip(send_keys, current)))
        except EmbedtrainError as e:
            return refused(e)

    def send_lr(*current):
        _, report = jobs.latest("sweep")
        try:
            return send(lr_settings(report or {}), "the recommended LR (constant)", dict(zip(send_keys, current)))
        except EmbedtrainError as e:
            return refused(e)

    current = [ctx.train[k] for k in send_keys]
    ui["use_range"].click(send_range, [ui["k_epochs"], *current], send_outputs, api_visibility="private")
    ui["use_lr"].click(send_lr, current, send_outputs, api_visibility="private")
