"""LR finder tab: its pure helpers on real files, then the real page in Chromium running a range test and a
sweep on the tiny model and sending the results to the Train tab."""

import csv
import json
import math
import subprocess
import sys

import pytest

from conftest import make_images
from embedtrain import EmbedtrainError
from embedtrain.lr_finder import prepare, request
from embedtrain.ui.lr_tab import (finder_options, finder_settings, lr_settings, progress_frame, range_settings,
                                  verdict_markdown)
from uihelp import app_server, chromium_page

TRAIN_VALUES = {"model": "tiny", "data": "/data/x", "name": "zorblat", "init_text": "circle", "vectors": 1.0,
                "template": "object", "batch_size": 2.0, "grad_accum": 1.0, "optimizer": "adamw", "seed": 0.0,
                "resolution": 32.0, "val_split": 0.0, "lr": "0.005"}


def test_a_finder_request_from_the_train_tab_is_what_its_command_line_runs(images, tmp_path):
    """The web UI checks a finder run without argparse (lr_finder.request); the process it starts reads the
    same settings from job.json and must arrive at the same run."""
    values = dict(TRAIN_VALUES, data=str(images))
    settings = finder_settings(values, tmp_path, "r1")
    assert "val_split" not in settings   # 0 = let the finder hold out its 25%
    cfg, options, out_dir, argv = request("lr-find", settings, finder_options(
        "range", {"ramp": "exponential", "updates": 40.0, "start_lr": "", "end_lr": "0.1"}))
    assert (cfg.model, cfg.name, cfg.batch_size, cfg.val_split, cfg.lr) == ("tiny", "zorblat", 2, 0.25, 0.005)
    assert options["ramp"] == "exponential" and options["end_lr"] == 0.1 and options["updates"] == 40
    assert out_dir == tmp_path / "r1"
    assert argv[:3] == ["lr-find", "--config", str(out_dir / "job.json")]
    (out_dir).mkdir()
    (out_dir / "job.json").write_text(json.dumps(settings))
    cli_cfg, args, notes, cli_out = prepare(argv[0], argv[1:])
    assert cli_cfg == cfg and cli_out == out_dir and "holding out 25%" in notes[0]
    assert (args.ramp, args.end_lr, args.start_lr, args.updates) == ("exponential", 0.1, None, 40)

    settings = finder_settings(dict(values, val_split=0.5), tmp_path, "s1")
    cfg, options, _, argv = request("sweep", settings, finder_options("sweep", {"candidates": "1e-3, 3e-3",
                                                                                "epochs": 2.0}))
    assert options["candidates"] == [1e-3, 3e-3] and options["epochs"] == 2.0 and cfg.val_split == 0.5
    assert argv[argv.index("--candidates") + 1] == "0.001,0.003"
    with pytest.raises(EmbedtrainError, match="'x' is not a number"):
        request("sweep", finder_settings(values, tmp_path, "s2"), finder_options("sweep", {"candidates": "1e-3, x"}))
    with pytest.raises(EmbedtrainError, match="batch_size must be a number|batch_size"):
        request("lr-find", finder_settings(dict(values, batch_size="lots"), tmp_path, "s3"), {})


def test_progress_frame_reads_the_runs_as_they_are_written(tmp_path):
    def log(folder, rows):
        folder.mkdir(parents=True)
        with open(folder / "log.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["update", "lr", "loss", "val_loss"])
            w.writeheader()
            w.writerows(rows)

    log(tmp_path / "r" / "range", [{"update": 1, "lr": 0.0, "loss": 1.0, "val_loss": ""},
                                   {"update": 2, "lr": 0.1, "loss": 0.9, "val_loss": 0.8}])
    frame = progress_frame("range", tmp_path / "r")
    assert frame.values.tolist()[1:] == [[0.1, 0.8, "validation loss"]]
    assert frame.iloc[0].isna()[["lr", "value"]].all()   # the placeholder that names the series from the start
    log(tmp_path / "s" / "lr2-0.003", [{"update": 1, "lr": 0.003, "loss": 1, "val_loss": 0.7}])
    log(tmp_path / "s" / "lr1-0.001", [{"update": 1, "lr": 0.001, "loss": 1, "val_loss": 0.75},
                                       {"update": 2, "lr": 0.001, "loss": 1, "val_loss": 0.74}])
    frame = progress_frame("sweep", tmp_path / "s")
    assert [row[:3] for row in frame.values.tolist()] == [[1, 0.75, "LR 0.001"], [2, 0.74, "LR 0.001"],
                                                        [1, 0.7, "LR 0.003"]]
    assert list(frame["log10 LR"]) == pytest.approx([-3, -3, math.log10(0.003)])
    empty = progress_frame("sweep", tmp_path / "missing")
    # typed even when empty, or the plot reads the numbers as categories
    assert empty.empty and empty.dtypes["update"] == float and empty.dtypes["value"] == float


def test_verdicts_and_settings_for_the_train_tab():
    report = {"lower": 1.2345e-3, "upper": 5e-3, "midpoint": 3.117e-3, "reasons": ["because"], "updates_per_epoch": 2.25,
              "warnings": ["small validation set (3 images)"]}
    text = verdict_markdown("range", report)
    assert "**Suggested range: 0.00123 to 0.005** (midpoint 0.00312)" in text and "- because" in text
    assert text.startswith("> ⚠️ **Warning:** small validation set")
    assert range_settings(report, 4) == {"lr_schedule": "triangular", "lr_min": 0.00123, "lr": "0.005",
                                         "lr_step_size": 9, "lr_step_size_epochs": 0, "lr_cycle_start": "low"}
    with pytest.raises(EmbedtrainError, match="gave no range"):
        range_settings(dict(report, lower=None), 4)
    sweep = {"recommended_lr": None, "reasons": ["no candidate learns"], "warnings": [],
             "candidates": [{"sentence": "LR 0.1: does not learn: ..."}]}
    assert "**No recommendation.**" in verdict_markdown("sweep", sweep) and "- LR 0.1: does not learn" in \
        verdict_markdown("sweep", sweep)
    with pytest.raises(EmbedtrainError, match="recommended no LR"):
        lr_settings(sweep)
    assert lr_settings(dict(sweep, recommended_lr=0.0158)) == {"lr": "0.0158", "lr_schedule": "constant"}


def test_module_does_not_import_torch():
    code = "import sys, embedtrain.ui.lr_tab; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
@pytest.mark.browser
def assert_draws_lines(page, plot: str, x_title: str) -> None:
    """The plot draws what it should: numeric axes over finite values (not categories, not an empty
    Infinity..-Infinity domain) and at least one line."""
    axes = page.eval_on_selector_all(f"{plot} [aria-label*='-axis']", "els => els.map(e => e.getAttribute('aria-label'))")
    assert any(f"titled '{x_title}' for a linear scale" in a for a in axes), axes
    assert all("linear scale" in a and "Infinity" not in a for a in axes), axes
    strokes = page.eval_on_selector_all(f"{plot} g.mark-line path", "els => els.map(e => e.getAttribute('stroke'))")
    assert strokes and all(strokes), strokes   # a line without a colour is not drawn


def test_describe_changes_names_what_use_this_range_changes():
    from embedtrain.ui.lr_tab import describe_changes
    said = describe_changes({"lr_schedule": "triangular", "lr": "0.02", "lr_min": 0.001},
                            {"lr_schedule": "constant", "lr": "0.020", "lr_min": 0.0}, {"lr_schedule": "LR schedule"})
    assert said == "LR schedule: constant → triangular; lr_min: 0.0 → 0.001"
    assert describe_changes({"lr": "0.1"}, {"lr": "0.1"}, {}).startswith("nothing")


def test_lr_tab_in_chromium(tmp_path):
    from playwright.sync_api import expect
    data = make_images(tmp_path / "data", 8)
    outputs = tmp_path / "outputs"
    with app_server(outputs, "--model", "tiny", "--data", str(data)) as url, chromium_page() as page:
        page.goto(url)
        train = page.locator("#tab-train")
        field = lambda label: train.locator("label", has_text=label).first.locator("input, textarea").first  # noqa: E731
        field("Embedding name").fill("zorblat")
        field("Initialization text").fill("circle")
        field("Batch size").fill("2")
        page.get_by_role("tab", name="LR finder").click()
        # a bad setting is refused before any process starts, naming the field
        page.locator("#lr-end input, #lr-end textarea").first.fill("abc")
        page.locator("#lr-run-range").click()
        expect(page.locator("#lr-message")).to_contain_text("end_lr must be a number", timeout=30_000)
        assert not (outputs / "lr" / ".job.json").exists()

        # range test: 6 updates from 0 to 0.2, a live curve, then the verdict in words and the plot
        page.locator("#lr-end input, #lr-end textarea").first.fill("0.2")
        page.locator("#lr-updates input").fill("6")
        page.locator("#lr-run-range").click()
        expect(page.locator("#lr-message")).to_contain_text("Started", timeout=30_000)
        expect(page.locator("#lr-status")).to_contain_text("Range test", timeout=60_000)
        verdict = page.locator("#lr-verdict")
        expect(verdict).to_contain_text("Suggested range", timeout=240_000)
        expect(verdict).to_contain_text("small validation set (2 images, one batch)")  # 25% of 8, BS 2
        expect(page.locator("#lr-status")).to_contain_text("finished")
        expect(page.locator("#lr-range-plot canvas, #lr-range-plot svg").first).to_be_visible()
        assert_draws_lines(page, "#lr-range-plot", "learning rate")
        expect(page.locator("#lr-image img")).to_be_visible()
        run = next((outputs / "lr").glob("zorblat-lrfind-*"))
        report = json.loads((run / "lr_find.json").read_text())
        assert report["lower"] is not None and report["updates_run"] == 6
        page.screenshot(path=str(tmp_path / "lr-range.png"), full_page=True)

        # "Use this range" fills the Train tab with a triangular cycle between the bounds
        expect(page.locator("#lr-use-range")).to_be_enabled()
        page.locator("#lr-use-range").click()
        expect(page.get_by_role("tab", name="Train", selected=True)).to_be_visible()
        expect(field("Learning rate")).to_have_value(f"{report['upper']:.3g}")
        expect(train.get_by_label("LR schedule")).to_have_value("triangular")
        # ... and says there what it changed (the schedule switch was silent)
        expect(page.locator("#train-message")).to_contain_text("LR schedule: constant → triangular")

        # sweep: two candidates, half an epoch each, recommendation and "Use this LR"
        page.get_by_role("tab", name="LR finder").click()
        page.locator("#lr-candidates input, #lr-candidates textarea").first.fill("0.05, 0.2")
        page.locator("#lr-epochs input").fill("0.5")
        page.locator("#lr-run-sweep").click()
        expect(page.locator("#lr-message")).to_contain_text("Started", timeout=30_000)
        expect(verdict).to_contain_text("Recommended LR", timeout=240_000)
        expect(verdict).to_contain_text("LR 0.05: ")
        expect(verdict).to_contain_text("LR 0.2: ")
        expect(page.locator("#lr-sweep-plot canvas, #lr-sweep-plot svg").first).to_be_visible()
        assert_draws_lines(page, "#lr-sweep-plot", "weight update")
        report = json.loads(next((outputs / "lr").glob("zorblat-sweep-*/sweep.json")).read_text())
        page.screenshot(path=str(tmp_path / "lr-sweep.png"), full_page=True)
        page.locator("#lr-use-lr").click()
        expect(page.get_by_role("tab", name="Train", selected=True)).to_be_visible()
        expect(field("Learning rate")).to_have_value(f"{report['recommended_lr']:.3g}")
        expect(train.get_by_label("LR schedule")).to_have_value("constant")
        expect(page.locator("#train-message")).to_contain_text("LR schedule: triangular → constant")
        assert "Traceback" not in page.content()
