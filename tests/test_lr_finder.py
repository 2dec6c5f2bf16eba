"""LR finder: the reading functions on synthetic curves whose answers are known by construction, then the
range test and a 3-candidate sweep end to end on the tiny model (real runs, real files)."""

import csv
import json
import math
import random
import subprocess
import sys

import pytest

from embedtrain.lr_finder import (VERDICTS, classify_curve, default_candidates, describe_all, describe_curve,
                                  parse_candidates, ramp_lr, recommend, small_validation_warning, smooth, suggest_range)

LRS = [0.025 * i for i in range(41)]  # a linear ramp 0 -> 1, 41 measurements


def u_shape(lr):
    """Flat at 1.0 until 0.1, falls linearly to 0.5 at lr 0.5, flat to 0.6, then rises to 0.9 at 1.0."""
    if lr <= 0.1:
        return 1.0
    if lr <= 0.5:
        return 1.0 - 0.5 * (lr - 0.1) / 0.4
    if lr <= 0.6:
        return 0.5
    return 0.5 + 0.4 * (lr - 0.6) / 0.4


# ------------------------------------------------------------------ smoothing

def test_smooth_keeps_straight_lines_and_averages_inside():
    line = [2.0 - 0.1 * i for i in range(20)]
    assert smooth(line) == pytest.approx(line)
    # inside the curve a window of 3 is the plain 3-point mean
    assert smooth([0, 3, 0, 3, 0], 3)[1:4] == pytest.approx([1, 2, 1])
    # at the ends the window slides inward: the line through (0,0),(1,3),(2,0) is flat at 1
    assert smooth([0, 3, 0, 3, 0], 3)[0] == pytest.approx(1.0)


# ------------------------------------------------------------------ range test suggestions

def test_clean_u_shape_gives_bounds_at_the_corners():
    s = suggest_range(LRS, [u_shape(x) for x in LRS])
    assert s["status"] == "ok"
    # the fall starts at 0.1 and 10% of it (0.05) is done at lr 0.14: the first measurement past it
    assert 0.125 <= s["lower"] <= 0.175
    # the fall ends at 0.5 (flat to 0.6, then up)
    assert 0.475 <= s["upper"] <= 0.55
    assert s["midpoint"] == pytest.approx((s["lower"] + s["upper"]) / 2)
    assert any("turns up" in r for r in s["reasons"])
    assert set(s) >= {"lower", "upper", "midpoint", "reasons"}


def test_users_zoomed_ramp_reads_their_bounds():
    # docs/guide.md#range-test: 0 -> 1.5e-6 over 400 updates, val every 4 updates (an epoch); the loss falls from
    # the start, flattens at updates 300-350 and rises after. A curve of that shape (a steady fall that
    # eases off over its last 40 updates):
    updates = list(range(0, 401, 4))
    lrs = [1.5e-6 * u / 400 for u in updates]

    def loss(u):
        if u <= 260:
            return 0.4 - 0.09 * u / 260
        if u <= 300:
            return 0.31 - 0.01 * (1 - ((300 - u) / 40) ** 2)
        return 0.30 if u <= 350 else 0.30 + 0.02 * (u - 350) / 50

    s = suggest_range(lrs, [loss(u) for u in updates])
    assert s["status"] == "ok"
    # 10% of the 0.1 fall is done at update 29: LR 1.1e-7 (the users read 1.9e-7 at update 50)
    assert 1.0e-7 <= s["lower"] <= 1.3e-7
    # within 5% of the minimum from update ~283: LR 1.06e-6 (the users read 1.13e-6 at update 300)
    assert 1.0e-6 <= s["upper"] <= 1.13e-6


def test_monotone_fall_gives_an_upper_bound_that_is_only_a_lower_limit():
    lrs = [0.05 * i for i in range(21)]
    s = suggest_range(lrs, [1 - 0.5 * x for x in lrs])
    assert s["status"] == "still_falling"
    assert s["lower"] == pytest.approx(0.1)   # 10% of the 0.5 fall
    assert s["upper"] == pytest.approx(0.95)  # within 5% of the minimum
    assert any("still falling at the end" in r and "raise the end LR" in r for r in s["reasons"])


def test_curve_that_never_falls_is_refused_with_the_reason():
    rising = suggest_range(LRS, [1 + 0.3 * x for x in LRS])
    assert rising["lower"] is None and rising["upper"] is None and rising["midpoint"] is None
    assert rising["status"] == "too_high"
    assert "LR too high from the start" in rising["reasons"][0] and "lower the start LR" in rising["reasons"][0]

    flat = suggest_range(LRS, [1.0 + 1e-7 * math.sin(i) for i in range(41)])
    assert flat["lower"] is None and flat["status"] == "no_learning"
    assert "no learning" in flat["reasons"][0] and "raise the end LR" in flat["reasons"][0]

    pure_noise = suggest_range(LRS, [1.0 + random.Random(3).gauss(0, 0.01) for _ in LRS])
    assert pure_noise["lower"] is None, pure_noise["reasons"]

    few = suggest_range([0, 1, 2], [3, 2, 1])
    assert few["status"] == "too_few_points" and "lower val_every" in few["reasons"][0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noisy_u_shape_still_finds_the_corners(seed):
    rng = random.Random(seed)
    noisy = [u_shape(x) + rng.gauss(0, 0.02) for x in LRS]  # noise 4% of the fall
    s = suggest_range(LRS, noisy)
    assert s["status"] == "ok", s["reasons"]
    assert 0.075 <= s["lower"] <= 0.25
    assert 0.4 <= s["upper"] <= 0.625


def test_suggest_range_checks_its_input():
    with pytest.raises(ValueError, match="same length"):
        suggest_range([1, 2], [1])
    with pytest.raises(ValueError, match="increasing"):
        suggest_range([3, 2, 1, 0, -1], [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        suggest_range(LRS[:5], [1, 1, float("nan"), 1, 1])


# ------------------------------------------------------------------ sweep verdicts

U = list(range(0, 81, 4))  # 20 epochs of 4 updates, validation every epoch, point 0 = fresh embedding


def falls(u, depth=0.1, tau=25.0):
    return 0.4 - depth * (1 - math.exp(-u / tau))


def test_classify_the_four_kinds():
    c = classify_curve(U, [falls(u) for u in U])
    assert c["verdict"] == "falls" and c["bumps"] == 0 and c["turns_up_after"] is None

    bumpy = [falls(u) + (0.01 if u == 40 else 0) for u in U]  # one point 10% of the fall above the trend
    c = classify_curve(U, bumpy)
    assert c["verdict"] == "bump" and c["bumps"] == 1

    turning = [0.3 + 0.1 * ((u - 28) / 28) ** 2 for u in U]  # best at update 28, then up
    c = classify_curve(U, turning)
    assert c["verdict"] == "turns_up" and c["turns_up_after"] == 28

    c = classify_curve(U, [0.4] * len(U))
    assert c["verdict"] == "no_learning" and not c["rises"]
    c = classify_curve(U, [0.4 + 0.002 * u for u in U])
    assert c["verdict"] == "no_learning" and c["rises"]


def test_a_flat_end_within_5_percent_still_counts_as_falling():
    # fell 0.1, then drifts up 0.003 (3% of the fall) at the very end: flattening, not turning up
    y = [falls(u, tau=8) for u in U]
    y[-1] = min(y) + 0.003
    assert classify_curve(U, y)["verdict"] == "falls"
    y[-1] = min(y) + 0.008  # 8%: it turned up
    assert classify_curve(U, y)["verdict"] == "turns_up"


def test_noisy_falling_curve_is_not_called_bumpy():
    rng = random.Random(7)
    y = [falls(u) + rng.gauss(0, 0.0005) for u in U]  # noise 0.5% of the fall
    assert classify_curve(U, y)["verdict"] == "falls"


def users_sweep():
    """docs/guide.md#sweep, 20 epochs each: 1e-4 learns nothing, 1e-5 and 7e-6 turn up after about 30 updates,
    5e-6 one small bump, 2e-6 smooth."""
    return {
        1e-4: [0.4 + 0.001 * u for u in U],
        1e-5: [0.3 + 0.1 * ((u - 32) / 32) ** 2 for u in U],
        7e-6: [0.31 + 0.09 * ((u - 28) / 28) ** 2 for u in U],
        5e-6: [falls(u, 0.09) + (0.01 if u == 44 else 0) for u in U],
        2e-6: [falls(u, 0.06, 40) for u in U],
    }


def test_users_sweep_recommends_2e_6():
    data = users_sweep()
    curves = {lr: classify_curve(U, y) for lr, y in data.items()}
    assert [curves[lr]["verdict"] for lr in (1e-4, 1e-5, 7e-6, 5e-6, 2e-6)] == \
        ["no_learning", "turns_up", "turns_up", "bump", "falls"]
    assert curves[1e-5]["turns_up_after"] == 32 and curves[7e-6]["turns_up_after"] == 28
    lr, reasons = recommend(list(curves), list(curves.values()))
    assert lr == 2e-6 and "highest candidate whose validation loss falls throughout" in reasons[0]
    sentences = {x: describe_curve(x, c) for x, c in curves.items()}
    assert "too high" in sentences[1e-4]
    assert "turns up after 32 updates" in sentences[1e-5]
    assert "1 bump" in sentences[5e-6]
    assert sentences[2e-6].startswith("LR 2e-06: falls throughout")

    # without the smooth one, the bumpy 5e-6 is the fallback; without both, no recommendation
    lr, reasons = recommend([1e-4, 1e-5, 5e-6], [curves[1e-4], curves[1e-5], curves[5e-6]])
    assert lr == 5e-6 and "bump" in reasons[0]
    lr, reasons = recommend([1e-4, 1e-5, 7e-6], [curves[1e-4], curves[1e-5], curves[7e-6]])
    assert lr is None and "try candidates below 7e-06" in reasons[0]
    lr, reasons = recommend([1e-4], [curves[1e-4]])
    assert lr is None and "too high" in reasons[0]
    flat = classify_curve(U, [0.4] * len(U))
    lr, reasons = recommend([1e-9, 1e-8], [flat, flat])
    assert lr is None and "try higher candidates" in reasons[0]
    # the highest candidate falling: say that higher ones might too
    lr, reasons = recommend([2e-6], [curves[2e-6]])
    assert lr == 2e-6 and "add higher candidates" in reasons[1]


def test_a_flat_curve_is_called_too_high_or_too_low_by_its_neighbours():
    flat = classify_curve(U, [0.4] * len(U))
    learns = classify_curve(U, [falls(u) for u in U])
    assert "lower LRs learn, so this one is too high" in describe_all([1e-3, 1e-2], [learns, flat])[1]
    assert "higher LRs learn, so this one is too low" in describe_all([1e-5, 1e-3], [flat, learns])[0]
    alone = describe_all([1e-5], [flat])[0]
    assert alone == describe_curve(1e-5, flat) and "or so high that it overshoots" in alone


def test_small_validation_warning():
    assert "one batch" in small_validation_warning(4, 4)        # the users' case
    assert "3 images" in small_validation_warning(3, 1)
    assert small_validation_warning(8, 4) is None
    assert small_validation_warning(0, 4) is None


def test_ramp_and_candidates():
    assert ramp_lr(0, 400, 0, 3e-6) == 0 and ramp_lr(399, 400, 0, 3e-6) == pytest.approx(3e-6)
    assert ramp_lr(133, 400, 0, 3e-6) == pytest.approx(1e-6)
    assert [ramp_lr(u, 5, 1e-4, 1.0, "exponential") for u in range(5)] == pytest.approx([1e-4, 1e-3, 1e-2, 0.1, 1])
    assert default_candidates(5e-3) == [5e-4, 1.58e-3, 5e-3, 1.58e-2]
    assert parse_candidates("5e-3, 1e-3 2e-3") == [1e-3, 2e-3, 5e-3]
    for bad, msg in (("", "empty"), ("1e-3, x", "'x' is not a number"), ("0", "> 0"), ("1e-3,1e-3", "twice")):
        with pytest.raises(ValueError, match=msg):
            parse_candidates(bad)
    assert set(VERDICTS.values()) == {"falls throughout", "small bump", "turns up", "does not learn"}


def test_import_does_not_pull_torch():
    code = "import sys, embedtrain.lr_finder; sys.exit(any(m in sys.modules for m in ('torch', 'gradio')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------ end to end on the tiny model

def _quiet(*a, **k):
    pass


@pytest.mark.slow
def test_range_test_and_sweep_on_one_loaded_model(tiny_cfg, tmp_path, monkeypatch):
    from PIL import Image

    from embedtrain import models
    from embedtrain.lr_finder import finder_config, range_test, sweep
    from embedtrain.trainer import Trainer

    loads = []
    real_load = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    cfg, notes = finder_config(tiny_cfg, typed=set())
    assert cfg.val_split == 0.25 and "holding out 25%" in notes[0]
    trainer = Trainer(cfg, log=_quiet)

    # range test: 10 updates, validation every 2 -> 6 measurements with the fresh one at update 0
    rep = range_test(cfg, tmp_path / "find", updates=10, val_every=2, end_lr=0.2, trainer=trainer, log=_quiet)
    for name in ("lr_find.csv", "lr_find.json", "lr_find.png", "range/log.csv"):
        assert (tmp_path / "find" / name).is_file(), name
    saved = json.loads((tmp_path / "find" / "lr_find.json").read_text())
    assert saved == json.loads(json.dumps(rep))
    assert {"lower", "upper", "midpoint", "reasons"} <= set(saved) and saved["reasons"]
    # the loss falls over this ramp on the tiny model: a range is read off, inside the ramp
    assert saved["lower"] is not None, saved["reasons"]
    assert 0 <= saved["lower"] <= saved["midpoint"] <= saved["upper"] <= 0.2
    with open(tmp_path / "find" / "lr_find.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["update"]) for r in rows] == list(range(11))
    assert float(rows[1]["lr"]) == 0.0 and float(rows[-1]["lr"]) == pytest.approx(0.2)  # the ramp, update by update
    assert sum(r["val_loss"] != "" for r in rows) == 6
    assert Image.open(tmp_path / "find" / "lr_find.png").size == (800, 480)
    # 2 validation images: the verdict carries the warning
    assert any("small validation set (2 images, one batch)" in w for w in saved["warnings"])

    # sweep: 3 candidates x 1 epoch (3 updates) on the same loaded model
    sweep(cfg, tmp_path / "sweep", candidates=[3e-2, 1e-1, 3e-1], epochs=1, trainer=trainer, log=_quiet)
    assert len(loads) == 1  # the model was loaded once for the range test and all three candidates
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (tmp_path / "sweep" / name).is_file(), name
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [c["lr"] for c in saved["candidates"]] == [3e-2, 1e-1, 3e-1]
    assert all(c["sentence"].startswith(f"LR {c['lr']:.3g}: ") for c in saved["candidates"])
    rec = saved["recommended_lr"]
    assert rec is not None, saved["reasons"]
    chosen = next(c for c in saved["candidates"] if c["lr"] == rec)
    assert chosen["verdict"] == "falls"
    with open(tmp_path / "sweep" / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {float(r["lr"]) for r in rows} == {3e-2, 1e-1, 3e-1}
    curve = [float(r["val_loss"]) for r in rows if float(r["lr"]) == rec and r["val_loss"]]
    assert len(curve) == 1 + saved["updates"] // saved["val_every"] and curve[-1] < curve[0]
    # same fresh start, same data order: every candidate starts from the same loss and sees the same
    # first batch with the same noise, so its first training loss is identical
    firsts = {r["lr"]: r["loss"] for r in rows if r["update"] == "1"}
    starts = {r["lr"]: r["val_loss"] for r in rows if r["update"] == "0"}
    assert len(set(firsts.values())) == 1 and len(set(starts.values())) == 1
    # each candidate's run folder records its own constant LR
    for c in saved["candidates"]:
        run_cfg = json.loads((tmp_path / "sweep" / c["run_dir"].split("/")[-1] / "config.json").read_text())
        assert run_cfg["lr"] == c["lr"] and run_cfg["lr_schedule"] == "constant"

    # a stop request (the UI's Stop button, Ctrl-C) ends the ramp early; the part that ran is still read
    calls = []
    rep = range_test(cfg, tmp_path / "stopped", updates=6, val_every=1, end_lr=0.2, trainer=trainer, log=_quiet,
                     stop=lambda: calls.append(1) or len(calls) >= 3)
    assert rep["updates_run"] == 3 and any("stopped at update 3 of 6" in r for r in rep["reasons"])
    assert not (tmp_path / "stopped" / "range" / "resume.pt").exists()


@pytest.mark.slow
def test_cli_takes_the_train_flags_and_refuses_bad_ones(images, tmp_path, capsys):
    base = [sys.executable, "-m", "embedtrain"]
    common = ["--model", "tiny", "--data", str(images), "--name", "zorblat", "--init-text", "circle",
              "--template", "object", "--batch-size", "4", "--out", str(tmp_path), "--val-split", "0.5"]
    r = subprocess.run(base + ["sweep", *common, "--run-name", "sw", "--candidates", "0.05,0.2", "--epochs", "1",
                               "--val-every", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr  # 1 = ran, but no recommendation
    out = r.stdout
    assert ("recommended LR" in out) == (r.returncode == 0) and "wrote" in out
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [c["lr"] for c in saved["candidates"]] == [0.05, 0.2] and saved["updates"] == 2  # at least 2 updates per run
    assert saved["validation_images"] == 4 and saved["training_images"] == 4
    assert (saved["recommended_lr"] is not None) == (r.returncode == 0)   # exit 1 means: ran, no recommendation

    # bad settings: exit code 2 and a message naming the setting, before anything loads
    from embedtrain.__main__ import main
    for argv, says in ((["lr-find", *common, "--updates", "3"], "updates must be a whole number >= 5"),
                       (["sweep", *common, "--candidates", "1e-3,abc"], "'abc' is not a number"),
                       (["sweep", *common, "--batch-size", "0"], "batch_size must be >= 1 and <= 1024, got 0"),
                       (["lr-find", *common, "--ramp", "exponential", "--start-lr", "0"], "start_lr must be")):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err


@pytest.mark.slow
def test_lr_free_optimizers_log_their_effective_lr_and_validate_in_eval_mode(tiny_cfg, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from embedtrain import optimizers
    from embedtrain.trainer import Trainer

    made = []
    real_make = optimizers.make_optimizer
    monkeypatch.setattr(optimizers, "make_optimizer", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])

    def run(optimizer, lr):
        t = Trainer(tiny_cfg.replace(optimizer=optimizer, lr=lr, steps=3, val_split=0.25), log=_quiet)
        result = t.run(tmp_path / optimizer)
        with open(tmp_path / optimizer / "log.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return t, result, rows

    for name in ("dadapt_adam", "prodigy"):
        _, _, rows = run(name, 1.0)
        eff = [float(r["effective_lr"]) for r in rows]
        # d starts at d0 = 1e-6: the step really taken is d x lr, far below the lr of 1.0 that is set
        assert all(float(r["lr"]) == 1.0 for r in rows) and all(0 < e < 1e-3 for e in eff), (name, eff)
    _, _, rows = run("adamw", 5e-3)
    assert all(float(r["effective_lr"]) == float(r["lr"]) == 5e-3 for r in rows)

    # Schedule-Free keeps the point it evaluates (x) apart from the one it trains at (y): the final
    # validation loss and the saved file must both come from x, the eval-mode vectors the run ends with.
    t, result, rows = run("schedulefree_adamw", 5e-2)
    saved = load_file(str(tmp_path / "schedulefree_adamw" / f"{tiny_cfg.name}.safetensors"))["emb_params"]
    opt = made[-1]
    assert type(opt).__module__.startswith("schedulefree") and opt.param_groups[0]["train_mode"] is False
    assert torch_equal(saved, t.token.vectors)
    assert result.val_loss == pytest.approx(t.fixed_loss("val"), rel=1e-6)
    x = t.token.vectors.detach().clone()
    opt.train()  # the training point y really is elsewhere, so saving it by mistake would show
    assert not torch_equal(x, t.token.vectors)


def torch_equal(a, b):
    import torch
    return torch.equal(a.detach().cpu(), b.detach().cpu())
