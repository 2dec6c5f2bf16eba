"""Learning-rate discovery: the range test, the short-run sweep, and the functions that read their curves.

Two protocols, explained for users in docs/guide.md (sections "Range test" and "Sweep"):

- Range test (`python -m embedtrain lr-find`): from a fresh embedding, ramp the LR linearly (as the
  users did) or exponentially from start_lr to end_lr over K weight updates; the stabilized validation
  loss is measured every n updates. `suggest_range` reads the curve: lower bound = where the smoothed
  loss starts to fall, upper bound = where it stops falling, midpoint = their mean.
- Sweep (`python -m embedtrain sweep`): one short constant-LR run of E epochs per candidate LR, each
  from the same fresh embedding, same seed and same data order, on one loaded model and one latent
  cache. `classify_curve` names each validation curve (falls throughout / small bump / turns up /
  does not learn) and `recommend` picks the highest LR whose loss keeps falling.

The reading functions at the top are pure (plain Python on lists, no torch): they are what the tests
pin down on synthetic curves. Everything that trains imports torch inside the function.

Files written into the finder's folder: lr_find.csv / lr_find.json / lr_find.png for the range test,
sweep.csv / sweep.json / sweep.png for the sweep, and one trainer run folder per run (range/,
lr1-<lr>/, ...) with its own log.csv, which the web UI follows for the live plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

from embedtrain import EmbedtrainError
from embedtrain.calculator import step_size_for_k
from embedtrain.config import (MAX_LR, MAX_STEPS, ConfigError, TrainConfig, add_arguments, config_from_args,
                               read_settings)
from embedtrain.fileio import read_log_rows

RAMPS = ("linear", "exponential")
FALL_FRACTION = 0.10   # the loss "starts to fall" once 10% of its total fall is done
FLAT_FRACTION = 0.05   # it "stops falling" once it is within 5% of the total fall from its minimum
BUMP_FRACTION = 0.02   # a rise above the best-so-far bigger than 2% of the total fall is a bump
TURN_FRACTION = 0.05   # ending more than 5% of the total fall above the minimum is turning up
MAX_SWEEP_EPOCHS = 1000  # per candidate; the guide's runs were 20
DEFAULT_VAL_SPLIT = 0.25  # when the user set no validation: the users held out 20% (4 of 20 images)

VERDICTS = {
    "falls": "falls throughout",
    "bump": "small bump",
    "turns_up": "turns up",
    "no_learning": "does not learn",
}


# ====================================================================== pure reading functions

def _median(xs):
    s = sorted(xs)
    n = len(s)
    return 0.0 if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def _check_curve(xs, ys, what_x, what_y="losses"):
    if len(xs) != len(ys):
        raise ValueError(f"{what_x} and {what_y} must have the same length, got {len(xs)} and {len(ys)}")
    bad = [y for y in ys if not (isinstance(y, (int, float)) and math.isfinite(y))]
    if bad:
        raise ValueError(f"{what_y} must be finite numbers, got {bad[0]!r}")


def smooth(values, window: int | None = None) -> list[float]:
    """Local straight-line fit: each point becomes the value at that point of the least-squares line
    through the `window` measurements around it. Inside the curve that is the centered moving average;
    at the ends the window slides inward instead of shrinking, so the first and last points are as
    steady as the others and a straight line stays exactly straight. Default window about n/8, odd, >= 3."""
    n = len(values)
    if window is None:
        window = max(3, 2 * round(n / 16) + 1)
    w = max(1, min(int(window), n))
    out = []
    for i in range(n):
        a = min(max(0, i - w // 2), n - w)
        xs, ys = range(a, a + w), values[a:a + w]
        mx, my = sum(xs) / w, sum(ys) / w
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        out.append(my + slope * (i - mx))
    return out


def noise_level(values, smoothed) -> float:
    """A robust standard deviation of what the smoothing removed (1.4826 x the median absolute
    deviation of the residuals); near 0 for a clean curve, however curved."""
    res = [v - s for v, s in zip(values, smoothed)]
    if len(res) < 3:
        return 0.0
    m = _median(res)
    return 1.4826 * _median([abs(r - m) for r in res])


def _tolerance(values, smoothed, start) -> float:
    """Changes smaller than this are not read as falls or rises: 3 x the noise, and never less than
    1e-4 of the loss itself (floating-point wobble on a flat curve is not learning)."""
    return max(3.0 * noise_level(values, smoothed), 1e-4 * abs(start), 1e-12)


def suggest_range(lrs, losses, fall_fraction=FALL_FRACTION, flat_fraction=FLAT_FRACTION, window=None) -> dict:
    """Read a range-test curve: validation loss measured at increasing learning rates.

    lrs: the LR reached at each measurement (increasing). losses: the validation loss there.
    Returns a dict: lower, upper, midpoint (None when refusing), reasons (sentences), status
    ("ok", "still_falling", "too_high", "no_learning", "too_few_points"), smoothed (the smoothed
    curve), i_lower / i_upper / i_min (indices into the curve, or None).

    lower = the first LR at which the smoothed loss has done `fall_fraction` of its total fall;
    upper = the first LR after that at which it is within `flat_fraction` of the total fall from its
    minimum ("stops falling"); midpoint = (lower + upper) / 2, as the users computed it.
    """
    lrs, losses = [float(x) for x in lrs], [float(y) for y in losses]
    _check_curve(lrs, losses, "lrs")
    if any(b < a for a, b in zip(lrs, lrs[1:])):
        raise ValueError("lrs must be in increasing order (the LR of each measurement of the ramp)")
    out = dict(lower=None, upper=None, midpoint=None, reasons=[], status="", smoothed=[], i_lower=None,
               i_upper=None, i_min=None)
    if len(losses) < 5:
        out["status"] = "too_few_points"
        out["reasons"].append(f"only {len(losses)} validation measurements (need at least 5): measure more "
                              "often (lower val_every) or ramp over more updates")
        return out
    s = smooth(losses, window)
    out["smoothed"] = s
    start = s[0]
    tol = _tolerance(losses, s, start)
    i_min = min(range(len(s)), key=lambda i: s[i])
    drop = start - s[i_min]
    out["i_min"] = i_min
    if drop <= tol:
        rise = max(s) - start
        if rise > tol and s[-1] > start + tol:
            out["status"] = "too_high"
            out["reasons"].append(
                f"LR too high from the start: the smoothed validation loss never falls below its first value "
                f"({start:.5g} at LR {lrs[0]:.3g}) and rises to {s[-1]:.5g} at LR {lrs[-1]:.3g}; lower the start LR")
        else:
            out["status"] = "no_learning"
            out["reasons"].append(
                f"no learning: the smoothed validation loss stays within {max(abs(x - start) for x in s):.3g} of "
                f"{start:.5g} from LR {lrs[0]:.3g} to {lrs[-1]:.3g}; raise the end LR or ramp over more updates")
        return out
    # lower bound: the fall has clearly begun
    need = max(tol, fall_fraction * drop)
    i_lower = next(i for i in range(len(s)) if start - s[i] >= need)
    # upper bound: the fall is (nearly) over
    band = max(tol, flat_fraction * drop)
    i_upper = next(i for i in range(i_lower, len(s)) if s[i] <= s[i_min] + band)
    if i_upper == i_lower and i_lower > 0:
        i_lower -= 1  # a cliff: the fall happened between two measurements, take the one before it
    out.update(i_lower=i_lower, i_upper=i_upper, lower=lrs[i_lower], upper=lrs[i_upper])
    out["midpoint"] = (out["lower"] + out["upper"]) / 2
    out["reasons"].append(
        f"lower bound {out['lower']:.3g}: the smoothed validation loss has fallen {fall_fraction:.0%} of its total "
        f"fall ({start:.5g} -> {s[i_lower]:.5g})")
    rises_after = s[-1] - s[i_min] > band
    if rises_after:
        out["status"] = "ok"
        out["reasons"].append(
            f"upper bound {out['upper']:.3g}: the loss stops falling there (within {flat_fraction:.0%} of its "
            f"minimum {s[i_min]:.5g}, reached at LR {lrs[i_min]:.3g}) and turns up after it "
            f"({s[-1]:.5g} at LR {lrs[-1]:.3g})")
    else:
        out["status"] = "still_falling" if i_min >= len(s) - 2 else "ok"
        if out["status"] == "still_falling":
            out["reasons"].append(
                f"upper bound {out['upper']:.3g} is only a lower limit: the loss was still falling at the end of "
                f"the ramp (LR {lrs[-1]:.3g}); raise the end LR to see where it turns up")
        else:
            out["reasons"].append(
                f"upper bound {out['upper']:.3g}: the loss stops falling there (within {flat_fraction:.0%} of its "
                f"minimum {s[i_min]:.5g}) and stays flat up to LR {lrs[-1]:.3g}")
    out["reasons"].append(f"midpoint {out['midpoint']:.3g} = ({out['lower']:.3g} + {out['upper']:.3g}) / 2")
    return out


def classify_curve(updates, losses, bump_fraction=BUMP_FRACTION, turn_fraction=TURN_FRACTION) -> dict:
    """Name one sweep curve: validation loss at increasing update counts (the first point should be the
    fresh embedding's loss at update 0).

    Returns a dict: verdict (one of VERDICTS), turns_up_after (update of the minimum, for "turns_up"),
    bumps (rises above the best-so-far that the curve recovered from), rises (for "no_learning": True
    when the loss went up from the start), start, best, end, best_update, drop.
    """
    updates, losses = [float(u) for u in updates], [float(y) for y in losses]
    _check_curve(updates, losses, "updates")
    if len(losses) < 2:
        raise ValueError(f"a sweep curve needs at least 2 points (start and end), got {len(losses)}")
    s = smooth(losses, 3)
    start = losses[0]
    tol = _tolerance(losses, s, start) if len(losses) >= 5 else max(1e-4 * abs(start), 1e-12)
    i_min = min(range(len(losses)), key=lambda i: losses[i])
    drop = start - losses[i_min]
    out = dict(verdict="", turns_up_after=None, bumps=0, rises=False, start=start, best=losses[i_min],
               end=losses[-1], best_update=int(updates[i_min]), drop=drop)
    if drop <= tol:
        out["verdict"] = "no_learning"
        out["rises"] = losses[-1] - start > tol
        return out
    end_rise = losses[-1] - losses[i_min]
    if i_min < len(losses) - 1 and end_rise > max(tol, turn_fraction * drop):
        out["verdict"] = "turns_up"
        out["turns_up_after"] = int(updates[i_min])
    # bumps: the loss rose above its best so far, then came back below that best
    best, in_bump, bumps = losses[0], False, 0
    for y in losses[1:]:
        if y < best:
            if in_bump:
                bumps += 1
            best, in_bump = y, False
        elif y - best > max(tol, bump_fraction * drop):
            in_bump = True
    out["bumps"] = bumps
    if not out["verdict"]:
        out["verdict"] = "bump" if bumps else "falls"
    return out


def describe_curve(lr: float, c: dict, unit: str = "updates") -> str:
    """One sentence about one sweep candidate, for the JSON, the CLI and the UI."""
    head = f"LR {lr:.3g}: {VERDICTS[c['verdict']]}"
    if c["verdict"] == "no_learning":
        if c["rises"]:
            return (f"{head}: the validation loss rises from the start ({c['start']:.5g} -> {c['end']:.5g}); "
                    "this LR is too high")
        return (f"{head}: the validation loss does not move beyond noise ({c['start']:.5g}, best {c['best']:.5g}); "
                "too low to move the embedding in this many updates, or so high that it overshoots")
    fall = f"{c['start']:.5g} -> {c['best']:.5g}"
    if c["verdict"] == "turns_up":
        return (f"{head} after {c['turns_up_after']} {unit}: it falls {fall}, then rises to {c['end']:.5g}; "
                "this LR overtrains a run this long")
    if c["verdict"] == "bump":
        return (f"{head}: it falls {fall} with {c['bumps']} bump{'s' if c['bumps'] > 1 else ''} on the way "
                f"(it recovers); usable, but a lower LR runs smoother")
    return f"{head}: it falls {fall} and is still at its best at the end ({c['end']:.5g})"


def describe_all(lrs, curves) -> list[str]:
    """describe_curve for every candidate, with what the neighbours tell about a flat one: when a lower LR
    learns, a flat curve means overshooting (too high); when only higher LRs learn, it is too low."""
    learns = [(lr, c["verdict"] != "no_learning") for lr, c in zip(lrs, curves)]
    out = []
    for lr, c in zip(lrs, curves):
        text = describe_curve(lr, c)
        if c["verdict"] == "no_learning" and not c["rises"]:
            base = text.split("; too low to move")[0]
            if any(ok and other < lr for other, ok in learns):
                text = base + "; lower LRs learn, so this one is too high (it overshoots)"
            elif any(ok and other > lr for other, ok in learns):
                text = base + "; higher LRs learn, so this one is too low for this many updates"
        out.append(text)
    return out


def recommend(lrs, curves) -> tuple[float | None, list[str]]:
    """The highest LR whose validation loss keeps falling ("falls"); failing that, the highest with only a
    bump. Returns (lr or None, reasons)."""
    pairs = sorted(zip([float(x) for x in lrs], curves), key=lambda p: p[0])
    if not pairs:
        raise ValueError("recommend needs at least one candidate")
    falls = [lr for lr, c in pairs if c["verdict"] == "falls"]
    bumps = [lr for lr, c in pairs if c["verdict"] == "bump"]
    highest = pairs[-1][0]
    if falls:
        lr = falls[-1]
        reasons = [f"{lr:.3g} is the highest candidate whose validation loss falls throughout"]
        if lr == highest:
            reasons.append("it is also the highest candidate tried: a higher LR may keep falling too; add higher "
                           "candidates to find the limit")
        return lr, reasons
    if bumps:
        lr = bumps[-1]
        return lr, [f"no candidate falls without a bump; {lr:.3g} is the highest whose loss recovers from its "
                    "bump and keeps falling"]
    learners = [lr for lr, c in pairs if c["verdict"] == "turns_up"]
    if learners:
        return None, [f"every candidate that learns turns up before the end (lowest: {learners[0]:.3g}); try "
                      f"candidates below {learners[0]:.3g}, or fewer epochs"]
    if all(c["rises"] for _, c in pairs):
        return None, [f"no candidate learns: the loss rises for all of them, so even {pairs[0][0]:.3g} is too "
                      "high; try lower candidates"]
    return None, [f"no candidate learns: the loss stays flat up to {highest:.3g}; try higher candidates or more "
                  "epochs"]


def small_validation_warning(n_val: int, batch_size: int) -> str | None:
    """The users saw validation loss mislead with 4 validation images in one batch
    (docs/guide.md#validation-loss)."""
    if n_val and (n_val < 4 or n_val <= batch_size):
        size = f"{n_val} image{'s' if n_val != 1 else ''}" + (", one batch" if n_val <= batch_size else "")
        return (f"small validation set ({size}): validation loss can mislead here (it has been seen to end "
                "above its start while the model had clearly learned); read these verdicts with care and check "
                "previews or grids (docs/guide.md#validation-loss)")
    return None


def ramp_lr(u: int, updates: int, start_lr: float, end_lr: float, ramp: str = "linear") -> float:
    """The LR of weight update u (0-based) of a range test: start_lr at u = 0, end_lr at the last update."""
    p = u / (updates - 1) if updates > 1 else 1.0
    if ramp == "linear":
        return start_lr + (end_lr - start_lr) * p
    return start_lr * (end_lr / start_lr) ** p


def default_candidates(lr: float, count: int = 4) -> list[float]:
    """A log-spaced list around the config's LR, half a decade apart, from lr/10 up (lr/10 .. lr x 3.16
    for 4): rounded to 3 significant digits so the user can read and edit it."""
    exps = [-1 + 0.5 * k for k in range(count)]
    return [float(f"{lr * 10 ** e:.3g}") for e in exps]


def parse_candidates(text: str) -> list[float]:
    """'1e-3, 3e-3 5e-3' -> [0.001, 0.003, 0.005] (commas and/or spaces)."""
    pieces = [p for p in str(text).replace(",", " ").split() if p]
    if not pieces:
        raise ConfigError("candidates is empty: give LRs such as '5e-4, 1.6e-3, 5e-3'")
    out = []
    for p in pieces:
        try:
            v = float(p)
        except ValueError:
            raise ConfigError(f"candidates: {p!r} is not a number; give LRs such as '5e-4, 1.6e-3, 5e-3'") from None
        if not (math.isfinite(v) and 0 < v <= MAX_LR):
            raise ConfigError(f"candidates: every LR must be a number > 0 and <= {MAX_LR:g}, got {p}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ConfigError(f"candidates: {text!r} lists an LR twice")
    return sorted(out)


# ====================================================================== running them

def _quiet(*a, **k):
    pass


def finder_config(cfg: TrainConfig, typed: set[str]) -> tuple[TrainConfig, list[str]]:
    """Settings the finder changes unless the user typed them: validation on (it reads validation loss),
    no previews or snapshots (they cost time and say nothing about the LR). Returns (cfg, notes)."""
    notes, changes = [], {}
    if not cfg.val_data and cfg.val_split == 0 and cfg.val_train_subset == 0:
        if "val_split" in typed:
            changes["val_train_subset"] = 8
            notes.append("val_split is 0: reading the stabilized loss on 8 training images instead")
        else:
            changes["val_split"] = DEFAULT_VAL_SPLIT
            notes.append(f"holding out {DEFAULT_VAL_SPLIT:.0%} of the images for validation loss "
                         "(set --val-split or --val-data to choose)")
    for key in ("preview_every", "save_every"):
        if key not in typed:
            changes[key] = 0
    return cfg.replace(**changes), notes


def _which(trainer) -> tuple[str, str]:
    return ("val", "val_loss") if trainer.val_samples else ("train", "val_train_loss")


def _warnings(trainer) -> list[str]:
    w = small_validation_warning(len(trainer.val_samples), trainer.cfg.batch_size)
    if not trainer.val_samples:
        w = ("no validation images: the curves are the stabilized loss on training images, which keeps "
             "falling as the embedding memorises them; hold out images (val_split) for an honest reading")
    return [w] if w else []


def _merged_warnings(trainer) -> list[str]:
    """The trainer's warnings, with its one-line small-validation note replaced by the finder's fuller one."""
    own = _warnings(trainer)
    return [w for w in trainer.warnings if not (own and "validation images" in w)] + own


def ramp_settings(lr, ramp="linear", start_lr=None, end_lr=None, updates=60, val_every=None):
    """Check a range test's settings and fill the defaults: (ramp, start_lr, end_lr, updates, val_every).
    end_lr defaults to 10 x lr; start_lr to 0 (linear) or end_lr / 1000 (exponential); val_every to K / 20."""
    if ramp not in RAMPS:
        raise ConfigError(f"ramp must be one of {', '.join(RAMPS)}, got {ramp!r}")
    if not (isinstance(updates, int) and 5 <= updates <= MAX_STEPS):
        raise ConfigError(f"updates must be a whole number >= 5 and <= {MAX_STEPS} (the ramp's length in weight "
                          f"updates), got {updates!r}")
    end_lr = 10 * lr if end_lr is None else float(end_lr)
    start_lr = (0.0 if ramp == "linear" else end_lr / 1000) if start_lr is None else float(start_lr)
    if not (math.isfinite(end_lr) and 0 < end_lr <= MAX_LR):
        raise ConfigError(f"end_lr must be a number > 0 and <= {MAX_LR:g} (the highest learning rate accepted), "
                          f"got {end_lr!r}")
    if not (math.isfinite(start_lr) and 0 <= start_lr < end_lr) or (ramp == "exponential" and start_lr <= 0):
        raise ConfigError(f"start_lr must be >= 0 (> 0 for an exponential ramp) and below end_lr {end_lr:g}, "
                          f"got {start_lr!r}")
    val_every = val_every or max(1, updates // 20)
    if not (isinstance(val_every, int) and 1 <= val_every <= updates // 5):
        raise ConfigError(f"val_every must be between 1 and {updates // 5} (at least 5 measurements over the "
                          f"{updates} updates), got {val_every!r}")
    return ramp, start_lr, end_lr, updates, val_every


def range_test(cfg: TrainConfig, out_dir, *, ramp: str = "linear", start_lr: float | None = None,
               end_lr: float | None = None, updates: int = 60, val_every: int | None = None, trainer=None,
               log=print, stop=None) -> dict:
    """Run the range test into `out_dir` and write lr_find.csv / .json / .png. Returns the JSON dict.

    cfg: the training settings (model, data, token, batch size...). ramp: linear or exponential.
    start_lr / end_lr: default 0 (linear) or end_lr/1000 (exponential) up to 10 x cfg.lr. updates: K, the
    ramp's length in weight updates. val_every: updates between validation measurements (default
    K / 20). trainer: a loaded Trainer to reuse. stop(): True ends the ramp early.
    """
    from embedtrain.schedules import Schedule
    from embedtrain.trainer import Trainer

    ramp, start_lr, end_lr, updates, val_every = ramp_settings(cfg.lr, ramp, start_lr, end_lr, updates, val_every)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = trainer or Trainer(cfg, log=log)
    load_s = time.perf_counter() - t0
    trainer.set_run(lr=end_lr, lr_schedule="constant", steps=updates, step_unit="update", val_every=val_every,
             lr_warmup=0)
    trainer.reset_embedding()
    which, column = _which(trainer)
    start_loss = trainer.fixed_loss(which)
    log(f"range test: {ramp} ramp {start_lr:.3g} -> {end_lr:.3g} over {updates} updates, validation loss every "
        f"{val_every} updates; at the start {start_loss:.5f}")

    schedule = Schedule("range_test", lambda u: ramp_lr(u, updates, start_lr, end_lr, ramp), updates,
                        f"{ramp} range test {start_lr:.3g} -> {end_lr:.3g} over {updates} updates")
    points = {"best": start_loss, "diverged": False}

    def on_event(ev):
        if ev.get("event") == "update" and ev.get(column) not in ("", None):
            v = float(ev[column])
            log(f"  update {ev['update']:>4}  lr {ev['lr']:.3g}  {column} {v:.5f}")
            if not math.isfinite(v):   # the curve ends here: nothing after a NaN can be read
                points["diverged"] = True
                return
            points["best"] = min(points["best"], v)
            # Far past the minimum the rest of the ramp says nothing new: stop and save the time.
            gap = max(start_loss - points["best"], 0.01 * abs(start_loss))
            if v > points["best"] + 3 * gap:
                points["diverged"] = True

    result = trainer.run(out_dir / "range", on_event=on_event, schedule=schedule,
                         stop=lambda: points["diverged"] or bool(stop and stop()))
    (out_dir / "range" / "resume.pt").unlink(missing_ok=True)  # a ramp is not worth resuming
    rows, cut = finite_rows(read_log_rows(out_dir / "range" / "log.csv"), column)
    meas = [(0, start_lr, start_loss)] + [(int(r["update"]), float(r["lr"]), float(r[column])) for r in rows
                                          if r.get(column) not in ("", None)]
    lrs = [m[1] for m in meas]
    losses = [m[2] for m in meas]
    sug = suggest_range(lrs, losses)
    if cut is not None:
        sug["reasons"].append(f"the loss became non-finite at update {cut['update']} (LR {float(cut['lr']):.3g}): "
                              "the curve ends before it; a lower end LR reads the rest")
    if result.status == "failed":
        sug["reasons"].append(f"the ramp stopped early: {result.message}")
    if result.status == "stopped" and not points["diverged"]:
        sug["reasons"].append(f"stopped at update {result.updates} of {updates}: read from the part that ran")
    if points["diverged"] and cut is None:
        sug["reasons"].append(f"the ramp stopped at update {result.updates}: the loss had risen far above its "
                              "minimum, so higher LRs would say nothing new")
    warnings = _merged_warnings(trainer)
    upe = trainer.plan.updates_per_epoch
    report = {
        "lower": sug["lower"], "upper": sug["upper"], "midpoint": sug["midpoint"], "reasons": sug["reasons"],
        "status": sug["status"], "warnings": warnings, "ramp": ramp, "start_lr": start_lr, "end_lr": end_lr,
        "updates": updates, "updates_run": result.updates, "val_every": val_every, "loss": column,
        "validation_images": len(trainer.val_samples), "training_images": len(trainer.train_samples),
        "batch_size": trainer.cfg.batch_size, "grad_accum": trainer.cfg.grad_accum,
        "updates_per_epoch": upe,
        # Smith: a half cycle of 2-10 x epoch; 4 is the suggestion the UI's "Use this range" starts from.
        "step_size": step_size_for_k(4, trainer.plan.updates_per_epoch_exact, minimum=1),
        "load_s": round(load_s, 2), "run_s": round(time.perf_counter() - t0 - load_s, 2),
    }
    _write_range_files(out_dir, rows, column, meas, sug, report)
    return report


def finite_rows(rows: list[dict], column: str) -> tuple[list[dict], dict | None]:
    """The log rows before the first one whose training loss or `column` is not a finite number (an LR
    high enough to overflow: past it the curve says nothing), and that row (None when all are finite)."""
    for i, r in enumerate(rows):
        for key in ("loss", column):
            value = r.get(key)
            if value in ("", None) and key == column:
                continue
            try:
                ok = math.isfinite(float(value))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                return rows[:i], r
    return rows, None


def _write_json(path: Path, data: dict) -> None:
    from embedtrain.fileio import atomic_write_text
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _write_range_files(out_dir: Path, rows, column, meas, sug, report) -> None:
    from embedtrain.fileio import atomic_path
    train = [float(r["loss"]) for r in rows]
    train_s = smooth(train) if train else []
    val_s = dict(zip([m[0] for m in meas], sug["smoothed"] or [None] * len(meas)))
    val = {m[0]: m[2] for m in meas}
    with atomic_path(out_dir / "lr_find.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["update", "lr", "loss", "loss_smoothed", "val_loss", "val_loss_smoothed"])
            w.writerow([0, meas[0][1], "", "", _g(val[0]), _g(val_s.get(0))])
            for r, ts in zip(rows, train_s):
                u = int(r["update"])
                w.writerow([u, r["lr"], r["loss"], _g(ts), _g(val.get(u)), _g(val_s.get(u))])
    _write_json(out_dir / "lr_find.json", report)
    _plot_range(out_dir / "lr_find.png", rows, train_s, meas, sug, report)


def _g(x):
    return "" if x is None else f"{x:.6g}"


def _plot_range(path: Path, rows, train_s, meas, sug, report) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    lrs = [m[1] for m in meas]
    label = "validation loss" if report["loss"] == "val_loss" else "stabilized training loss"
    ax.plot(lrs, [m[2] for m in meas], "o", ms=3, color="tab:blue", alpha=0.5, label=label)
    if sug["smoothed"]:
        ax.plot(lrs, sug["smoothed"], "-", color="tab:blue", lw=2, label=f"{label}, smoothed")
    if rows:
        ax2 = ax.twinx()
        ax2.plot([float(r["lr"]) for r in rows], train_s, "-", color="tab:gray", lw=1, alpha=0.6,
                 label="training loss, smoothed")
        ax2.set_ylabel("training loss (smoothed)", color="tab:gray")
    for key, colour in (("lower", "tab:green"), ("midpoint", "tab:orange"), ("upper", "tab:red")):
        if report[key] is not None:
            ax.axvline(report[key], color=colour, ls="--", lw=1.2, label=f"{key} {report[key]:.3g}")
    if report["ramp"] == "exponential":
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(label)
    title = (f"range test: lower {report['lower']:.3g}, upper {report['upper']:.3g}" if report["lower"] is not None
             else "range test: no suggestion")
    _finish_plot(fig, ax, title, report["warnings"], path)


def sweep(cfg: TrainConfig, out_dir, *, candidates=None, epochs: float = 8, val_every: int | None = None,
          trainer=None, log=print, stop=None) -> dict:
    """Run one constant-LR run of `epochs` epochs per candidate LR, each from the same fresh embedding
    (same seed, same data order, one model and one latent cache), and write sweep.csv / .json / .png.

    candidates: LRs (default `default_candidates(cfg.lr)`). val_every: updates between validation
    measurements (default: every epoch, but at least 8 measurements per run). Returns the JSON dict.
    """
    from embedtrain.calculator import derive
    from embedtrain.trainer import Trainer

    candidates = sorted(float(c) for c in (candidates or default_candidates(cfg.lr)))
    if not all(math.isfinite(c) and 0 < c <= MAX_LR for c in candidates) or len(set(candidates)) != len(candidates):
        raise ConfigError(f"candidates must be different LRs, each a number > 0 and <= {MAX_LR:g}, got {candidates}")
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and 0 < epochs <= MAX_SWEEP_EPOCHS):
        raise ConfigError(f"epochs must be a number > 0 and <= {MAX_SWEEP_EPOCHS} (the length of each candidate "
                          f"run), got {epochs!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = trainer or Trainer(cfg, log=log)
    load_s = time.perf_counter() - t0
    base = trainer.cfg
    upe = derive(len(trainer.train_samples), base.batch_size, base.grad_accum, 1, "update", repeats=base.repeats,
                 processes=trainer.world).updates_per_epoch
    updates = max(2, math.ceil(epochs * upe - 1e-9))
    if val_every is None:
        val_every = max(1, min(math.floor(upe + 0.5), updates // 8))
    if not (isinstance(val_every, int) and 1 <= val_every <= updates // 2):
        raise ConfigError(f"val_every must be between 1 and {updates // 2} (at least 2 measurements over the "
                          f"{updates} updates of each run), got {val_every!r}")
    which, column = _which(trainer)
    trainer.reset_embedding()
    start_loss = trainer.fixed_loss(which)
    log(f"sweep: {len(candidates)} candidates x {epochs:g} epochs = {updates} updates each, validation every "
        f"{val_every} updates; at the start {start_loss:.5f}")
    runs, curves, times = [], [], []
    for k, lr in enumerate(candidates, start=1):
        if stop and stop():
            break
        trainer.set_run(lr=lr, lr_schedule="constant", lr_warmup=0, steps=updates, step_unit="update",
                 val_every=val_every)
        trainer.reset_embedding()
        t = time.perf_counter()
        run_dir = out_dir / f"lr{k}-{lr:.3g}"
        result = trainer.run(run_dir, stop=stop)
        (run_dir / "resume.pt").unlink(missing_ok=True)
        times.append(time.perf_counter() - t)
        rows, cut = finite_rows(read_log_rows(run_dir / "log.csv"), column)
        pts = [(0, start_loss)] + [(int(r["update"]), float(r[column])) for r in rows if r.get(column) not in ("", None)]
        # a run that failed before its first measurement has only the start point: read it as flat
        curve = pts if len(pts) >= 2 else pts + [(pts[0][0] + 1, pts[0][1])]
        c = classify_curve([p[0] for p in curve], [p[1] for p in curve])
        c["sentence"] = describe_curve(lr, c)
        if result.status == "stopped":
            c["note"] = f" (stopped at update {result.updates} of {updates})"
        if cut is not None and result.status != "failed":
            c.update(verdict="no_learning", rises=True, failed=True,
                     sentence=f"LR {lr:.3g}: does not learn: the loss became non-finite at update {cut['update']}")
        if result.status == "failed":
            c.update(verdict="no_learning", rises=True, failed=True,
                     sentence=f"LR {lr:.3g}: does not learn: {result.message}")
        log("  " + c["sentence"] + c.get("note", ""))
        runs.append({"lr": lr, "run_dir": str(run_dir), "points": pts, "rows": rows, "status": result.status})
        curves.append(c)
    if not curves:
        raise EmbedtrainError("sweep stopped before its first candidate finished")
    lrs = [r["lr"] for r in runs]
    rec, reasons = recommend(lrs, curves)
    for c, text in zip(curves, describe_all(lrs, curves)):  # the wording can depend on the neighbours
        if not c.get("failed"):
            c["sentence"] = text + c.get("note", "")
    warnings = _merged_warnings(trainer)
    report = {
        "recommended_lr": rec, "reasons": reasons, "warnings": warnings,
        "candidates": [{"lr": r["lr"], "verdict": c["verdict"], "verdict_words": VERDICTS[c["verdict"]],
                        "sentence": c["sentence"], "turns_up_after": c["turns_up_after"], "bumps": c["bumps"],
                        "start_loss": c["start"], "best_loss": c["best"], "best_update": c["best_update"],
                        "final_loss": c["end"], "run_dir": r["run_dir"], "status": r["status"]}
                       for r, c in zip(runs, curves)],
        "epochs": epochs, "updates": updates, "val_every": val_every, "loss": column,
        "updates_per_epoch": upe, "validation_images": len(trainer.val_samples),
        "training_images": len(trainer.train_samples), "batch_size": base.batch_size, "grad_accum": base.grad_accum,
        "load_s": round(load_s, 2), "run_s": [round(t, 2) for t in times],
    }
    _write_sweep_files(out_dir, runs, curves, report)
    return report


def _write_sweep_files(out_dir: Path, runs, curves, report) -> None:
    from embedtrain.fileio import atomic_path
    with atomic_path(out_dir / "sweep.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["lr", "update", "epoch", "loss", report["loss"], "verdict"])
            for r, c in zip(runs, curves):
                val = dict(r["points"])
                w.writerow([r["lr"], 0, 0, "", _g(val[0]), c["verdict"]])
                for row in r["rows"]:
                    u = int(row["update"])
                    w.writerow([r["lr"], u, row["epoch"], row["loss"], _g(val.get(u)), c["verdict"]])
    _write_json(out_dir / "sweep.json", report)
    _plot_sweep(out_dir / "sweep.png", runs, curves, report)


def _plot_sweep(path: Path, runs, curves, report) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    for r, c in zip(runs, curves):
        pts = r["points"]
        best = r["lr"] == report["recommended_lr"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, lw=2.5 if best else 1.2,
                label=f"{r['lr']:.3g}: {VERDICTS[c['verdict']]}" + ("  (recommended)" if best else ""))
    ax.set_xlabel("weight update")
    ax.set_ylabel("validation loss" if report["loss"] == "val_loss" else "stabilized training loss")
    rec = report["recommended_lr"]
    title = f"sweep, {report['epochs']:g} epochs each: " + (f"use {rec:.3g}" if rec else "no recommendation")
    _finish_plot(fig, ax, title, report["warnings"], path)


# ====================================================================== command lines

COMMANDS = {
    "lr-find": ("python -m embedtrain lr-find",
                "Learning-rate range test: ramp the LR from a fresh embedding and read the validation loss."),
    "sweep": ("python -m embedtrain sweep",
              "Short constant-LR runs from the same fresh embedding; recommends the highest LR whose validation "
              "loss keeps falling."),
}


def parser(command: str) -> argparse.ArgumentParser:
    """The flags of `lr-find` or `sweep`: the finder's own, then every flag of `train`."""
    prog, description = COMMANDS[command]
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="JSON file of settings (flags override it)")
    if command == "lr-find":
        g = p.add_argument_group("range test")
        g.add_argument("--ramp", choices=RAMPS, default="linear",
                       help="how the LR rises (default: linear; docs/guide.md#range-test)")
        g.add_argument("--start-lr", type=float, help="first LR (default: 0 linear, end-lr/1000 exponential)")
        g.add_argument("--end-lr", type=float, help="last LR (default: 10 x --lr)")
        g.add_argument("--updates", type=int, default=60, help="ramp length in weight updates (default: 60)")
    else:
        g = p.add_argument_group("sweep")
        g.add_argument("--candidates", help="LRs to try, e.g. '5e-4,1.6e-3,5e-3' (default: 4 log-spaced, lr/10 "
                                            "to 3.2 x lr)")
        g.add_argument("--epochs", type=float, default=8, help="length of each run in epochs (default: 8; the guide's "
                                                              "runs were 20 on a GPU: docs/guide.md#sweep)")
    add_arguments(p)
    return p


# The finder's own options (the flags of `parser`, by dest) and their defaults when not given.
OPTIONS = {"lr-find": {"ramp": "linear", "start_lr": None, "end_lr": None, "updates": 60},
           "sweep": {"candidates": None, "epochs": 8.0}}


def prepare(command: str, argv) -> tuple[TrainConfig, argparse.Namespace, list[str], Path]:
    """Parse and check a finder command line without loading anything: (cfg, args, notes, out_dir)."""
    args = parser(command).parse_args(argv)
    typed = {f.name for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        typed |= set(read_settings(args.config))
    cfg = config_from_args(args, args.config)
    options = {k: getattr(args, k) for k in OPTIONS[command]}
    cfg, options, notes, out_dir = settle(command, cfg, typed, options)
    for k, v in options.items():
        setattr(args, k, v)
    return cfg, args, notes, out_dir


def settle(command: str, cfg: TrainConfig, typed: set[str], options: dict):
    """The checks and defaults of a finder run, whoever asks (a command line or the web UI): the finder's
    changes to the settings (finder_config), the options checked (sweep candidates parsed, the range test's
    ramp), and the run folder, refused if it already holds a run. Returns (cfg, options, notes, out_dir)."""
    options = {**OPTIONS[command], **{k: v for k, v in options.items() if v is not None}}
    notes = []
    if "steps" in typed or "step_unit" in typed:
        notes.append("--steps/--step-unit are ignored here: the length is --updates (lr-find) or --epochs (sweep)")
    cfg, more = finder_config(cfg, typed)
    cfg = cfg.validate()
    if command == "sweep":
        c = options["candidates"]
        options["candidates"] = (parse_candidates(c) if isinstance(c, str) else list(c)) if c else \
            default_candidates(cfg.lr)
        if not (isinstance(options["epochs"], (int, float)) and math.isfinite(options["epochs"])
                and 0 < options["epochs"] <= MAX_SWEEP_EPOCHS):
            raise ConfigError(f"epochs must be a number > 0 and <= {MAX_SWEEP_EPOCHS}, got {options['epochs']!r}")
    else:
        ramp_settings(cfg.lr, options["ramp"], options["start_lr"], options["end_lr"], options["updates"],
                      cfg.val_every if "val_every" in typed else None)
    kind = "lrfind" if command == "lr-find" else "sweep"
    from embedtrain.config import check_safe_name, default_run_name
    from embedtrain.trainer import refuse_existing_run
    out_dir = Path(cfg.out) / check_safe_name(cfg.run_name or default_run_name(cfg.name, kind), "run_name")
    refuse_existing_run(out_dir, resumable=False)  # its curves and run folders would mix with the new ones
    return cfg, options, notes + more, out_dir


def request(command: str, settings: dict, options: dict) -> tuple[TrainConfig, dict, Path, list[str]]:
    """A finder run as the web UI asks for it: `settings` are TrainConfig fields (out and run_name included),
    `options` the finder's own. Checked exactly as a command line is (settle), with no argparse in the server.
    Returns (cfg, options, out_dir, argv): argv is the process's command line once `settings` are written to
    OUT_DIR/job.json, which it reads with --config (so the process sees what was checked)."""
    from embedtrain.config import apply_preset, lr_fields
    settings = dict(settings)
    options = {k: (int(v) if isinstance(v, float) and v.is_integer() and k == "updates" else v)
               for k, v in options.items() if v not in (None, "")}
    if "lr" in settings:
        settings.update(lr_fields(settings["lr"]))   # a number, or A1111's piecewise text
    cfg = apply_preset(TrainConfig.from_dict(settings), set(settings))
    cfg, options, _, out_dir = settle(command, cfg, set(settings), options)
    argv = [command, "--config", str(out_dir / "job.json")]
    for key, value in options.items():
        if value is not None:
            text = ",".join(f"{v:g}" for v in value) if key == "candidates" else str(value)
            argv += ["--" + key.replace("_", "-"), text]
    return cfg, options, out_dir, argv


def _stop_control(out_dir: Path):
    """Ctrl-C, SIGTERM or a STOP file in the finder's folder end the current run early; what ran is read."""
    import signal
    asked = {"n": 0}

    def on_signal(signum, frame):
        asked["n"] += 1
        if asked["n"] > 1:
            raise KeyboardInterrupt
        print("\nstop requested: finishing the current update and reading what ran", file=sys.stderr)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_file = out_dir / "STOP"
    stop_file.unlink(missing_ok=True)

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    return (lambda: asked["n"] > 0 or stop_file.exists()), restore


def _run(command: str, argv) -> int:
    try:
        cfg, args, notes, out_dir = prepare(command, argv)
        for n in notes:
            print(f"note: {n}")
        out_dir.mkdir(parents=True, exist_ok=True)
        stop, restore = _stop_control(out_dir)
        val_every = getattr(args, "val_every", None) or None
        try:
            if command == "lr-find":
                report = range_test(cfg, out_dir, ramp=args.ramp, start_lr=args.start_lr, end_lr=args.end_lr,
                                    updates=args.updates, val_every=val_every, stop=stop)
            else:
                report = sweep(cfg, out_dir, candidates=args.candidates, epochs=args.epochs, val_every=val_every,
                               stop=stop)
        finally:
            restore()
    except EmbedtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only or vanished folder while writing the curves or run folders
        print(f"error: cannot write {e.filename or 'the results'}: {e.strerror or e}", file=sys.stderr)
        return 2
    for w in report["warnings"]:
        print(f"warning: {w}")
    if command == "lr-find":
        ok = report["lower"] is not None
        print(f"lower {report['lower']:.3g}  upper {report['upper']:.3g}  midpoint {report['midpoint']:.3g}" if ok
              else "no suggestion:")
        names = ("lr_find.csv", "lr_find.json", "lr_find.png")
    else:
        ok = report["recommended_lr"] is not None
        print(f"recommended LR: {report['recommended_lr']:.3g}" if ok else "no recommendation:")
        names = ("sweep.csv", "sweep.json", "sweep.png")
    for r in report["reasons"]:
        print(f"  {r}")
    if command == "sweep":
        for c in report["candidates"]:
            print(f"  - {c['sentence']}")
    print("wrote " + ", ".join(str(out_dir / n) for n in names))
    return 0 if ok else 1


def cli_lr_find(argv) -> int:
    return _run("lr-find", argv)


def cli_sweep(argv) -> int:
    return _run("sweep", argv)


def _finish_plot(fig, ax, title: str, warnings: list[str], path) -> None:
    """Title (with the small-validation-set caveat when it applies), legend, atomic PNG write."""
    import matplotlib.pyplot as plt

    from embedtrain.fileio import atomic_path
    if any("small validation" in w for w in warnings):
        title += "  (small validation set: read with care)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
