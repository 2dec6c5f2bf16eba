"""The steps-vs-GA study in one command: train the guide's four embeddings, then grid them.

    python -m embedtrain study --model demo --data assets/demo_dataset --low 13,2 --high 3,17 \\
        --low-steps 150 --high-steps 3000

The study trains gaST, gast, GAST and GAst (docs/guide.md#steps-and-ga) with the same seed and data on
one loaded model, renders their grid (embedtrain.grid) and the guide's four pairwise comparisons, and
writes a table of each run's epochs, weight updates, final loss and validation loss (study.csv and
study.md). The images are decoded once for all four runs and encoded once per batch size
(`data.shared_data`), so the runs train on the very same data.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from embedtrain import EmbedtrainError
from embedtrain.config import model_cfg_scale
from embedtrain.grid import (GridError, GridResult, GridSettings, add_grid_arguments, axes_fields, format_number,
                             grid_picture, infotext, parse_pair, print_done, print_error, progress_reporter,
                             render_grid, settings_from_args, write_png)

# The guide's four pairwise comparisons (docs/guide.md#steps-and-ga), in its order.
STUDY_PAIRS = (("gaST", "GAst"), ("gaST", "GAST"), ("gast", "GAst"), ("gaST", "gast"))
STUDY_COLUMNS = ["run", "meaning", "batch_size", "grad_accum", "steps", "step_unit", "batches", "epochs",
                 "weight_updates", "final_loss", "val_loss", "status", "embedding"]


@dataclass
class StudyResult:
    folder: Path
    rows: list[dict]                 # one per run, keys STUDY_COLUMNS
    grid: GridResult
    pairs: dict[str, Path]           # "gaST vs GAst" -> png
    table: Path


def run_study(base, low, high, low_steps: int, high_steps: int, out, settings: GridSettings | None = None,
              step_unit: str = "batch", progress=None, log=print, pipe=None, info=None) -> StudyResult:
    """Train gaST, gast, GAST and GAst from one config (same seed, data and model), then grid them.

    Args:
        base: a TrainConfig with everything but batch_size, grad_accum, steps and step_unit; its name
            prefixes the four embedding names ("NAME-gaST", ...).
        low, high: (batch_size, grad_accum) pairs; whichever has the lower GA is "ga".
        low_steps, high_steps: the two run lengths, counted in step_unit (the guide counts batches).
        out: the study folder (four run folders, grid.png, the pairwise PNGs, study.csv / study.md).
        settings: grid settings; the baseline column defaults to the config's init text.
        progress: optional `progress(done, total, message)`, counting weight updates, then grid cells.
    """
    from embedtrain import data, models
    from embedtrain.calculator import split_counts, study_table

    out = Path(out)
    base = base.validate()
    settings = settings or GridSettings(baseline=base.init_text if base.init_text != "*" else None,
                                        cfg_scale=model_cfg_scale(base.model))
    with data.shared_data():   # the Trainers below reuse this scan, and one latent cache per batch size
        samples, _ = data.scan_folder(base.data, base.resolution)
        n_train, _ = split_counts(len(samples), base.val_split)
        plan = study_table(n_train * base.repeats, low, high, low_steps, high_steps, step_unit)
        for run in plan:   # all four checked before the first trains (not the fourth failing hours in)
            _check_study_run(base, run, step_unit, out)
        if pipe is None:
            pipe, info = models.load_pipeline(base.model, base.model_config)
        cells = len(settings.prompts) * len(settings.seeds) * (4 + (settings.baseline is not None))
        total = sum(r.weight_updates for r in plan) + cells
        rows, files = _train_runs(base, plan, step_unit, out, pipe, info, progress, total, log)

    done = total - cells

    def grid_progress(d, t, msg):
        if progress:
            progress(done + d, total, f"grid: {msg}")

    grid = render_grid(pipe, info, files, settings, out / "grid.png", grid_progress)
    pairs = _pair_pictures(grid, settings, base.name, out)
    return StudyResult(out, rows, grid, pairs, write_table(out, rows))


def study_run_config(base, run, step_unit: str, out: Path):
    """The TrainConfig of one study run: the base with the run's name (NAME-gaST ...), settings and length."""
    return base.replace(name=f"{base.name}-{run.name}", batch_size=run.batch_size, grad_accum=run.grad_accum,
                        steps=run.steps, step_unit=step_unit, run_name=run.name, out=str(out))


def _train_runs(base, plan, step_unit: str, out: Path, pipe, info, progress, total: int, log):
    """Train the planned runs one after the other on the loaded model: (study.csv rows, embedding files)."""
    from embedtrain.embedding import load_embedding
    from embedtrain.trainer import Trainer

    done = 0
    rows, files = [], []
    for run in plan:
        def on_event(ev, _run=run.name, _done=done):
            if progress and ev.get("event") == "update":
                progress(_done + ev["update"], total,
                         f"training {_run}: weight update {ev['update']}/{ev['weight_updates']}")

        trainer = Trainer(study_run_config(base, run, step_unit, out), pipe=pipe, info=info, log=log)
        res = trainer.run(out / run.name, on_event=on_event)
        trainer.token.vectors.requires_grad_(False)  # the next run trains only its own vectors
        if res.status != "finished":
            raise GridError(f"study run {run.name} {res.status}: {res.message}")
        done += run.weight_updates
        meta = load_embedding(res.files[0]).meta  # what the run really did, as its file records it
        rows.append({"run": run.name, "meaning": run.meaning, "batch_size": run.batch_size,
                     "grad_accum": run.grad_accum, "steps": run.steps, "step_unit": step_unit,
                     "batches": meta["batches"], "epochs": format_number(meta["epochs"]),
                     "weight_updates": res.updates, "final_loss": _fmt_loss(res.final_loss),
                     "val_loss": _fmt_loss(res.val_loss), "status": res.status,
                     "embedding": str(res.files[0].relative_to(out))})
        files.append(res.files[0])
    return rows, files


def _pair_pictures(grid: GridResult, settings: GridSettings, prefix: str, out: Path) -> dict[str, Path]:
    """The guide's pairwise comparisons, each two columns of the study's grid: {"gaST vs GAst": png}."""
    pairs = {}
    index = {c.name: i for i, c in enumerate(grid.columns)}
    per_col = len(grid.columns)
    n_rows = len(grid.cells) // per_col
    rows = [(p, seed) for p in settings.prompts for seed in settings.seeds]
    for a, b in STUDY_PAIRS:
        ca, cb = index[f"{prefix}-{a}"], index[f"{prefix}-{b}"]
        pair_images = [grid.images[r * per_col + c] for r in range(n_rows) for c in (ca, cb)]
        picture = grid_picture(pair_images, rows, [grid.columns[ca], grid.columns[cb]], settings)
        text = infotext(grid.cells[0].prompt, settings.negative_prompt,
                        axes_fields(grid.fields, [f"{prefix}-{a}", f"{prefix}-{b}"], rows, settings.swap_axes))
        pairs[f"{a} vs {b}"] = write_png(picture, out / f"{a}-vs-{b}.png", text)
    return pairs


def _check_study_run(base, run, step_unit: str, out: Path) -> None:
    """One study run's config, validated with errors about what the user typed: the embedding names are
    NAME-gaST ..., so a name near the length limit is refused as `name`, and the run lengths as the study's
    low/high steps."""
    from embedtrain.config import MAX_NAME_BYTES, MAX_NAME_CHARS, ConfigError
    try:
        study_run_config(base, run, step_unit, out).validate()
    except ConfigError as e:
        text = str(e)
        if text.startswith("name "):
            room = len(run.name) + 1
            raise ConfigError(f"name: the study names its embeddings NAME-{run.name} and so on, so name must be at "
                              f"most {MAX_NAME_CHARS - room} characters and {MAX_NAME_BYTES - room} bytes; "
                              f"{base.name!r} is {len(base.name)} characters") from None
        if text.startswith(("steps ", "batch_size ", "grad_accum ")):
            raise ConfigError(f"study run {run.name} (BS {run.batch_size}, GA {run.grad_accum}, {run.steps} "
                              f"{step_unit}s): {text}; change --low/--high or --low-steps/--high-steps") from None
        raise


def _fmt_loss(x) -> str:
    return "" if x is None else f"{x:.6f}"


def write_table(folder: Path, rows: list[dict]) -> Path:
    """study.csv and study.md (the same table), atomically."""
    from embedtrain.fileio import atomic_write_text
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=STUDY_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(folder / "study.csv", buf.getvalue())
    atomic_write_text(folder / "study.md", format_table(rows) + "\n")
    return folder / "study.csv"


def format_table(rows: list[dict]) -> str:
    cols = [c for c in STUDY_COLUMNS if c != "embedding"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def cli(argv=None) -> int:
    from dataclasses import fields

    from embedtrain.config import TrainConfig, add_arguments, config_from_args

    p = argparse.ArgumentParser(prog="python -m embedtrain study", description="The steps-vs-GA study: train "
                                "gaST, gast, GAST and GAst with the same seed and data, then grid them.")
    p.add_argument("--config", help="JSON file of training settings (flags override it)")
    p.add_argument("--low", required=True, help="one setting as BS,GA, e.g. 13,2")
    p.add_argument("--high", required=True, help="the other setting as BS,GA, e.g. 3,17 (the order does not "
                                                 "matter: the lower GA is 'ga')")
    p.add_argument("--low-steps", type=int, required=True, help="the short run length (the guide: 150)")
    p.add_argument("--high-steps", type=int, required=True, help="the long run length (the guide: 3000)")
    p.add_argument("--study-out", dest="study_out", help="study folder (default outputs/study-TIME)")
    p.add_argument("--baseline", default="@init", help="baseline column text (default: the init text; 'none' "
                                                       "for no baseline column)")
    add_arguments(p, only={f.name for f in fields(TrainConfig)} - {"batch_size", "grad_accum", "steps", "run_name"})
    add_grid_arguments(p)
    args = p.parse_args(argv)
    if not hasattr(args, "step_unit"):
        args.step_unit = "batch"  # the guide's unit
    if not hasattr(args, "name"):
        args.name = "study"
    try:
        low, high = parse_pair(args.low, "--low"), parse_pair(args.high, "--high")
        base = config_from_args(args, args.config).replace(step_unit=args.step_unit)
        if args.baseline == "@init":
            baseline = base.init_text if base.init_text.strip() not in ("", "*") else None
        else:
            baseline = None if args.baseline == "none" else args.baseline
        settings = settings_from_args(args, baseline, base.model)
        out = Path(args.study_out or Path(base.out) / f"study-{time.strftime('%Y%m%d-%H%M%S')}")
        from embedtrain.trainer import refuse_existing_run
        refuse_existing_run(out, flag="--study-out", resumable=False, field="study_out", what="study folder")
        report = progress_reporter(args.progress)
        log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.progress == "json" else print
        result = run_study(base, low, high, args.low_steps, args.high_steps, out, settings, args.step_unit,
                           report, log)
    except EmbedtrainError as e:
        return print_error(args.progress, str(e))
    print_done(args.progress, {"folder": str(result.folder), "grid": str(result.grid.path), "table": str(result.table),
                               "pairs": {k: str(v) for k, v in result.pairs.items()}, "rows": result.rows},
               format_table(result.rows) + f"\n\nwrote {result.folder}: grid.png, "
               + ", ".join(v.name for v in result.pairs.values()) + ", study.csv, study.md")
    return 0
