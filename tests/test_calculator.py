"""The calculator against the users' own numbers (docs/guide.md: "Steps and GA", "Range test", "Cyclical LR"),
its errors, its CLI, and the trainer's log.csv for the same settings."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from embedtrain.calculator import (MAX_COUNT, CalcError, cli, cycles_for_run, derive, full_cycle_settings,
                                   low_point_run, nearest_full_cycle, split_counts, step_size_for_cycles,
                                   step_size_for_epochs, step_size_for_k, steps_for_target, study_table,
                                   updates_for_cycles, updates_per_epoch)

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ the guide's four runs on 26 images

GUIDE = {  # name: (BS, GA, steps in batches, epochs as the guide reports them, weight updates)
    "gaST": (13, 2, 3000, 1500, 1500),
    "gast": (13, 2, 150, 75, 75),
    "GAST": (3, 17, 3000, 346, 176),
    "GAst": (3, 17, 150, 17, 8),
}


def test_study_table_gives_the_guides_four_runs_on_26_images():
    runs = study_table(26, (13, 2), (3, 17), 150, 3000)
    assert [r.name for r in runs] == ["gaST", "gast", "GAST", "GAst"]
    for r in runs:
        bs, ga, steps, epochs, updates = GUIDE[r.name]
        assert (r.batch_size, r.grad_accum, r.steps, r.step_unit) == (bs, ga, steps, "batch")
        assert r.batches == steps
        assert r.epochs_floor == epochs and r.weight_updates == updates
        assert r.epochs == steps * bs / 26
    assert runs[2].meaning == "high GA, high steps" and runs[3].meaning == "high GA, low steps"
    # the names come from the numbers, not from the argument order
    swapped = study_table(26, (3, 17), (13, 2), 3000, 150)
    assert [r.to_dict() for r in swapped] == [r.to_dict() for r in runs]


@pytest.mark.parametrize("name", list(GUIDE))
def test_derive_reproduces_each_guide_run(name):
    bs, ga, steps, epochs, updates = GUIDE[name]
    d = derive(26, bs, ga, steps, "batch")
    assert (d.batches, d.weight_updates, d.epochs_floor) == (steps, updates, epochs)
    assert d.images_shown == steps * bs
    assert d.full_cycle == (bs * ga == 26)
    assert d.incomplete_batches == steps % ga
    # the same run typed in weight updates: the batches that make up those updates
    u = derive(26, bs, ga, updates, "update")
    assert u.weight_updates == updates and u.batches == updates * ga
    assert u.batches == d.batches_run


def test_full_cycle_and_non_full_cycle_details_on_26_images():
    full = derive(26, 13, 2, 3000, "batch")
    assert full.full_cycle and full.updates_per_epoch == 1 and full.batches_per_epoch == 2
    assert full.epochs == full.weight_updates == 1500 and full.straddle == 0 and full.notes() == []

    ga17 = derive(26, 3, 17, 3000, "batch")
    assert not ga17.full_cycle
    assert ga17.epochs == pytest.approx(346.153846, abs=1e-6)
    assert ga17.updates_per_epoch == pytest.approx(26 / 51) and ga17.batches_per_epoch == pytest.approx(26 / 3)
    assert ga17.incomplete_batches == 8 and ga17.batches_run == 2992
    assert ga17.epochs_run == pytest.approx(2992 * 3 / 26)
    assert ga17.straddle == 25  # one update takes 51 images: 26 from the first epoch, 25 from the next
    notes = " ".join(ga17.notes())
    assert "the last 8 of the 3000 batches end without a weight update" in notes
    assert "trains 2992 batches = 345.2308 epochs" in notes and "takes 25 images from the next one" in notes

    lines = ga17.formulas()
    assert "weight_updates = floor(batches / GA) = floor(3000 / 17) = 176" in lines
    assert "epochs = images_shown / images = 9000 / 26 = 346.1538" in lines
    assert "full_cycle = images == BS x GA: 26 != 51 = no" in lines


def test_straddle_is_the_overlap_of_the_epoch_boundary_update():
    # 20 images, 6 per update: updates end at images 6, 12, 18, 24; the 4th takes 4 from epoch 2
    assert derive(20, 3, 2, 10).straddle == 4
    assert derive(20, 5, 4, 10).straddle == 0
    assert derive(20, 3, 1, 10).straddle == 1
    for n in range(1, 40):
        for per in range(1, n + 1):
            s = derive(n, per, 1, 1).straddle
            assert 0 <= s < per and (n + s) % per == 0


# ------------------------------------------------------------------ full-cycle settings

@pytest.mark.parametrize("images,cap,pairs", [
    (20, None, [(20, 1), (10, 2), (5, 4), (4, 5), (2, 10), (1, 20)]),
    (20, 8, [(5, 4), (4, 5), (2, 10), (1, 20)]),
    (24, None, [(24, 1), (12, 2), (8, 3), (6, 4), (4, 6), (3, 8), (2, 12), (1, 24)]),
    (24, 6, [(6, 4), (4, 6), (3, 8), (2, 12), (1, 24)]),
    (26, None, [(26, 1), (13, 2), (2, 13), (1, 26)]),
    (26, 8, [(2, 13), (1, 26)]),
    (29, None, [(29, 1), (1, 29)]),
    (29, 8, [(1, 29)]),
])
def test_full_cycle_pairs(images, cap, pairs):
    assert full_cycle_settings(images, cap) == pairs


def test_full_cycle_pairs_multiply_to_the_images_and_list_low_ga_first():
    for n in range(1, 121):
        for cap in (None, 1, 4, 8, 16):
            pairs = full_cycle_settings(n, cap)
            assert all(bs * ga == n and bs <= (cap or n) for bs, ga in pairs)
            assert [ga for _, ga in pairs] == sorted(ga for _, ga in pairs)
            expected = {(bs, n // bs) for bs in range(1, min(n, cap or n) + 1) if n % bs == 0}
            assert set(pairs) == expected
    # two processes each take a batch: BS x GA x 2 == images
    assert full_cycle_settings(24, 8, processes=2) == [(6, 2), (4, 3), (3, 4), (2, 6), (1, 12)]
    assert full_cycle_settings(25, processes=2) == []


def test_advice_for_a_prime_gives_the_nearest_options():
    a = nearest_full_cycle(29, 8)
    assert not a.good and a.settings == [(1, 29)]
    assert (a.drop.images, a.drop.k, a.drop.batch_size, a.drop.grad_accum) == (28, 1, 7, 4)
    assert (a.add.images, a.add.k, a.add.batch_size, a.add.grad_accum) == (30, 1, 6, 5)
    assert [(o.k, o.images, o.batch_size, o.grad_accum) for o in a.repeats] == [
        (2, 58, 2, 29), (3, 87, 3, 29), (4, 116, 4, 29)]
    assert a.message.startswith("29 is prime: no full-cycle pair with 1 < BS <= 8")
    assert "drop 1 image -> 28 = 7 x 4" in a.message and "add 1 -> 30 = 6 x 5" in a.message

    # 31 with BS <= 4: 30 = 3 x 10 (drop 1), 32 = 4 x 8 (add 1)
    b = nearest_full_cycle(31, 4)
    assert (b.drop.images, b.drop.batch_size, b.add.images, b.add.batch_size) == (30, 3, 32, 4)
    # a composite whose divisors are all above the cap: 2 x 53 with BS <= 1 is all the GPU allows
    c = nearest_full_cycle(106, 1)
    assert not c.good and "only full-cycle setting is BS 1 x GA 106" in c.message
    # when a pair with BS > 1 fits, no options are invented
    d = nearest_full_cycle(26, 8)
    assert d.good and d.drop is None and d.add is None and d.message == "26 images: full-cycle BS x GA = 2 x 13, 1 x 26"


def test_nearest_options_are_the_nearest():
    for n in range(2, 80):
        for cap in (2, 3, 8):
            a = nearest_full_cycle(n, cap)
            if a.good:
                continue
            for opt, sign in ((a.drop, -1), (a.add, 1)):
                if opt is None:
                    continue
                assert opt.images == n + sign * opt.k and opt.batch_size * opt.grad_accum == opt.images
                assert 1 < opt.batch_size <= cap
                # nothing closer works
                for k in range(1, opt.k):
                    assert all(bs == 1 for bs, _ in full_cycle_settings(n + sign * k, cap))


# ------------------------------------------------------------------ cyclical learning rates (docs/guide.md#range-test, #cyclical-lr)

def test_clr_helpers_on_16_images_bs4():
    assert updates_per_epoch(16, 4) == 4
    assert [step_size_for_epochs(k, 16, 4) for k in range(2, 11)] == [8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert step_size_for_epochs(10, 16, 4) == 40
    run = steps_for_target(16, 4, 1, "update", epochs=200)
    assert run == 800 and cycles_for_run(run, 40) == 10
    assert cycles_for_run(800, 8) == 50  # their step size 8: 50 cycles
    assert step_size_for_cycles(800, 10) == 40


def test_clr_helpers_on_20_images_bs4_end_on_the_low_point():
    assert updates_per_epoch(20, 4) == 5 and step_size_for_epochs(10, 20, 4) == 50
    assert updates_for_cycles(5.5, 50) == 550
    assert low_point_run(50, 500) == 550 and low_point_run(50, 550) == 550 and low_point_run(50, 551) == 650
    assert low_point_run(50, 1) == 50  # half a cycle is the shortest run that ends low
    assert cycles_for_run(550, 50) == 5.5
    assert step_size_for_cycles(550, 5.5) == 50
    assert derive(20, 4, 1, 550).epochs == 110
    assert steps_for_target(20, 4, 1, "update", epochs=110) == 550
    assert steps_for_target(20, 4, 1, "batch", epochs=110) == 550
    # their decay variant: 3 + 2 + 1.5 cycles of step size 50
    assert sum(updates_for_cycles(c, 50) for c in (3, 2, 1.5)) == 650


def test_step_size_for_k_rounds_halves_up_on_the_exact_product():
    from fractions import Fraction
    assert step_size_for_k(10, 4) == 40 and step_size_for_k(2.5, 5) == 13   # 12.5 -> 13, not the even 12
    # 4.1 x 15 = 61.5 exactly; as floats 61.49999999999999, which rounded to 61 before there was one rounding
    assert 4.1 * 15 + 0.5 < 62 and step_size_for_k(4.1, 15) == 62 == step_size_for_epochs(4.1, 15, 1)
    # 10 images, BS 3: 10/3 updates per epoch; 1.5 x 10/3 = 5 exactly; 0.15 x 10/3 = 0.5 -> 1
    assert derive(10, 3, 1, 30).updates_per_epoch_exact == Fraction(10, 3)
    assert step_size_for_k(1.5, Fraction(10, 3)) == 5 and step_size_for_k(0.15, Fraction(10, 3)) == 1
    # below half an update: 0 (schedules refuse it, naming the field), unless a minimum is asked for
    assert step_size_for_k(0.1, 4) == 0 and step_size_for_k(0.1, 4, minimum=1) == 1
    assert step_size_for_epochs(0.1, 16, 4) == 1
    for bad, field in (((0, 4), "k"), ((float("nan"), 4), "k"), ((2, 0), "updates_per_epoch"),
                       ((2, float("inf")), "updates_per_epoch"), ((True, 4), "k")):
        with pytest.raises(CalcError) as err:
            step_size_for_k(*bad)
        assert err.value.field == field


def test_range_test_setup_with_a_validation_split():
    # 20 face images, 20 % validation -> 16 train, BS 4 -> 4 updates per epoch, 100 epochs = 400 updates
    assert split_counts(20, 0.2) == (16, 4)
    d = derive(20, 4, 1, 400, val_split=0.2)
    assert (d.images, d.validation_images, d.updates_per_epoch, d.epochs) == (16, 4, 4, 100)
    assert "(folder images - validation) x repeats = (20 - 4) x 1" in d.formulas()[0]
    # repeats multiply the training images (A1111 style)
    r = derive(20, 4, 1, 400, val_split=0.2, repeats=3)
    assert (r.images, r.epochs) == (48, pytest.approx(400 * 4 / 48))


def test_split_counts_round_halves_up_and_keep_one_for_validation():
    assert split_counts(10, 0.25) == (7, 3)  # 2.5 rounds up, not to even
    assert split_counts(5, 0.01) == (4, 1)   # asked for validation: at least one
    assert split_counts(20, 0.1) == (18, 2)  # 0.1 is exact, not 0.1000000000000000055
    assert split_counts(7, 0) == (7, 0)
    with pytest.raises(CalcError, match=r"^val_split 0.5 leaves no training image"):
        split_counts(1, 0.5)


def test_steps_for_target():
    # 26 images, BS 3, GA 17: 51 images per update; 10 epochs = 260 images -> 6 updates (5.1 rounded up)
    assert steps_for_target(26, 3, 17, "update", epochs=10) == 6
    assert steps_for_target(26, 3, 17, "batch", epochs=10) == 87  # ceil(260 / 3)
    assert derive(26, 3, 17, 87, "batch").epochs >= 10 > derive(26, 3, 17, 86, "batch").epochs
    assert steps_for_target(26, 3, 17, "batch", updates=176) == 2992
    assert steps_for_target(26, 3, 17, "update", updates=176) == 176
    assert steps_for_target(10, 3, 1, "update", epochs=0.3) == 1  # exact: 0.3 x 10 = 3 images, one batch
    for bad in ({}, {"epochs": 1, "updates": 1}):
        with pytest.raises(CalcError, match="give exactly one target"):
            steps_for_target(26, 3, 17, "update", **bad)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("field,kwargs,valid", [
    ("images", dict(images=0), ">= 1"),
    ("images", dict(images=-3), ">= 1"),
    ("images", dict(images=2.5), "whole number"),
    ("images", dict(images="abc"), "whole number"),
    ("images", dict(images=None), "got nothing"),
    ("images", dict(images=MAX_COUNT + 1), "<= 1,000,000,000"),
    ("batch_size", dict(batch_size=0), ">= 1"),
    ("batch_size", dict(batch_size=-1), ">= 1"),
    ("batch_size", dict(batch_size=1.5), "whole number"),
    ("batch_size", dict(batch_size=True), "whole number"),
    ("batch_size", dict(batch_size=27), "larger than the 26 training images"),
    ("batch_size", dict(batch_size=5, val_split=0.9), "larger than the 3 training images"),
    ("grad_accum", dict(grad_accum=0), ">= 1"),
    ("grad_accum", dict(grad_accum=float("nan")), "whole number"),
    ("steps", dict(steps=0), ">= 1"),
    ("steps", dict(steps=-100), ">= 1"),
    ("steps", dict(steps=10.5), "whole number"),
    ("steps", dict(steps=float("inf")), "whole number"),
    ("step_unit", dict(step_unit="epoch"), "one of update, batch"),
    ("steps", dict(steps=1, step_unit="batch"), "make no weight update"),  # 1 batch < GA 2
    ("repeats", dict(repeats=0), ">= 1"),
    ("val_split", dict(val_split=1), "[0, 1)"),
    ("val_split", dict(val_split=-0.1), "[0, 1)"),
    ("processes", dict(processes=0), ">= 1"),
])
def test_bad_input_names_the_field(field, kwargs, valid):
    args = dict(images=26, batch_size=3, grad_accum=2, steps=100, step_unit="update") | kwargs
    with pytest.raises(CalcError) as err:
        derive(**args)
    assert err.value.field == field
    assert str(err.value).startswith(field + " ") and valid in str(err.value)
    assert isinstance(err.value, ValueError)


def test_whole_numbers_typed_as_text_or_float_are_accepted():
    d = derive("26", 13.0, " 2 ", "3000", " Batch ")
    assert (d.images, d.batch_size, d.grad_accum, d.steps, d.step_unit) == (26, 13, 2, 3000, "batch")


@pytest.mark.parametrize("call,field", [
    (lambda: full_cycle_settings(0), "images"),
    (lambda: full_cycle_settings(20, 0), "max_batch_size"),
    (lambda: nearest_full_cycle(20, -1), "max_batch_size"),
    (lambda: step_size_for_epochs(0, 16, 4), "k"),
    (lambda: step_size_for_epochs(10, 16, 17), "batch_size"),
    (lambda: cycles_for_run(800, 0), "step_size"),
    (lambda: updates_for_cycles(-1, 40), "cycles"),
    (lambda: step_size_for_cycles(0, 5), "total_updates"),
    (lambda: low_point_run(50, 0), "min_updates"),
    (lambda: study_table(26, (13, 2), (3, 2), 150, 3000), "high_grad_accum"),
    (lambda: study_table(26, (30, 2), (3, 17), 150, 3000), "low_batch_size"),
    (lambda: study_table(26, (13, 2), (3, 17), 150, 150), "high_steps"),
    (lambda: study_table(26, (13, 2), (3, 17), 0, 150), "low_steps"),
    (lambda: study_table(26, (13, 2), 3, 10, 150), "high"),
])
def test_helpers_name_the_bad_field(call, field):
    with pytest.raises(CalcError) as err:
        call()
    assert err.value.field == field and str(err.value).startswith(field + " ")


# ------------------------------------------------------------------ command line

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "embedtrain", "calc", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_table_json_and_errors():
    out = run_cli("--images", "26", "--batch-size", "3", "--grad-accum", "17", "--steps", "3000",
                  "--step-unit", "batch", "--max-batch-size", "8")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "26 images, BS 3, GA 17, 3000 steps (step = batch)" in text
    assert "floor(3000 / 17)" in text and "= 176" in text and "= 346.1538" in text
    assert "BS    2  GA   13" in text and "BS   13" not in text  # the cap of 8 applies

    out = run_cli("--images", "20", "--batch-size", "4", "--steps", "400", "--val-split", "0.2", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("images", "batch_size", "grad_accum", "steps", "step_unit", "batches", "weight_updates",
                "images_shown", "epochs", "epochs_floor", "updates_per_epoch", "batches_per_epoch", "full_cycle",
                "straddle", "validation_images", "full_cycle_settings"):
        assert key in data, key
    assert (data["images"], data["validation_images"], data["epochs"], data["weight_updates"]) == (16, 4, 100, 400)
    assert data["full_cycle_settings"][0] == {"batch_size": 16, "grad_accum": 1}

    for args, flag in [(("--images", "26", "--batch-size", "0", "--steps", "5"), "--batch-size"),
                       (("--images", "26", "--batch-size", "30", "--steps", "5"), "--batch-size"),
                       (("--images", "2.5", "--batch-size", "1", "--steps", "5"), "--images"),
                       (("--images", "26", "--batch-size", "2", "--steps", "-4"), "--steps"),
                       (("--images", "26", "--batch-size", "2", "--steps", "5", "--step-unit", "epoch"), "--step-unit"),
                       (("--images", "26", "--batch-size", "2"), "--steps")]:
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stdout)
        assert out.stderr.startswith("error: ") and flag in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1


def test_cli_in_process_and_no_heavy_imports(capsys):
    assert cli(["--images", "29", "--batch-size", "1", "--steps", "10", "--max-batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "29 is prime" in text and "drop 1 image -> 28 = 7 x 4" in text
    probe = subprocess.run([sys.executable, "-c", "import sys, embedtrain.calculator; "
                            "print(sorted({'torch', 'gradio', 'numpy'} & set(sys.modules)))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


# ------------------------------------------------------------------ the trainer counts the same way

def read_log(run_dir):
    with open(Path(run_dir) / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    # 8 images, 25 % validation -> 6, x 2 repeats = 12; 10 per update (straddles epochs), 9 batches: the last
    # accumulation group is incomplete
    dict(batch_size=5, grad_accum=2, steps=9, step_unit="batch", val_split=0.25, repeats=2),
    # full-cycle: 8 = 4 x 2, so weight updates == epochs
    dict(batch_size=4, grad_accum=2, steps=3, step_unit="update"),
])
def test_trainer_log_agrees_with_the_calculator(tiny_cfg, tmp_path, settings):
    from embedtrain.trainer import train

    cfg = tiny_cfg.replace(**settings)
    result = train(cfg, run_dir=tmp_path / "run", log=lambda *a: None)
    assert result.status == "finished"
    plan = derive(8, cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.step_unit, repeats=cfg.repeats,
                  val_split=cfg.val_split)
    rows = read_log(tmp_path / "run")
    assert [int(r["update"]) for r in rows] == list(range(1, plan.weight_updates + 1))
    assert result.updates == plan.weight_updates
    for r in rows:  # every row is the calculator's answer for a run that stops after that update
        at = derive(8, cfg.batch_size, cfg.grad_accum, int(r["update"]), "update", repeats=cfg.repeats,
                    val_split=cfg.val_split)
        assert int(r["batch"]) == at.batches
        assert int(r["images_seen"]) == at.images_shown
        assert float(r["epoch"]) == round(at.epochs, 4)
    last = rows[-1]
    assert int(last["batch"]) == plan.batches_run and float(last["epoch"]) == round(plan.epochs_run, 4)
    if plan.incomplete_batches == 0:
        assert float(last["epoch"]) == round(plan.epochs, 4)
    if plan.full_cycle:
        assert float(last["epoch"]) == plan.weight_updates
    else:
        assert plan.straddle > 0 and plan.incomplete_batches == 1
        assert not math.isclose(plan.epochs, plan.epochs_run)
