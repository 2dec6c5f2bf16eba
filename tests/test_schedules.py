"""Learning-rate schedules, unrolled and compared with numbers worked out by hand (not by the code)."""

import subprocess
import sys

import pytest

from embedtrain import EmbedtrainError
from embedtrain.schedules import (SCHEDULES, ScheduleError, build_schedule, describe_schedule, low_point_updates,
                                  parse_piecewise)

TOP = 1.13e-6  # the users' upper bound (docs/guide.md#range-test)


def close(actual, expected, rel=1e-9, abs_=1e-12):
    assert len(actual) == len(expected), (actual, expected)
    for u, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=rel, abs=abs_), f"u={u}: {a} != {e}"


def maxima(lrs):
    return [u for u in range(1, len(lrs) - 1) if lrs[u - 1] < lrs[u] and lrs[u] > lrs[u + 1]]


# ------------------------------------------------------------------ non-cyclical shapes

def test_constant_and_warmup():
    close(build_schedule("constant", 0.01, 5).unroll(), [0.01] * 5)
    # Warmup ramps from 0 at u=0 to lr at u=warmup.
    close(build_schedule("constant", 0.01, 6, warmup=4).unroll(), [0, 0.0025, 0.005, 0.0075, 0.01, 0.01])


def test_linear():
    close(build_schedule("linear", 1.0, 10).unroll(11), [1, .9, .8, .7, .6, .5, .4, .3, .2, .1, 0])
    # Warmup 2, then the decay spans the remaining 8 updates.
    close(build_schedule("linear", 1.0, 10, warmup=2).unroll(11),
          [0, .5, 1, .875, .75, .625, .5, .375, .25, .125, 0])
    close(build_schedule("linear", 1.0, 4, min_lr=0.2).unroll(5), [1, .8, .6, .4, .2])


def test_cosine():
    close(build_schedule("cosine", 1.0, 4).unroll(5), [1, 0.8535533905932737, 0.5, 0.14644660940672627, 0])
    # min_lr 0.2: 0.2 + 0.8 x the same curve.
    close(build_schedule("cosine", 1.0, 4, min_lr=0.2).unroll(5),
          [1, 0.882842712474619, 0.6, 0.31715728752538, 0.2])


def test_cosine_restarts():
    one = [1, 0.8535533905932737, 0.5, 0.14644660940672627]
    close(build_schedule("cosine_restarts", 1.0, 8, cycles=2).unroll(9), one + one + [0])
    close(build_schedule("cosine_restarts", 1.0, 10, cycles=2, warmup=2).unroll(11), [0, .5] + one + one + [0])
    # cycles=1 is a plain cosine.
    close(build_schedule("cosine_restarts", 1.0, 4, cycles=1).unroll(5), one + [0])


def test_polynomial():
    close(build_schedule("polynomial", 1.0, 4, power=2).unroll(5), [1, .5625, .25, .0625, 0])
    close(build_schedule("polynomial", 1.0, 4, power=2, min_lr=0.1).unroll(5), [1, .60625, .325, .15625, .1])
    close(build_schedule("polynomial", 1.0, 4, power=1).unroll(5), [1, .75, .5, .25, 0])


def test_after_the_run_holds_the_end_value():
    s = build_schedule("cosine_restarts", 1.0, 8, cycles=2)
    assert s(8) == s(100) == 0.0  # no restart after the last update
    with pytest.raises(ScheduleError, match="update index"):
        s(-1)


# ------------------------------------------------------------------ A1111 piecewise grammar

@pytest.mark.parametrize("text, parts", [
    ("0.005:100, 1e-3:1000, 1e-5", [(0.005, 100), (1e-3, 1000), (1e-5, None)]),
    ("0.005", [(0.005, None)]),
    ("  2e-3 : 50 ,1e-4", [(2e-3, 50), (1e-4, None)]),
    ("0.005:100, 1e-3:500", [(0.005, 100), (1e-3, 500)]),
    ("0.005:100, 1e-3:-1", [(0.005, 100), (1e-3, None)]),   # A1111's "to the end"
    ("0.005:100, 1e-3,", [(0.005, 100), (1e-3, None)]),      # trailing comma, as A1111 accepts
    ("0:10, 1e-3", [(0.0, 10), (1e-3, None)]),               # a zero rate is a deliberate pause
    ("1e-3:1e3, 1e-4", [(1e-3, 1000), (1e-4, None)]),
])
def test_parse_piecewise(text, parts):
    assert parse_piecewise(text) == parts


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("   ", "empty"),
    ("abc", "'abc' is not a number"),
    ("0.005:", "no end update after ':'"),
    (":100", "no rate before ':'"),
    ("-1e-3:100, 1e-4", "rate must be a finite number >= 0"),
    ("nan", "rate must be a finite number"),
    ("1e-3:100, 1e-4:50", "end updates must increase, but 50 is not after the previous part's end 100"),
    ("1e-3:100, 1e-4:100", "must increase"),
    ("1e-3, 1e-4:100", "only the last part may leave out its end update"),
    ("1e-3:100, 1e-4, 1e-5", "comes after the open-ended part '1e-4'"),
    ("1e-3:10.5, 1e-4", "'10.5' is not a whole number"),
    ("1e-3:abc", "'abc' is not a whole number"),
    ("1e-3:0, 1e-4", "end update must be >= 1"),
    ("1e-3:100:200", "more than one ':'"),
    ("0:100, 0", "every rate is 0"),
])
def test_parse_piecewise_errors(text, problem):
    with pytest.raises(ScheduleError, match="lr_piecewise") as err:
        parse_piecewise(text)
    assert problem in str(err.value)
    assert isinstance(err.value, EmbedtrainError) and isinstance(err.value, ValueError)


def test_piecewise_unroll():
    s = build_schedule("piecewise", 0, 6, piecewise="0.5:2, 0.25:4, 0.125")
    close(s.unroll(), [.5, .5, .25, .25, .125, .125])
    assert s.warnings == []
    assert describe_schedule(s) == "piecewise 0.5 until 2, 0.25 until 4, then 0.125"
    # The A1111 example: 0.005 for u < 100, 1e-3 for u < 1000, then 1e-5.
    s = build_schedule("piecewise", 0, 2000, piecewise="0.005:100, 1e-3:1000, 1e-5")
    assert [s(u) for u in (0, 99, 100, 999, 1000, 1999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    close(build_schedule("piecewise", 0, 6, piecewise="0.5:2, 0.25:4, 0.125", warmup=2).unroll(),
          [0, .25, .25, .25, .125, .125])
    assert build_schedule("piecewise", 0, 10, piecewise="0.005").unroll() == [0.005] * 10


def test_piecewise_that_ends_early_is_refused_or_extended_with_a_warning():
    with pytest.raises(ScheduleError) as err:
        build_schedule("piecewise", 0, 1000, piecewise="0.005:100, 1e-3:500")
    msg = str(err.value)
    assert "the schedule ends at update 500 but training runs 1000 updates" in msg
    assert "add a final open-ended rate, e.g. '0.005:100, 1e-3:500, 0.001'" in msg
    assert "lr_extend" in msg

    s = build_schedule("piecewise", 0, 1000, piecewise="0.005:100, 1e-3:500", extend=True)
    assert [s(u) for u in (99, 100, 499, 500, 999)] == [0.005, 1e-3, 1e-3, 1e-3, 1e-3]
    assert len(s.warnings) == 1 and "ends at update 500" in s.warnings[0] and "500 updates" in s.warnings[0]

    # Ending exactly with the run is fine; parts after the run are reported as unused.
    assert build_schedule("piecewise", 0, 500, piecewise="0.005:100, 1e-3:500").warnings == []
    s = build_schedule("piecewise", 0, 1000, piecewise="0.005:100, 1e-3:1000, 1e-5")
    assert "never used" in s.warnings[0]


# ------------------------------------------------------------------ cyclical

def test_users_800_update_run_step_size_40():
    s = build_schedule("triangular", TOP, 800, step_size=40)
    lrs = s.unroll()
    assert len(lrs) == 800
    close([s(u) for u in (0, 20, 40, 60, 80, 799)], [0, TOP / 2, TOP, TOP / 2, 0, TOP / 40], rel=1e-9)
    assert maxima(lrs) == list(range(40, 800, 80)) and len(maxima(lrs)) == 10
    assert s(800) == 0.0 and s.warnings == []
    assert describe_schedule(s) == "triangular 0 -> 1.13e-06, step size 40 updates, 10 cycles"
    # Same run from cycles=10 instead of a step size.
    assert build_schedule("triangular", TOP, 800, cycles=10).unroll() == lrs


def test_users_cosine_run_starting_at_the_top():
    # What the users ran: a cosine from the top whose decay length (40) is shorter than the run.
    s = build_schedule("cosine_cycles", TOP, 800, step_size=40, start="high")
    close([s(u) for u in (0, 20, 40, 60, 80, 760)], [TOP, TOP / 2, 0, TOP / 2, TOP, 0], rel=1e-9, abs_=1e-20)
    lrs = s.unroll()
    assert [u for u in range(800) if lrs[u] == max(lrs)] == list(range(0, 800, 80))  # 10 tops


def test_five_and_a_half_cycles_end_on_the_low_point():
    # The users' final run: 5.5 cycles, step size 50, 550 updates, ending low. Half a cycle over a
    # whole number ends low only when the cycles start at the top.
    s = build_schedule("triangular", TOP, 550, step_size=50, start="high")
    assert s(550) == 0.0 and s(0) == TOP and s(500) == TOP and s.warnings == []
    assert s(549) == pytest.approx(TOP / 50)
    assert build_schedule("triangular", TOP, 550, cycles=5.5, start="high").unroll() == s.unroll()
    # Starting low (Smith), 550 updates ends on a top: a warning names the run lengths that end low.
    low = build_schedule("triangular", TOP, 550, step_size=50)
    assert low(550) == TOP
    assert len(low.warnings) == 1 and "not on the low point: run 500 or 600 updates" in low.warnings[0]
    mid = build_schedule("triangular", TOP, 530, step_size=50)
    assert "middle of a half cycle" in mid.warnings[0] and "500 or 600" in mid.warnings[0]


def test_low_point_updates():
    assert low_point_updates(50, 520) == 600
    assert low_point_updates(50, 600) == 600
    assert low_point_updates(50, 520, start="high") == 550
    assert low_point_updates(50, 550, start="high") == 550
    assert low_point_updates(50, 1, start="high") == 50
    assert low_point_updates(40, 800) == 800
    with pytest.raises(ScheduleError, match="lr_step_size"):
        low_point_updates(0, 100)


@pytest.mark.parametrize("shape", ["triangular", "cosine_cycles"])
def test_users_decayed_run_3_2_1_5_cycles(shape):
    # "3 cycles at 1.13e-6, 2 at 5.65e-7, 1.5 at 2.83e-7": step size 50, 6.5 cycles = 650 updates, ending low.
    s = build_schedule(shape, TOP, 650, step_size=50, cycle_decay="3,2,1.5", start="high")
    assert s.warnings == []
    tops = [s(u) for u in range(0, 650, 100)]
    close(tops, [1.13e-6, 1.13e-6, 1.13e-6, 5.65e-7, 5.65e-7, 2.83e-7, 2.83e-7], rel=2e-3)
    close([s(u) for u in range(50, 651, 100)], [0] * 7, abs_=1e-20)
    lrs = s.unroll()
    assert max(lrs[:300]) == TOP and max(lrs[300:500]) == pytest.approx(5.65e-7) and \
        max(lrs[500:]) == pytest.approx(2.83e-7, rel=2e-3)
    assert "3 at 1.13e-06, 2 at 5.65e-07, 1.5 at 2.825e-07" in describe_schedule(s)
    # Without a step size, the stages' 6.5 cycles over 650 updates give the same step size of 50.
    assert build_schedule(shape, TOP, 650, cycle_decay="3,2,1.5", start="high").unroll() == lrs


def test_decayed_top_starting_low_and_its_checks():
    s = build_schedule("triangular", TOP, 600, step_size=50, cycle_decay="3,2,1")
    close([s(u) for u in (50, 250, 350, 450, 550, 600)], [TOP, TOP, TOP / 2, TOP / 2, TOP / 4, 0])
    assert s.warnings == []
    # Stages that end before the run: refused, or the last top held with extend.
    with pytest.raises(ScheduleError, match=r"lr_cycle_decay '3,2' covers 5 cycles = 500 updates but training "
                                            r"runs 650 updates: add a final stage \(e.g. '3,2,1.5'\)"):
        build_schedule("triangular", TOP, 650, step_size=50, cycle_decay="3,2", start="high")
    s = build_schedule("triangular", TOP, 650, step_size=50, cycle_decay="3,2", start="high", extend=True)
    assert s(600) == pytest.approx(5.65e-7) and "last top holds" in s.warnings[0]
    s = build_schedule("triangular", TOP, 600, cycles=4, cycle_decay="3,2,1")
    assert "step size 50 updates" in describe_schedule(s) and "lr_cycles=4 is ignored" in s.warnings[0]
    # Stages longer than the run: a warning.
    s = build_schedule("triangular", TOP, 400, step_size=50, cycle_decay="3,2,1.5")
    assert "never run" in s.warnings[0]
    with pytest.raises(ScheduleError, match="lr_cycle_decay '3,x': 'x' is not a number of cycles"):
        build_schedule("triangular", TOP, 400, step_size=50, cycle_decay="3,x")
    with pytest.raises(ScheduleError, match="lr_decay_factor must be in"):
        build_schedule("triangular", TOP, 400, step_size=50, cycle_decay="3,2", decay_factor=1.5)


def test_step_size_from_epochs_and_from_cycles():
    s = build_schedule("triangular", TOP, 800, step_size_epochs=10, updates_per_epoch=4)
    assert "step size 40 updates" in describe_schedule(s) and s(40) == TOP and s(80) == 0
    # 2.5 x 5 = 12.5 rounds half up to 13 (Python's round() would give the even 12).
    assert "step size 13 updates" in describe_schedule(build_schedule("triangular", 1.0, 52, step_size_epochs=2.5,
                                                             updates_per_epoch=5))
    assert "step size 50 updates, 5.5 cycles" in describe_schedule(build_schedule("triangular", 1.0, 550, cycles=5.5))
    # Default: one cycle over the whole run.
    s = build_schedule("triangular", 1.0, 100)
    assert s(50) == 1.0 and s(25) == 0.5 and s.warnings == []
    with pytest.raises(ScheduleError, match="not both"):
        build_schedule("triangular", 1.0, 100, step_size=10, step_size_epochs=2)
    with pytest.raises(ScheduleError, match=r"lr_step_size must be >= 1 update per half cycle, got 0.5 "
                                            r"\(from lr_cycles=100 over 100 updates\)"):
        build_schedule("triangular", 1.0, 100, cycles=100)


def test_triangular2_halves_the_amplitude_each_cycle():
    close(build_schedule("triangular2", 1.0, 12, step_size=2).unroll(),
          [0, .5, 1, .5, 0, .25, .5, .25, 0, .125, .25, .125])
    close(build_schedule("triangular2", 1.1, 8, step_size=2, min_lr=0.1).unroll(),
          [.1, .6, 1.1, .6, .1, .35, .6, .35])


def test_exp_range():
    # amplitude x gamma**u on the triangle 0, .5, 1, .5, 0, .5
    close(build_schedule("exp_range", 1.0, 6, step_size=2, gamma=0.5).unroll(),
          [0, .25, .25, .0625, 0, .015625])
    close(build_schedule("exp_range", 1.1, 3, step_size=2, gamma=0.5, min_lr=0.1).unroll(), [.1, .35, .35])
    # gamma 1 is triangular.
    assert build_schedule("exp_range", 1.0, 8, step_size=2).unroll() == \
        build_schedule("triangular", 1.0, 8, step_size=2).unroll()
    with pytest.raises(ScheduleError, match=r"lr_gamma must be in \(0, 1\]"):
        build_schedule("exp_range", 1.0, 8, step_size=2, gamma=1.5)


def test_cosine_cycles():
    close(build_schedule("cosine_cycles", 1.0, 9, step_size=4).unroll(),
          [0, 0.14644660940672627, .5, 0.8535533905932737, 1, 0.8535533905932737, .5, 0.14644660940672627, 0])


def test_cyclical_checks():
    with pytest.raises(ScheduleError, match=r"lr_min \(the bottom of the cycle, 2e-06\) must be below lr"):
        build_schedule("triangular", TOP, 800, min_lr=2e-6)
    with pytest.raises(ScheduleError, match="start must be one of low, high"):
        build_schedule("triangular", TOP, 800, start="middle")
    s = build_schedule("triangular", TOP, 800, step_size=40, warmup=10)
    assert "lr_warmup=10 is ignored" in s.warnings[0]


# ------------------------------------------------------------------ one-cycle

def test_one_cycle():
    # lr 1, start 1/4, final 0.25/10; rise round(0.3 x 11) = 3 updates, cosine anneal over the other 8.
    s = build_schedule("one_cycle", 1.0, 11, div_factor=4, final_div_factor=10)
    # .025 + .975 x (1 + cos(pi k / 8)) / 2 for k = 1..7, worked out on a calculator
    close(s.unroll(12), [.25, .5, .75, 1, 0.9628912721, 0.8572145558, 0.6990581733, 0.5125, 0.3259418267,
                         0.1677854442, 0.0621087279, 0.025], rel=1e-8)
    assert describe_schedule(s) == "one_cycle 0.25 -> 1 over 3 updates -> 0.025 at update 11"
    # lr_warmup sets the rise, lr_min the final LR; defaults div 25, final div 1e4.
    s = build_schedule("one_cycle", 1.0, 10, warmup=5, min_lr=0.01)
    assert s(0) == 0.04 and s(5) == 1.0 and s(10) == 0.01
    assert build_schedule("one_cycle", 1.0, 10)(10) == pytest.approx(4e-6)
    with pytest.raises(ScheduleError, match="pct_start"):
        build_schedule("one_cycle", 1.0, 10, pct_start=1.0)


# ------------------------------------------------------------------ builder checks

@pytest.mark.parametrize("args, kwargs, problem", [
    (("cosin", 1e-3, 100), {}, "lr_schedule 'cosin' is not known; valid: constant, linear, cosine,"),
    (("constant", -1, 100), {}, "lr must be > 0, got -1"),
    (("constant", 0, 100), {}, "lr must be > 0, got 0"),
    (("constant", 1e-3, 0), {}, "total updates must be a whole number >= 1, got 0"),
    (("linear", 1e-3, 100), {"min_lr": -1e-4}, "lr_min must be >= 0"),
    (("linear", 1e-3, 100), {"min_lr": 1e-2}, "lr_min must be <= lr for linear"),
    (("constant", 1e-3, 100), {"warmup": 200}, "lr_warmup (200 updates) must be <= the run's 100 updates"),
    (("constant", 1e-3, 100), {"warmup": -1}, "lr_warmup must be a whole number of updates >= 0"),
    (("triangular", 1e-3, 100), {"step_size": 0.5}, "lr_step_size must be >= 1"),
    (("triangular", 1e-3, 100), {"step_size": -4}, "lr_step_size must be >= 1"),
    (("triangular", 1e-3, 100), {"step_size_epochs": 2, "updates_per_epoch": 0}, "updates_per_epoch must be > 0"),
    (("triangular", 1e-3, 100), {"cycles": 0}, "lr_cycles must be > 0"),
    (("cosine_restarts", 1e-3, 100), {"cycles": -2}, "lr_cycles must be > 0"),
    (("polynomial", 1e-3, 100), {"power": 0}, "lr_power must be > 0"),
    (("constant", float("nan"), 100), {}, "lr must be a finite number"),
])
def test_build_errors_name_the_field(args, kwargs, problem):
    with pytest.raises(ScheduleError) as err:
        build_schedule(*args, **kwargs)
    assert problem in str(err.value)


def test_settings_of_another_schedule_are_not_ignored_silently():
    s = build_schedule("cosine", 1e-3, 100, cycle_decay="3,2", piecewise="1e-3:10, 1e-4")
    assert any("lr_cycle_decay is ignored" in w for w in s.warnings)
    assert any("lr_piecewise is ignored" in w for w in s.warnings)


def test_every_name_builds_and_describes():
    assert len(SCHEDULES) == 11
    for name in SCHEDULES:
        s = build_schedule(name, 1e-3, 100, piecewise="1e-3:50, 1e-4")
        assert s.name == name and describe_schedule(s).startswith(name) and len(s.unroll()) == 100
        assert all(0 <= lr <= 1e-3 for lr in s.unroll())


def test_import_does_not_pull_torch():
    code = "import sys, embedtrain.schedules; sys.exit(any(m in sys.modules for m in ('torch', 'numpy', 'gradio')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_users_cyclical_run_from_their_own_numbers():
    # docs/guide.md#cyclical-lr: 16 training images, BS 4 -> 4 updates per epoch; 200 epochs = 800 updates; step size
    # 10 x epoch = 40 updates -> 10 cycles, each top at 1.13e-6 and each bottom at 0.
    from embedtrain.calculator import derive
    plan = derive(16, 4, 1, 800, "update")
    assert plan.updates_per_epoch == 4 and plan.epochs == 200
    s = build_schedule("triangular", TOP, plan.weight_updates, step_size_epochs=10,
                       updates_per_epoch=plan.updates_per_epoch)
    lrs = s.unroll()
    assert len(maxima(lrs)) == 10 and max(lrs) == TOP and min(lrs) == 0.0
    assert "step size 40 updates, 10 cycles" in describe_schedule(s)


def test_step_size_in_epochs_is_the_calculators_whatever_the_path():
    """lr_step_size_epochs through from_config, build_schedule with a float updates_per_epoch, and the
    calculator's table give one step size: 4.1 x epoch of 15 updates = 61.5 -> 62 (a float product said 61)."""
    from embedtrain.calculator import derive, step_size_for_epochs
    from embedtrain.config import TrainConfig
    from embedtrain.schedules import from_config
    plan = derive(15, 1, 1, 400)
    cfg = TrainConfig(model="tiny", data="d", name="zorblat", lr=1e-3, lr_schedule="triangular",
                      lr_step_size_epochs=4.1)
    assert step_size_for_epochs(4.1, 15, 1) == 62
    assert "step size 62 updates" in describe_schedule(from_config(cfg, plan))
    assert "step size 62 updates" in describe_schedule(build_schedule("triangular", 1e-3, 400, step_size_epochs=4.1,
                                                             updates_per_epoch=15.0))
    # 10 images, BS 3: 10/3 updates per epoch, exact through the plan
    assert "step size 5 updates" in describe_schedule(from_config(cfg.replace(lr_step_size_epochs=1.5),
                                                         derive(10, 3, 1, 400)))


@pytest.mark.slow
def test_trainer_follows_a_cycle_update_by_update_and_leaves_adamw_betas_alone(tiny_cfg, tmp_path, monkeypatch):
    import csv

    from embedtrain import optimizers
    from embedtrain.trainer import Trainer

    made = []
    real_make = optimizers.make_optimizer
    monkeypatch.setattr(optimizers, "make_optimizer", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])
    # 8 images, BS 2 -> 4 updates per epoch; half a cycle = 0.5 x epoch = 2 updates; 8 updates = 2 cycles
    cfg = tiny_cfg.replace(steps=8, lr=1e-2, lr_min=1e-3, lr_schedule="triangular2", lr_step_size_epochs=0.5)
    Trainer(cfg).run(tmp_path / "run")
    with open(tmp_path / "run" / "log.csv", newline="") as fh:
        logged = [float(r["lr"]) for r in csv.DictReader(fh)]
    close(logged, [1e-3, 5.5e-3, 1e-2, 5.5e-3, 1e-3, 3.25e-3, 5.5e-3, 3.25e-3])
    group = made[-1].param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.0
