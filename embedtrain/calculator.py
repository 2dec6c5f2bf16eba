"""The arithmetic of steps, epochs and weight updates (docs/guide.md: "Steps, GA and full-cycle", "Cyclical LR").

Every trainer counts differently, so users argue about "steps". This module is the one place where
the words are turned into numbers, and the trainer, the CLI and the UI all call it:

- images: training images after the validation split, times `repeats`;
- batch size (BS): images in one forward/backward pass; `processes` data-parallel copies each take
  their own batch, so one batch shows BS x processes images;
- gradient accumulation (GA): batches summed into one weight update;
- step: what the user types, counted in `step_unit` "update" (weight updates) or "batch" (batches);
- epoch: images shown / images, a fraction is fine;
- full-cycle: BS x GA x processes == images, so each update sees every image once.

Sampling is an endless stream of per-epoch shuffles in which batches may straddle an epoch boundary,
so these formulas are exact: weight updates = floor(batches / GA), epochs = batches x BS x processes /
images. Divisions are done on exact fractions so that ceilings and floors never miss by one because
of a float such as 0.1.

Pure standard library: no torch, numpy or gradio import (`python -m embedtrain calc` answers at once).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from embedtrain import EmbedtrainError

STEP_UNITS = ("update", "batch")


class CalcError(EmbedtrainError):
    """A calculator input is invalid. The message starts with the field name; `field` holds it too,
    so the CLI can show the flag (--batch-size) instead of the field (batch_size)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# ------------------------------------------------------------------ input checks

def _show(value) -> str:
    """The value as the user typed it: CLI text unquoted ("got 0"), an empty text visibly (''), an
    empty UI number box (None) as "nothing"."""
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return value.strip() or repr(value)
    return str(value)


# Larger counts mean a typo, and would make the divisor search of the full-cycle settings slow.
MAX_COUNT = 10**9


def _whole(name: str, value, minimum: int = 1) -> int:
    """An integer in [minimum, MAX_COUNT]. UI number boxes and JSON hand us 13.0 or "13", so those are
    accepted; 13.5, True, nan and "abc" are not."""
    n = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, numbers.Real):
        n = int(value) if float(value).is_integer() else None
    elif isinstance(value, str):
        text = value.strip()
        try:
            n = int(text)
        except ValueError:
            try:
                f = float(text)
                n = int(f) if f.is_integer() else None
            except ValueError:
                n = None
    if n is None or n < minimum:
        raise CalcError(f"{name} must be a whole number >= {minimum}, got {_show(value)}", name)
    if n > MAX_COUNT:
        raise CalcError(f"{name} must be a whole number <= {MAX_COUNT:,}, got {_show(value)}", name)
    return n


def _real(name: str, value, what: str, ok) -> float:
    """A finite number for which ok(x) holds; `what` says what is valid, for the message."""
    x = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            x = None
    if x is None or not math.isfinite(x) or not ok(x):
        raise CalcError(f"{name} must be {what}, got {_show(value)}", name)
    return x


def _exact(x) -> Fraction:
    """The decimal the user meant: 0.1 becomes 1/10, not the binary float just above it (a Fraction as it is)."""
    return Fraction(x) if isinstance(x, (int, Fraction)) else Fraction(repr(float(x)))


def _step_unit(value) -> str:
    unit = value.strip().lower() if isinstance(value, str) else value
    if unit not in STEP_UNITS:
        raise CalcError(f"step_unit must be one of {', '.join(STEP_UNITS)}, got {_show(value)}", "step_unit")
    return unit


def _settings(images, batch_size, grad_accum, processes) -> tuple[int, int, int, int]:
    """Check one training setting and that a batch fits in the images."""
    n = _whole("images", images)
    bs = _whole("batch_size", batch_size)
    ga = _whole("grad_accum", grad_accum)
    p = _whole("processes", processes)
    # One batch takes BS x processes distinct images from the stream; more than the epoch holds would
    # show some image twice in one batch, which is never what the user meant.
    if bs * p > n:
        shown = f"batch_size {bs}" if p == 1 else f"batch_size {bs} x {p} processes = {bs * p}"
        raise CalcError(f"{shown} is larger than the {n} training images; lower it or add repeats", "batch_size")
    return n, bs, ga, p


def _fmt(x) -> str:
    """Whole numbers plainly, others with up to 4 decimals (346.1538, 0.5098)."""
    x = float(x)
    if x.is_integer():
        return str(int(x))
    return f"{x:.4f}".rstrip("0").rstrip(".")


def _times(*factors) -> str:
    return " x ".join(str(f) for f in factors)


# ------------------------------------------------------------------ the split

def split_counts(images, val_split=0.0) -> tuple[int, int]:
    """(training, validation) image counts for a folder of `images` images.

    The rule, shared with the trainer's seeded split (data.split): validation = round(images x
    val_split), rounding halves up (Python's round() would send 2.5 to 2), and at least 1 whenever
    val_split > 0, because a user who asked for validation must get some. A split that would leave no
    training image is refused.
    """
    n = _whole("images", images)
    f = _real("val_split", val_split, "a number in [0, 1)", lambda x: 0 <= x < 1)
    if f == 0:
        return n, 0
    val = max(1, math.floor(n * _exact(f) + Fraction(1, 2)))
    if val >= n:
        raise CalcError(f"val_split {f:g} leaves no training image: {val} of the {n} images would be "
                        "validation images; lower val_split or add images", "val_split")
    return n - val, val


# ------------------------------------------------------------------ derived numbers

@dataclass(frozen=True)
class Derived:
    """Every number that follows from one training setting; names are the words of this module's docstring."""

    images: int                # training images after the split, times repeats
    batch_size: int
    grad_accum: int
    processes: int             # data-parallel processes; one batch shows batch_size x processes images
    step_unit: str             # "update" or "batch": what `steps` counts
    steps: int
    batches: int
    weight_updates: int
    images_shown: int          # batches x batch_size x processes
    epochs: float              # images_shown / images, exact
    epochs_floor: int          # whole epochs completed (what docs/guide.md#steps-and-ga reports)
    batches_per_epoch: float   # images / (batch_size x processes)
    updates_per_epoch: float   # images / (batch_size x grad_accum x processes)
    full_cycle: bool           # images == batch_size x grad_accum x processes
    incomplete_batches: int    # batches % grad_accum: trailing batches with no weight update (step_unit "batch")
    straddle: int              # images of the first epoch's last update that belong to a later epoch
    repeats: int = 1           # how `images` was made: (folder images - validation_images) x repeats
    validation_images: int = 0

    @property
    def images_per_update(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    @property
    def updates_per_epoch_exact(self) -> Fraction:
        """updates_per_epoch as an exact fraction (10 images, BS 3: 10/3, not 3.3333333333333335), for
        rounding k x epoch to whole updates (step_size_for_k) without a float's error deciding a half."""
        return Fraction(self.images, self.images_per_update)

    @property
    def batches_run(self) -> int:
        """Batches embedtrain's trainer runs: the incomplete accumulation group at the end would change
        nothing (no weight update follows it), so it is skipped."""
        return self.weight_updates * self.grad_accum

    @property
    def epochs_run(self) -> float:
        """Epochs the trainer shows: batches_run x BS x processes / images (= epochs unless
        incomplete_batches > 0)."""
        return self.batches_run * self.batch_size * self.processes / self.images

    def formula_rows(self) -> list[tuple[str, str, str]]:
        """(name, formula with the numbers filled in, value) for every derived number."""
        p = self.processes
        per_batch = f"({_times(self.batch_size, p)})" if p > 1 else str(self.batch_size)
        u = self.images_per_update
        bs_p = "(BS x processes)" if p > 1 else "BS"
        bs_ga_p = "(BS x GA x processes)" if p > 1 else "(BS x GA)"
        train = self.images // self.repeats
        if self.validation_images or self.repeats > 1:
            rows = [("images", f"(folder images - validation) x repeats = ({train + self.validation_images} - "
                               f"{self.validation_images}) x {self.repeats}", str(self.images))]
        else:
            rows = [("images", "images in the folder", str(self.images))]
        if self.step_unit == "update":
            rows += [("weight_updates", f"steps = {self.steps}", str(self.weight_updates)),
                     ("batches", f"steps x GA = {_times(self.steps, self.grad_accum)}", str(self.batches))]
        else:
            rows += [("batches", f"steps = {self.steps}", str(self.batches)),
                     ("weight_updates", f"floor(batches / GA) = floor({self.batches} / {self.grad_accum})",
                      str(self.weight_updates))]
        rows += [
            ("images_shown", f"batches x {bs_p.strip('()')} = {self.batches} x {per_batch.strip('()')}", str(self.images_shown)),
            ("epochs", f"images_shown / images = {self.images_shown} / {self.images}", _fmt(self.epochs)),
            ("epochs_floor", f"floor(epochs) = floor({_fmt(self.epochs)})", str(self.epochs_floor)),
            ("batches_per_epoch", f"images / {bs_p} = {self.images} / {per_batch}", _fmt(self.batches_per_epoch)),
            ("updates_per_epoch", f"images / {bs_ga_p} = {self.images} / {self.images_per_update}",
             _fmt(self.updates_per_epoch)),
            ("full_cycle", f"images == {bs_ga_p.strip('()')}: {self.images} {'==' if self.full_cycle else '!='} "
                           f"{self.images_per_update}", "yes" if self.full_cycle else "no"),
            ("incomplete_batches", f"batches mod GA = {self.batches} mod {self.grad_accum}",
             str(self.incomplete_batches)),
            ("straddle", f"U x ceil(images / U) - images, U = {bs_ga_p.strip('()')} = {u}: "
                         f"{u} x ceil({self.images} / {u}) - {self.images}",
             str(self.straddle)),
        ]
        return rows

    def formulas(self) -> list[str]:
        """Human-readable "name = formula = value" lines, in the order a reader needs them."""
        return [f"{name} = {formula} = {value}" for name, formula, value in self.formula_rows()]

    def notes(self) -> list[str]:
        """Sentences for the numbers that surprise people; empty when nothing is surprising."""
        out = []
        if self.incomplete_batches:
            out.append(f"the last {self.incomplete_batches} of the {self.batches} batches end without a weight "
                       f"update ({self.batches} is not a multiple of GA {self.grad_accum}); embedtrain skips "
                       f"them, so it trains {self.batches_run} batches = {_fmt(self.epochs_run)} epochs")
        if self.straddle:
            out.append(f"updates do not line up with epochs: the update that finishes the first epoch takes "
                       f"{self.straddle} images from the next one")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "batches_run": self.batches_run, "epochs_run": self.epochs_run}


def derive(images, batch_size, grad_accum, steps, step_unit="update", repeats=1, val_split=0.0,
           processes=1) -> Derived:
    """Everything that follows from one setting.

    Args:
        images: images in the folder (before the validation split and repeats).
        batch_size, grad_accum: BS and GA, whole numbers >= 1.
        steps: the run length, counted in step_unit ("update": weight updates; "batch": batches).
        repeats: times each training image appears per epoch (A1111 style).
        val_split: fraction held out for validation, in [0, 1); see split_counts for the rule.
        processes: data-parallel processes; each takes its own batch of batch_size images.
    Raises CalcError naming the field for any bad input, when one batch needs more images than there
    are training images, and when the steps (in batches) are too few for a single weight update.
    """
    train, val = split_counts(images, val_split)
    reps = _whole("repeats", repeats)
    if train * reps > MAX_COUNT:
        raise CalcError(f"repeats {reps} makes {train} x {reps} = {train * reps:,} training images, more than "
                        f"{MAX_COUNT:,}; lower repeats", "repeats")
    n, bs, ga, p = _settings(train * reps, batch_size, grad_accum, processes)
    steps = _whole("steps", steps)
    unit = _step_unit(step_unit)

    if unit == "batch" and steps < ga:
        raise CalcError(f"steps {steps} (batches) with grad_accum {ga} make no weight update: with step_unit batch, "
                        f"steps must be at least grad_accum ({ga})", "steps")
    batches = steps * ga if unit == "update" else steps
    shown = batches * bs * p
    per_update = bs * ga * p
    return Derived(
        images=n, batch_size=bs, grad_accum=ga, processes=p, step_unit=unit, steps=steps,
        batches=batches, weight_updates=batches // ga, images_shown=shown,
        epochs=shown / n, epochs_floor=shown // n,
        batches_per_epoch=n / (bs * p), updates_per_epoch=n / per_update,
        full_cycle=n == per_update, incomplete_batches=batches % ga,
        straddle=-n % per_update,  # = ceil(n / per_update) x per_update - n
        repeats=reps, validation_images=val,
    )


# ------------------------------------------------------------------ full-cycle settings

def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _pairs(n: int, cap: int, processes: int) -> list[tuple[int, int]]:
    if n % processes:
        return []
    per = n // processes
    return [(per // ga, ga) for ga in _divisors(per) if per // ga <= cap]


def full_cycle_settings(images, max_batch_size=None, processes=1) -> list[tuple[int, int]]:
    """Every (batch_size, grad_accum) with batch_size x grad_accum x processes == images, batch_size <=
    max_batch_size (what the GPU fits; None = no cap), lowest GA first as docs/guide.md#steps-and-ga advises.

    Empty when images is not a multiple of processes.
    """
    n = _whole("images", images)
    p = _whole("processes", processes)
    cap = n if max_batch_size is None else _whole("max_batch_size", max_batch_size)
    return _pairs(n, cap, p)


@dataclass(frozen=True)
class FullCycleOption:
    """A change to the data that makes a full-cycle setting with BS > 1 possible."""

    change: str       # "drop", "add" or "repeats"
    k: int            # images dropped or added, or the repeats factor
    images: int       # the image count after the change
    batch_size: int   # its lowest-GA full-cycle setting within the cap
    grad_accum: int

    def text(self, processes: int = 1) -> str:
        what = {"drop": f"drop {self.k} image{'s' if self.k > 1 else ''}", "add": f"add {self.k}",
                "repeats": f"repeats {self.k}"}[self.change]
        tail = f" x {processes} processes" if processes > 1 else ""
        return f"{what} -> {self.images} = {self.batch_size} x {self.grad_accum}{tail}"


@dataclass(frozen=True)
class FullCycleAdvice:
    """Full-cycle settings for a count of images and, when only BS = 1 fits, the nearest way out."""

    images: int
    max_batch_size: int
    processes: int
    settings: list          # (batch_size, grad_accum) pairs within the cap, lowest GA first
    good: bool              # some pair has batch_size > 1
    drop: FullCycleOption | None = None
    add: FullCycleOption | None = None
    repeats: list = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _best(n: int, cap: int, processes: int) -> tuple[int, int] | None:
    """The lowest-GA full-cycle pair with batch_size > 1, or None."""
    good = [pair for pair in _pairs(n, cap, processes) if pair[0] > 1]
    return good[0] if good else None


def nearest_full_cycle(images, max_batch_size=None, processes=1, n_repeats=3) -> FullCycleAdvice:
    """Full-cycle settings for `images`, and when the only one within the cap is the trivial BS = 1
    (a prime such as 29 with a cap of 8), the nearest alternatives: drop or add the fewest images, or
    repeat the images (the first `n_repeats` factors that work). The message says it in one line.
    """
    n = _whole("images", images)
    p = _whole("processes", processes)
    cap = n if max_batch_size is None else _whole("max_batch_size", max_batch_size)
    settings = _pairs(n, cap, p)
    on = f" on {p} processes" if p > 1 else ""
    tail = f" x {p} processes" if p > 1 else ""
    if _best(n, cap, p):
        listed = ", ".join(f"{bs} x {ga}{tail}" for bs, ga in settings)
        return FullCycleAdvice(n, cap, p, settings, True,
                               message=f"{n} images{on}: full-cycle BS x GA = {listed}")
    if cap == 1:
        only = f"BS 1 x GA {n // p}{tail}" if settings else "none"
        return FullCycleAdvice(n, cap, p, settings, False, message=(
            f"{n} images{on}: with max_batch_size 1 the only full-cycle setting is {only}; "
            "a larger batch size needs more GPU memory"))

    def option(change, k, m):
        pair = _best(m, cap, p)
        return FullCycleOption(change, k, m, *pair) if pair else None

    drop = next((o for k in range(1, n) if (o := option("drop", k, n - k))), None)
    # Adding 2 x processes images always reaches a multiple with BS 2, so this loop ends.
    add = next(o for k in range(1, 2 * p + 1) if (o := option("add", k, n + k)))
    reps = [o for r in range(2, 2 + 4 * p * n_repeats) if (o := option("repeats", r, n * r))][:n_repeats]

    prime = n > 1 and p == 1 and _divisors(n) == [1, n]
    head = f"{n} is prime" if prime else f"{n} images{on}"
    choices = [o.text(p) for o in (drop, add) if o]
    if reps:
        choices.append("or " + ", ".join(o.text(p) for o in reps))
    message = (f"{head}: no full-cycle pair with 1 < BS <= {cap}; nearest (BS x GA): " + "; ".join(choices))
    return FullCycleAdvice(n, cap, p, settings, False, drop, add, reps, message)


# ------------------------------------------------------------------ steps for a target

def steps_for_target(images, batch_size, grad_accum, step_unit, epochs=None, updates=None, processes=1) -> int:
    """Steps, counted in step_unit, that reach a target number of epochs or of weight updates
    (give exactly one). Rounded up, so the target is always reached.

    `images` are training images (after split and repeats), as in Derived.images.
    """
    n, bs, ga, p = _settings(images, batch_size, grad_accum, processes)
    unit = _step_unit(step_unit)
    if (epochs is None) == (updates is None):
        raise CalcError("epochs and updates: give exactly one target, got "
                        f"epochs={_show(epochs)}, updates={_show(updates)}", "epochs")
    if updates is not None:
        u = _whole("updates", updates)
        return u if unit == "update" else u * ga
    e = _real("epochs", epochs, "a number > 0", lambda x: x > 0)
    needed = _exact(e) * n  # images that must be shown
    if unit == "batch":
        return math.ceil(needed / (bs * p))
    return math.ceil(needed / (bs * ga * p))


# ------------------------------------------------------------------ cyclical learning rates

def updates_per_epoch(images, batch_size, grad_accum=1, processes=1) -> float:
    """Weight updates per epoch: images / (BS x GA x processes). 16 images, BS 4 -> 4."""
    n, bs, ga, p = _settings(images, batch_size, grad_accum, processes)
    return n / (bs * ga * p)


def step_size_for_k(k, updates_per_epoch, minimum: int = 0) -> int:
    """Smith's step size in updates: a half cycle of k epochs (he suggests k = 2..10) is k x updates per
    epoch, rounded half up to whole updates (2.5 x 5 = 12.5 -> 13, where Python's round() gives the even
    12) and at least `minimum`.

    The one rounding of "k x epoch": lr_step_size_epochs in schedules.py, step_size_for_epochs here, and
    the LR finder's suggested step sizes all call it. The product is exact on the decimals given (k 0.1 is
    1/10) or on a Fraction (Derived.updates_per_epoch_exact). With the default minimum 0, k x epoch below
    half an update gives 0, which schedules.py refuses naming the field; suggestions pass minimum=1."""
    kk = _real("k", k, "a number > 0 (epochs per half cycle)", lambda x: x > 0)
    _real("updates_per_epoch", updates_per_epoch, "a number > 0", lambda x: x > 0)
    product = _exact(k if isinstance(k, Fraction) else kk) * _exact(updates_per_epoch)
    return max(minimum, math.floor(product + Fraction(1, 2)))


def step_size_for_epochs(k, images, batch_size, grad_accum=1, processes=1) -> int:
    """Smith's step size (updates per half cycle) as k x updates per epoch for one training setting,
    rounded half up to whole updates and at least 1 (step_size_for_k)."""
    _real("k", k, "a number > 0 (epochs per half cycle)", lambda x: x > 0)
    n, bs, ga, p = _settings(images, batch_size, grad_accum, processes)
    return step_size_for_k(k, Fraction(n, bs * ga * p), minimum=1)


def cycles_for_run(total_updates, step_size) -> float:
    """Cycles in a run: a cycle is two step sizes (up and down). 800 updates, step size 40 -> 10."""
    total = _whole("total_updates", total_updates)
    s = _whole("step_size", step_size)
    return total / (2 * s)


def updates_for_cycles(cycles, step_size) -> int:
    """Run length for a number of cycles, rounded up: 5.5 cycles of step size 50 -> 550 updates."""
    c = _real("cycles", cycles, "a number > 0", lambda x: x > 0)
    s = _whole("step_size", step_size)
    return math.ceil(_exact(c) * 2 * s)


def step_size_for_cycles(total_updates, cycles) -> int:
    """The reverse: the step size that fits `cycles` cycles into a run (docs/guide.md#cyclical-lr: on small
    datasets k x epoch gives too many cycles). Rounded half up, at least 1."""
    total = _whole("total_updates", total_updates)
    c = _real("cycles", cycles, "a number > 0", lambda x: x > 0)
    return max(1, math.floor(Fraction(total) / (2 * _exact(c)) + Fraction(1, 2)))


def low_point_run(step_size, min_updates) -> int:
    """The shortest run of at least min_updates updates lasting n.5 cycles (n = 0, 1, ...), i.e. an odd
    number of step sizes. A cycle that starts at its top then ends on the low point, as the guide's
    5.5-cycle runs did (schedules.low_point_updates with start="high"). Step 50, 500 -> 550."""
    s = _whole("step_size", step_size)
    m = _whole("min_updates", min_updates)
    half_cycles = max(0, -(-(m - s) // (2 * s)))  # ceil((m - s) / 2s) in integers
    return (2 * half_cycles + 1) * s


# ------------------------------------------------------------------ the steps-vs-GA study

STUDY_NAMES = {  # the guide's convention: lower case = low
    "gaST": "low GA, high steps", "gast": "low GA, low steps",
    "GAST": "high GA, high steps", "GAst": "high GA, low steps",
}


@dataclass(frozen=True)
class StudyRun:
    """One of the four runs of the "Steps and GA" study (docs/guide.md#steps-and-ga)."""

    name: str             # gaST, gast, GAST or GAst
    meaning: str          # "low GA, high steps", ...
    batch_size: int
    grad_accum: int
    steps: int
    step_unit: str
    batches: int
    weight_updates: int
    epochs: float         # exact
    epochs_floor: int     # what the guide reports

    def to_dict(self) -> dict:
        return asdict(self)


def _pair(name: str, value, images: int, processes: int) -> tuple[int, int]:
    """One (batch_size, grad_accum) setting of the study, checked; errors name it (low_batch_size)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise CalcError(f"{name} must be a (batch_size, grad_accum) pair, got {_show(value)}", name)
    try:
        _, bs, ga, _ = _settings(images, value[0], value[1], processes)
    except CalcError as err:
        raise CalcError(f"{name}_{err}", f"{name}_{err.field}") from None
    return bs, ga


def study_table(images, low, high, low_steps, high_steps, step_unit="batch", processes=1) -> list[StudyRun]:
    """The four runs gaST, gast, GAST, GAst for two (BS, GA) settings and two step counts.

    Args:
        images: training images (after split and repeats), as in Derived.images.
        low, high: the two (batch_size, grad_accum) settings. "ga" is whichever has the lower GA, so the
            order does not matter; equal GAs would make the names meaningless and are refused.
        low_steps, high_steps: the two run lengths in step_unit; likewise sorted, and must differ.
        step_unit: "batch" by default, the unit of the guide.
    Errors name the argument: low_batch_size, high_grad_accum, low_steps, ...
    """
    n = _whole("images", images)
    p = _whole("processes", processes)
    unit = _step_unit(step_unit)
    a, b = _pair("low", low, n, p), _pair("high", high, n, p)
    if a[1] == b[1]:
        raise CalcError(f"high_grad_accum must differ from low_grad_accum (the study compares a low and a high "
                        f"GA), got {a[1]} twice", "high_grad_accum")
    ga_low, ga_high = sorted([a, b], key=lambda pair: pair[1])
    st, ST = sorted([_whole("low_steps", low_steps), _whole("high_steps", high_steps)])
    if st == ST:
        raise CalcError(f"high_steps must differ from low_steps, got {st} twice", "high_steps")
    plan = {"gaST": (ga_low, ST), "gast": (ga_low, st), "GAST": (ga_high, ST), "GAst": (ga_high, st)}
    runs = []
    for name, ((bs, ga), steps) in plan.items():
        d = derive(n, bs, ga, steps, unit, processes=p)
        runs.append(StudyRun(name, STUDY_NAMES[name], d.batch_size, d.grad_accum, d.steps, d.step_unit,
                             d.batches, d.weight_updates, d.epochs, d.epochs_floor))
    return runs


# ------------------------------------------------------------------ command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit code 2, instead of argparse's usage block."""
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    # Every value is read as text and checked by the calculator, so a bad one gets the same message
    # as in the UI ("--batch-size must be a whole number >= 1, got 0").
    p = _Parser(prog="python -m embedtrain calc", allow_abbrev=False,
                description="Steps, epochs and weight updates for one setting, and the full-cycle settings "
                            "(BS x GA = images) for the training images.")
    p.add_argument("--images", required=True, help="images in the data folder (before split and repeats)")
    p.add_argument("--batch-size", required=True, help="BS: images in one forward/backward pass")
    p.add_argument("--grad-accum", default="1", help="GA: batches summed into one weight update (default 1)")
    p.add_argument("--steps", required=True, help="run length, counted in --step-unit")
    p.add_argument("--step-unit", default="update", help="update (default: weight updates) or batch (batches shown)")
    p.add_argument("--val-split", default="0", help="fraction of images held out for validation (default 0)")
    p.add_argument("--repeats", default="1", help="times each training image appears per epoch (default 1)")
    p.add_argument("--processes", default="1", help="data-parallel processes (GPUs), each with its own batch")
    p.add_argument("--max-batch-size", default=None, help="largest BS your GPU fits, for the full-cycle options")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _flag_message(err: CalcError) -> str:
    """The message with its leading field name turned into the flag the user typed."""
    text = str(err)
    if err.field and text.startswith(err.field):
        return "--" + err.field.replace("_", "-") + text[len(err.field):]
    return text


def _render(d: Derived, advice: FullCycleAdvice) -> str:
    rows = d.formula_rows()
    w_name = max(len(r[0]) for r in rows)
    w_formula = max(len(r[1]) for r in rows)
    lines = [f"{d.images} images, BS {d.batch_size}, GA {d.grad_accum}"
             + (f", {d.processes} processes" if d.processes > 1 else "")
             + f", {d.steps} steps (step = {d.step_unit})", ""]
    lines += [f"  {name:<{w_name}}  {formula:<{w_formula}}  = {value}" for name, formula, value in rows]
    lines += [f"  note: {n}" for n in d.notes()]
    lines += ["", f"full-cycle settings for {d.images} training images (BS <= {advice.max_batch_size}):"]
    if advice.settings:
        lines += [f"  BS {bs:>4}  GA {ga:>4}" for bs, ga in advice.settings]
    if not advice.good:
        lines.append(f"  {advice.message}")
    return "\n".join(lines)


def cli(argv=None) -> int:
    """`python -m embedtrain calc ...`: 0 on success, 2 with one line on stderr for bad input."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or an argparse error already printed (2)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        d = derive(args.images, args.batch_size, args.grad_accum, args.steps, args.step_unit,
                   repeats=args.repeats, val_split=args.val_split, processes=args.processes)
        advice = nearest_full_cycle(d.images, args.max_batch_size, d.processes)
    except CalcError as err:
        print(f"error: {_flag_message(err)}", file=sys.stderr)
        return 2
    if args.json:
        out = d.to_dict()
        out["full_cycle_settings"] = [{"batch_size": bs, "grad_accum": ga} for bs, ga in advice.settings]
        out["full_cycle_advice"] = advice.message
        print(json.dumps(out, indent=2))
    else:
        print(_render(d, advice))
    return 0
