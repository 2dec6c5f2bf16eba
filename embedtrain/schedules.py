"""Learning-rate schedules: pure functions of the weight-update index.

`u` is 0-based: schedule(u) is the LR used for weight update number u + 1. The trainer sets
`param_group["lr"] = schedule(u)` before each update; nothing else about the optimizer is cycled
(AdamW's betas stay fixed). Every length here (warmup, step size, piecewise ends) is in weight
updates; the calculator turns "10 x epoch" into updates before it gets here.

Conventions, chosen once:
- Decays (linear, cosine, cosine_restarts, polynomial) reach `min_lr` at u == total_updates, the
  value after the last update, as in the diffusers/transformers schedulers. The last update therefore
  still learns a little instead of spending a whole update at min_lr.
- Warmup ramps linearly from 0 at u = 0 to the schedule's value at u = warmup (the same convention as
  diffusers; warmup == total_updates with a constant schedule is the linear range test). The
  decays then run over the remaining total_updates - warmup updates.
- Cyclical schedules (Smith 2017) start at the low point by default (start="low": u = 0 is min_lr, the
  first top is at u = step_size). start="high" begins at the top instead: that is what the guide's runs
  did (docs/guide.md#cyclical-lr, a cosine whose decay length is shorter than the run), and it is the only
  phase in which "5.5 cycles, 550 updates, step size 50" ends on the low point.
- A run always has the length the user asked for; a schedule never shortens or lengthens it. When it
  does not fit (a piecewise schedule that ends early, a run that ends on a cycle's top) build_schedule
  refuses or puts a sentence in `Schedule.warnings`.

Error messages name the TrainConfig field the user typed (lr_min, lr_step_size, ...), the bad value
and what would be valid. Pure Python: no torch, numpy or gradio import (the UI plots schedules before
any model loads).
"""

from __future__ import annotations

import math
import numbers

from embedtrain import EmbedtrainError
from embedtrain.calculator import step_size_for_k


class ScheduleError(EmbedtrainError):
    """A learning-rate schedule setting is invalid; the message names the field."""


SCHEDULES = ("constant", "linear", "cosine", "cosine_restarts", "polynomial", "piecewise",
             "triangular", "triangular2", "exp_range", "cosine_cycles", "one_cycle")
CYCLICAL = ("triangular", "triangular2", "exp_range", "cosine_cycles")
CYCLE_STARTS = ("low", "high")
# one_cycle's defaults (TrainConfig's lr_pct_start, lr_div_factor, lr_final_div_factor): torch's OneCycleLR's
ONE_CYCLE_DEFAULTS = {"lr_pct_start": 0.3, "lr_div_factor": 25.0, "lr_final_div_factor": 1e4}


# ------------------------------------------------------------------ shapes (absolute LR at update u)

def _warm(u, warmup):
    """Warmup multiplier: u / warmup during the warmup, 1 after it."""
    return u / warmup if u < warmup else 1.0


def _decay_fraction(u, warmup, total):
    """Fraction of the post-warmup decay done at update u, clamped to [0, 1]."""
    span = total - warmup
    if span <= 0:  # the warmup takes the whole run: there is no decay to make
        return 0.0
    return min(1.0, max(0.0, (u - warmup) / span))


def constant(u, lr, warmup=0):
    return lr * _warm(u, warmup)


def linear(u, lr, total, min_lr=0.0, warmup=0):
    if u < warmup:
        return lr * u / warmup
    return min_lr + (lr - min_lr) * (1.0 - _decay_fraction(u, warmup, total))


def cosine(u, lr, total, min_lr=0.0, warmup=0):
    if u < warmup:
        return lr * u / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * _decay_fraction(u, warmup, total)))


def cosine_restarts(u, lr, total, cycles=1.0, min_lr=0.0, warmup=0):
    """`cycles` cosine decays back to back, each restarting at lr: cycles - 1 hard restarts."""
    if u < warmup:
        return lr * u / warmup
    p = _decay_fraction(u, warmup, total)
    if p >= 1.0:  # without this the modulo below would restart at lr after the run
        return min_lr
    phase = (p * cycles) % 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * phase))


def polynomial(u, lr, total, power=1.0, min_lr=0.0, warmup=0):
    if u < warmup:
        return lr * u / warmup
    return min_lr + (lr - min_lr) * (1.0 - _decay_fraction(u, warmup, total)) ** power


def piecewise(u, parts, warmup=0):
    """A1111's grammar after parse_piecewise: rate i holds while u < end_i; the last rate holds on
    (an open-ended part, or the last part held by extend=True)."""
    rate = parts[-1][0]
    for lr, end in parts:
        if end is None or u < end:
            rate = lr
            break
    return rate * _warm(u, warmup)


def _cycle_phase(u, step_size, start):
    """Position in the current cycle in half cycles, in [0, 2): 0 is the low point, 1 the top."""
    offset = 1.0 if start == "high" else 0.0
    return (u / step_size + offset) % 2.0


def _cycle_index(u, step_size):
    return math.floor(u / (2.0 * step_size))


def _triangle(t):
    return 1.0 - abs(t - 1.0)


def triangular(u, base_lr, max_lr, step_size, start="low"):
    return base_lr + (max_lr - base_lr) * _triangle(_cycle_phase(u, step_size, start))


def triangular2(u, base_lr, max_lr, step_size, start="low"):
    """Triangular with the amplitude halved after every full cycle."""
    amplitude = (max_lr - base_lr) * 0.5 ** _cycle_index(u, step_size)
    return base_lr + amplitude * _triangle(_cycle_phase(u, step_size, start))


def exp_range(u, base_lr, max_lr, step_size, gamma, start="low"):
    """Triangular with the amplitude multiplied by gamma**u (a smooth decay of the top)."""
    amplitude = (max_lr - base_lr) * gamma ** u
    return base_lr + amplitude * _triangle(_cycle_phase(u, step_size, start))


def cosine_cycles(u, base_lr, max_lr, step_size, start="low"):
    """Half a cosine wave per half cycle: smooth at the top and at the bottom."""
    t = _cycle_phase(u, step_size, start)
    return base_lr + (max_lr - base_lr) * 0.5 * (1.0 - math.cos(math.pi * t))


def one_cycle(u, max_lr, total, rise, start_lr, final_lr):
    """Smith & Topin: a linear rise start_lr -> max_lr over `rise` updates, then a cosine anneal to
    final_lr at u == total (far below start_lr: the anneal is what lets the weights settle)."""
    if u < rise:
        return start_lr + (max_lr - start_lr) * u / rise
    p = min(1.0, (u - rise) / (total - rise))
    return final_lr + (max_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def low_point_updates(step_size, min_updates, start="low"):
    """The shortest run of at least `min_updates` updates that ends on a low point of the cycle, i.e.
    whose LR at u == run length is the cycle's bottom. With start="low" that is a whole number of
    cycles; with start="high" a whole number plus a half (the 5.5 cycles of docs/guide.md#cyclical-lr)."""
    if not step_size > 0:
        raise ScheduleError(f"lr_step_size must be > 0 updates, got {step_size!r}")
    if start not in CYCLE_STARTS:
        raise ScheduleError(f"start must be one of {', '.join(CYCLE_STARTS)}, got {start!r}")
    offset = step_size if start == "high" else 0.0
    k = max(0, math.ceil((min_updates - offset) / (2.0 * step_size) - 1e-9))
    return math.ceil(offset + k * 2.0 * step_size - 1e-9)


# ------------------------------------------------------------------ A1111 piecewise grammar

def parse_piecewise(text):
    """Parse A1111's learning-rate text, e.g. "0.005:100, 1e-3:1000, 1e-5".

    Returns [(lr, end_update_or_None), ...]: rate i is used for updates u < end_i (0-based), from
    where the previous part ended. Only the last part may be open-ended (no ":end", or A1111's
    ":-1"); end updates must be whole numbers that increase. A rate of 0 is allowed (a deliberate
    pause, e.g. "0:10, 1e-3"), but not a schedule whose every rate is 0. Empty parts ("a, , b" or a
    trailing comma) are skipped, as A1111 does. A single number is a constant.
    """
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("lr_piecewise is empty: write rates as 'rate:end_update, ..., rate', "
                            "e.g. '0.005:100, 1e-3:1000, 1e-5'")
    parts = []
    pieces = [p.strip() for p in text.split(",")]
    pieces = [p for p in pieces if p]
    for i, piece in enumerate(pieces, start=1):
        where = f"lr_piecewise part {i} {piece!r}"
        if parts and parts[-1][1] is None:
            raise ScheduleError(f"{where} comes after the open-ended part {pieces[i - 2]!r}: only the last "
                                "part may leave out its end update (write 'rate:end_update' for the earlier one)")
        fields = piece.split(":")
        if len(fields) > 2:
            raise ScheduleError(f"{where} has more than one ':': write 'rate:end_update', e.g. '1e-3:1000'")
        rate_text = fields[0].strip()
        if not rate_text:
            raise ScheduleError(f"{where} has no rate before ':': write 'rate:end_update', e.g. '1e-3:1000'")
        try:
            lr = float(rate_text)
        except ValueError:
            raise ScheduleError(f"{where}: rate {rate_text!r} is not a number (e.g. 0.005 or 1e-3)") from None
        if not math.isfinite(lr) or lr < 0:
            raise ScheduleError(f"{where}: rate must be a finite number >= 0, got {rate_text}")
        end = None
        if len(fields) == 2:
            end_text = fields[1].strip()
            if not end_text:
                raise ScheduleError(f"{where} has no end update after ':': write 'rate:end_update', e.g. "
                                    "'1e-3:1000', or leave out the ':' on the last part to run to the end")
            try:
                end_value = float(end_text)
            except ValueError:
                end_value = math.nan
            if not math.isfinite(end_value) or end_value != int(end_value):
                raise ScheduleError(f"{where}: end update {end_text!r} is not a whole number of updates")
            end = int(end_value)
            if end == -1:  # A1111's spelling of "to the end"
                end = None
            elif end < 1:
                raise ScheduleError(f"{where}: end update must be >= 1 (or -1 for 'to the end'), got {end}")
            elif parts and end <= parts[-1][1]:
                raise ScheduleError(f"{where}: end updates must increase, but {end} is not after the previous "
                                    f"part's end {parts[-1][1]}")
        parts.append((lr, end))
    if all(lr == 0 for lr, _ in parts):
        raise ScheduleError(f"lr_piecewise {text!r}: every rate is 0, so the embedding would never change")
    return parts


# ------------------------------------------------------------------ the schedule object

class Schedule:
    """A learning rate per weight update: `schedule(u)` for update u (0-based). `warnings` holds
    sentences the trainer and the UI show before training; `description` is one line for the UI."""

    def __init__(self, name, fn, total_updates, description, warnings=None):
        self.name = name
        self.total_updates = total_updates
        self.description = description
        self.warnings = list(warnings or [])
        self._fn = fn

    def __call__(self, u):
        if u < 0:
            raise ScheduleError(f"update index must be >= 0, got {u}")
        return float(self._fn(u))

    def unroll(self, n=None):
        """The LRs of the first n updates (default: the whole run)."""
        return [self(u) for u in range(self.total_updates if n is None else n)]

    def __repr__(self):
        return f"Schedule({self.description!r})"


def describe_schedule(schedule):
    """One line for the UI, e.g. 'triangular 0 -> 1.13e-06, step size 40 updates, 10 cycles'."""
    return getattr(schedule, "description", None) or "custom"


# ------------------------------------------------------------------ builders, one per name

def _need(ok, message):
    if not ok:
        raise ScheduleError(message)


def _warmup_text(a):
    return f", warmup {a['warmup']} updates" if a["warmup"] else ""


def _decay_fields(a, what):
    _need(a["min_lr"] <= a["lr"], f"lr_min must be <= lr for {what}, got lr_min={a['min_lr']:g} lr={a['lr']:g}")


def _build_constant(a):
    lr, w = a["lr"], a["warmup"]
    return (lambda u: constant(u, lr, w)), f"constant {lr:g}{_warmup_text(a)}"


def _build_linear(a):
    _decay_fields(a, "linear")
    lr, t, m, w = a["lr"], a["total"], a["min_lr"], a["warmup"]
    return (lambda u: linear(u, lr, t, m, w)), f"linear {lr:g} -> {m:g} over {t} updates{_warmup_text(a)}"


def _build_cosine(a):
    _decay_fields(a, "cosine")
    lr, t, m, w = a["lr"], a["total"], a["min_lr"], a["warmup"]
    return (lambda u: cosine(u, lr, t, m, w)), f"cosine {lr:g} -> {m:g} over {t} updates{_warmup_text(a)}"


def _build_cosine_restarts(a):
    _decay_fields(a, "cosine_restarts")
    _need(a["cycles"] > 0, f"lr_cycles must be > 0 (cosine decays over the run), got {a['cycles']:g}")
    lr, t, c, m, w = a["lr"], a["total"], a["cycles"], a["min_lr"], a["warmup"]
    return ((lambda u: cosine_restarts(u, lr, t, c, m, w)),
            f"cosine_restarts {lr:g} -> {m:g}, {c:g} cycles over {t} updates{_warmup_text(a)}")


def _build_polynomial(a):
    _decay_fields(a, "polynomial")
    _need(a["power"] > 0, f"lr_power must be > 0, got {a['power']:g}")
    lr, t, p, m, w = a["lr"], a["total"], a["power"], a["min_lr"], a["warmup"]
    return ((lambda u: polynomial(u, lr, t, p, m, w)),
            f"polynomial {lr:g} -> {m:g}, power {p:g}, over {t} updates{_warmup_text(a)}")


def _build_piecewise(a):
    parts = parse_piecewise(a["piecewise"])
    total, w, text = a["total"], a["warmup"], a["piecewise"].strip().rstrip(",").strip()
    last_lr, last_end = parts[-1]
    if last_end is not None and last_end < total:
        if not a["extend"]:
            raise ScheduleError(
                f"lr_piecewise: the schedule ends at update {last_end} but training runs {total} updates: add a "
                f"final open-ended rate, e.g. '{text}, {last_lr:g}', or set lr_extend to hold the last rate")
        a["warnings"].append(f"lr_piecewise ends at update {last_end}; its last rate {last_lr:g} holds for the "
                             f"remaining {total - last_end} updates (lr_extend)")
    unused = [p for p, prev in zip(parts[1:], parts) if prev[1] is not None and prev[1] >= total]
    if unused:
        a["warnings"].append(f"lr_piecewise: training stops at update {total}, so {len(unused)} later rate(s) "
                             "are never used")
    words = [f"{lr:g} until {end}" for lr, end in parts if end is not None]
    if last_end is None:
        words.append(f"then {last_lr:g}" if words else f"{last_lr:g}")
    elif last_end < total:
        words.append(f"then {last_lr:g} held (lr_extend)")
    return (lambda u: piecewise(u, parts, w)), "piecewise " + ", ".join(words) + _warmup_text(a)


def _step_size(a):
    """Updates per half cycle: step_size, else round(k x updates per epoch), else total / (2 x cycles)."""
    if a["step_size"] > 0 and a["step_size_epochs"] > 0:
        raise ScheduleError(f"give either lr_step_size ({a['step_size']:g} updates) or lr_step_size_epochs "
                            f"({a['step_size_epochs']:g} x epoch), not both: set the other to 0")
    if a["step_size"] > 0:
        s, how = a["step_size"], f"lr_step_size={a['step_size']:g}"
    elif a["step_size_epochs"] > 0:
        _need(a["updates_per_epoch"] > 0,
              f"updates_per_epoch must be > 0 to use lr_step_size_epochs, got {a['updates_per_epoch']!r}")
        s = step_size_for_k(a["step_size_epochs"], a["updates_per_epoch"])  # round half up, not to even
        how = (f"lr_step_size_epochs={a['step_size_epochs']:g} x {float(a['updates_per_epoch']):g} updates per "
               "epoch")
    else:
        _need(a["cycles"] > 0, f"lr_cycles must be > 0 (full cycles over the run), got {a['cycles']:g}")
        # Kept fractional on purpose: "3 cycles over 1000 updates" then really is 3 cycles.
        s, how = a["total"] / (2.0 * a["cycles"]), f"lr_cycles={a['cycles']:g} over {a['total']} updates"
    _need(s >= 1, f"lr_step_size must be >= 1 update per half cycle, got {s:g} (from {how})")
    return s


def _parse_cycle_decay(text):
    stages = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            n = float(piece)
        except ValueError:
            n = math.nan
        if not (math.isfinite(n) and n > 0):
            raise ScheduleError(f"lr_cycle_decay {text!r}: {piece!r} is not a number of cycles > 0; write the "
                                "cycles per stage of the top, e.g. '3,2,1.5'")
        stages.append(n)
    return stages


def _stepped_top(a, s):
    """(u -> multiplier of the cycle's amplitude, text for describe_schedule); (None, "") without lr_cycle_decay."""
    if not a["cycle_decay"].strip():
        return None, ""
    stages = _parse_cycle_decay(a["cycle_decay"])
    f, total = a["decay_factor"], a["total"]
    _need(0 < f <= 1, f"lr_decay_factor must be in (0, 1], got {f:g}")
    ends, acc = [], 0.0
    for n in stages:
        acc += n
        ends.append(acc * 2.0 * s)  # stage boundaries in updates
    covered = ends[-1]
    if covered < total - 1e-9:
        if not a["extend"]:
            example = f"{a['cycle_decay'].strip()},{(total - covered) / (2 * s):g}"
            raise ScheduleError(
                f"lr_cycle_decay {a['cycle_decay']!r} covers {acc:g} cycles = {covered:g} updates but training runs "
                f"{total} updates: add a final stage (e.g. '{example}') or set lr_extend to hold the last top")
        a["warnings"].append(f"lr_cycle_decay covers {covered:g} updates; the last top holds for the remaining "
                             f"{total - covered:g} updates (lr_extend)")
    elif covered > total + 1e-9:
        a["warnings"].append(f"lr_cycle_decay covers {acc:g} cycles = {covered:g} updates but training stops at "
                             f"update {total}: the last {(covered - total) / (2 * s):g} cycles are never run")

    def factor(u):
        for i, end in enumerate(ends):
            if u < end - 1e-9:
                return f ** i
        return f ** (len(ends) - 1)

    base, top = a["min_lr"], a["lr"]
    tops = ", ".join(f"{n:g} at {base + (top - base) * f ** i:.4g}" for i, n in enumerate(stages))
    return factor, f", cycles by top: {tops}"


def _build_cyclical(a):
    name, base, top, total, start = a["name"], a["min_lr"], a["lr"], a["total"], a["start"]
    _need(base < top, f"lr_min (the bottom of the cycle, {base:g}) must be below lr (its top, {top:g})")
    _need(start in CYCLE_STARTS, f"start must be one of {', '.join(CYCLE_STARTS)}, got {start!r}")
    if name == "exp_range":
        _need(0 < a["gamma"] <= 1, f"lr_gamma must be in (0, 1] (amplitude x gamma**update), got {a['gamma']:g}")
    if a["warmup"]:
        a["warnings"].append(f"lr_warmup={a['warmup']} is ignored by cyclical schedules: the cycle sets the LR "
                             "from the first update (set lr_warmup to 0)")
    if a["cycle_decay"].strip() and not a["step_size"] and not a["step_size_epochs"]:
        # "3,2,1.5" already says how many cycles the run has: 6.5, so the step size follows from it.
        stage_cycles = sum(_parse_cycle_decay(a["cycle_decay"]))
        if a["cycles"] not in (1.0, stage_cycles):
            a["warnings"].append(f"lr_cycles={a['cycles']:g} is ignored: lr_cycle_decay {a['cycle_decay']!r} "
                                 f"sets {stage_cycles:g} cycles")
        a["cycles"] = stage_cycles
    s = _step_size(a)
    factor, decay_text = _stepped_top(a, s)
    gamma = a["gamma"]
    shape = {
        "triangular": lambda u, hi: triangular(u, base, hi, s, start),
        "triangular2": lambda u, hi: triangular2(u, base, hi, s, start),
        "exp_range": lambda u, hi: exp_range(u, base, hi, s, gamma, start),
        "cosine_cycles": lambda u, hi: cosine_cycles(u, base, hi, s, start),
    }[name]
    if factor is None:
        fn = lambda u: shape(u, top)  # noqa: E731
    else:  # the stepped top scales the amplitude, so the bottom stays at lr_min
        fn = lambda u: shape(u, base + (top - base) * factor(u))  # noqa: E731

    half_cycles = total / s
    whole = round(half_cycles)
    on_boundary = abs(half_cycles - whole) < 1e-9 * max(1.0, half_cycles)
    ends_low = on_boundary and whole % 2 == (1 if start == "high" else 0)
    if not ends_low:
        where = "the top of a cycle" if on_boundary else "the middle of a half cycle"
        later = low_point_updates(s, total, start)
        earlier = later - math.ceil(2 * s - 1e-9)
        options = " or ".join(str(n) for n in (earlier, later) if n > 0)
        a["warnings"].append(f"the run ends at update {total}, {where}, not on the low point: run {options} "
                             "updates to end low (the schedule does not change the run length)")
    text = (f"{name} {base:g} -> {top:g}, step size {s:g} updates, {total / (2 * s):g} cycles"
            + (", starting at the top" if start == "high" else "")
            + (f", gamma {gamma:g}" if name == "exp_range" else "") + decay_text)
    return fn, text


def _build_one_cycle(a):
    lr, total = a["lr"], a["total"]
    _need(a["div_factor"] >= 1, f"lr_div_factor must be >= 1 (start at lr / lr_div_factor), got "
                                f"{a['div_factor']:g}")
    _need(a["final_div_factor"] >= 1, f"lr_final_div_factor must be >= 1, got {a['final_div_factor']:g}")
    _need(0 < a["pct_start"] < 1, f"lr_pct_start must be in (0, 1), got {a['pct_start']:g}")
    # lr_warmup, when set, is the rise in updates; lr_min, when set, is the final LR: the same meanings
    # those fields have for the other schedules.
    rise = a["warmup"] if a["warmup"] else math.floor(a["pct_start"] * total + 0.5)
    _need(rise < total, f"lr_warmup (the rise of one_cycle, {rise} updates) must be below the run's {total} updates")
    start_lr = lr / a["div_factor"]
    final_lr = a["min_lr"] if a["min_lr"] > 0 else start_lr / a["final_div_factor"]
    _need(final_lr <= lr, f"lr_min (one_cycle's final LR, {final_lr:g}) must be <= lr ({lr:g})")
    return ((lambda u: one_cycle(u, lr, total, rise, start_lr, final_lr)),
            f"one_cycle {start_lr:g} -> {lr:g} over {rise} updates -> {final_lr:g} at update {total}")


_BUILDERS = {
    "constant": _build_constant,
    "linear": _build_linear,
    "cosine": _build_cosine,
    "cosine_restarts": _build_cosine_restarts,
    "polynomial": _build_polynomial,
    "piecewise": _build_piecewise,
    "triangular": _build_cyclical,
    "triangular2": _build_cyclical,
    "exp_range": _build_cyclical,
    "cosine_cycles": _build_cyclical,
    "one_cycle": _build_one_cycle,
}


def build_schedule(name, lr, total_updates, *, min_lr=0.0, warmup=0, cycles=1.0, power=1.0, piecewise="",
                   step_size=0, step_size_epochs=0.0, updates_per_epoch=1.0, gamma=1.0, cycle_decay="",
                   decay_factor=0.5, extend=False, start="low", pct_start=ONE_CYCLE_DEFAULTS["lr_pct_start"],
                   div_factor=ONE_CYCLE_DEFAULTS["lr_div_factor"],
                   final_div_factor=ONE_CYCLE_DEFAULTS["lr_final_div_factor"]):
    """Check the settings and return a Schedule for a run of `total_updates` weight updates.

    name: one of SCHEDULES. lr: the peak LR (the top of a cycle; ignored by piecewise, whose text holds
    the rates). min_lr: where decays end and the bottom of a cycle (one_cycle: the final LR if > 0).
    warmup: linear warmup in updates for the non-cyclical schedules (one_cycle: the rise).
    cycles: cosine decays for cosine_restarts; full cycles over the run for cyclical schedules when no
    step size is given. power: polynomial exponent. piecewise: A1111 text (see parse_piecewise).
    step_size: updates per half cycle; step_size_epochs: the same as k x updates_per_epoch.
    gamma: exp_range's amplitude factor per update. cycle_decay: cycles per stage of a stepped top,
    e.g. "3,2,1.5", each stage's amplitude decay_factor times the previous one. extend: hold the last
    piecewise rate / stepped top when the text covers less than the run, with a warning, instead of
    refusing. start: "low" (Smith) or "high" (the guide's cosine runs) for cyclical schedules.
    pct_start, div_factor, final_div_factor: one_cycle's rise fraction, start = lr / div_factor and
    final = start / final_div_factor (TrainConfig's lr_pct_start, lr_div_factor, lr_final_div_factor).
    updates_per_epoch may be a Fraction (calculator.Derived.updates_per_epoch_exact), for an exact rounding.
    """
    if name not in _BUILDERS:
        raise ScheduleError(f"lr_schedule {name!r} is not known; valid: {', '.join(SCHEDULES)}")
    _need(isinstance(total_updates, int) and not isinstance(total_updates, bool) and total_updates >= 1,
          f"total updates must be a whole number >= 1, got {total_updates!r}")
    for field, value in (("lr", lr), ("lr_min", min_lr), ("lr_cycles", cycles), ("lr_power", power),
                         ("lr_step_size", step_size), ("lr_step_size_epochs", step_size_epochs),
                         ("updates_per_epoch", updates_per_epoch), ("lr_gamma", gamma),
                         ("lr_decay_factor", decay_factor), ("lr_pct_start", pct_start),
                         ("lr_div_factor", div_factor), ("lr_final_div_factor", final_div_factor)):
        _need(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
              f"{field} must be a finite number, got {value!r}")
    if name != "piecewise":
        _need(lr > 0, f"lr must be > 0, got {lr:g}")
    _need(min_lr >= 0, f"lr_min must be >= 0, got {min_lr:g}")
    _need(isinstance(warmup, int) and warmup >= 0,
          f"lr_warmup must be a whole number of updates >= 0, got {warmup!r}")
    _need(warmup <= total_updates, f"lr_warmup ({warmup} updates) must be <= the run's {total_updates} updates")
    _need(step_size == 0 or step_size >= 1,
          f"lr_step_size must be >= 1 update per half cycle (or 0 to derive it), got {step_size:g}")
    _need(step_size_epochs >= 0, f"lr_step_size_epochs must be >= 0 (0 = not used), got {step_size_epochs:g}")

    a = dict(name=name, lr=lr, total=total_updates, min_lr=min_lr, warmup=warmup, cycles=cycles, power=power,
             piecewise=piecewise or "", step_size=step_size, step_size_epochs=step_size_epochs,
             updates_per_epoch=updates_per_epoch, gamma=gamma, cycle_decay=cycle_decay or "",
             decay_factor=decay_factor, extend=extend, start=start, pct_start=pct_start, div_factor=div_factor,
             final_div_factor=final_div_factor, warnings=[])
    # Settings that belong to another schedule are ignored, but never silently.
    if a["cycle_decay"].strip() and name not in CYCLICAL:
        a["warnings"].append(f"lr_cycle_decay is ignored by {name}: it applies to {', '.join(CYCLICAL)}")
    if a["piecewise"].strip() and name != "piecewise":
        a["warnings"].append(f"lr_piecewise is ignored because lr_schedule is {name}, not piecewise")
    given = dict(lr_pct_start=pct_start, lr_div_factor=div_factor, lr_final_div_factor=final_div_factor)
    changed = [f for f, default in ONE_CYCLE_DEFAULTS.items() if given[f] != default]
    if changed and name != "one_cycle":
        a["warnings"].append(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} ignored by {name}: "
                             f"{'it applies' if len(changed) == 1 else 'they apply'} to one_cycle")
    fn, text = _BUILDERS[name](a)
    return Schedule(name, fn, total_updates, text, a["warnings"])


def from_config(cfg, plan) -> Schedule:
    """The schedule of a run: a TrainConfig's lr_* fields over its plan (calculator.derive's numbers).

    The one mapping from settings to a schedule; the trainer, the web UI's preview and the pre-start
    checks all call it, so what is drawn before a run is what the run uses."""
    return build_schedule(
        cfg.lr_schedule, cfg.lr, plan.weight_updates, min_lr=cfg.lr_min, warmup=cfg.lr_warmup,
        cycles=cfg.lr_cycles, power=cfg.lr_power, piecewise=cfg.lr_piecewise, step_size=cfg.lr_step_size,
        step_size_epochs=cfg.lr_step_size_epochs, updates_per_epoch=plan.updates_per_epoch_exact,
        gamma=cfg.lr_gamma, cycle_decay=cfg.lr_cycle_decay, decay_factor=cfg.lr_decay_factor,
        extend=cfg.lr_extend, start=cfg.lr_cycle_start, pct_start=cfg.lr_pct_start, div_factor=cfg.lr_div_factor,
        final_div_factor=cfg.lr_final_div_factor)
