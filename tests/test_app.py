"""The web app: the Train tab's helpers, the exposure rules, the HTTP API (gradio_client) and a real
Chromium session that trains, stops and survives a reload."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uihelp import ROOT, _kill_job, app_server, chromium_page, free_port


# ---------------------------------------------------------------- pure helpers (no server)

@pytest.fixture
def ctx(tmp_path):
    from embedtrain.ui.context import DEMO_DATASET, UIContext
    return UIContext(outputs=tmp_path / "outputs", model="demo", data=str(DEMO_DATASET))


def form(ctx, **changes):
    from embedtrain.ui.train_tab import FIELDS, default_config
    cfg = default_config(ctx)
    values = {k: getattr(cfg, k) for k in FIELDS}
    values["lr"] = str(values["lr"])
    values.update(changes)
    return values


def test_form_defaults_are_the_demo_preset(ctx):
    from embedtrain.ui.train_tab import form_config
    cfg = form_config(ctx, form(ctx))
    assert (cfg.model, cfg.resolution, cfg.init_text, cfg.name) == ("demo", 64, "star", "purplestar")
    assert Path(cfg.out) == ctx.outputs


def test_form_errors_name_the_field(ctx):
    from embedtrain import EmbedtrainError
    from embedtrain.ui.train_tab import derived_text, form_config
    with pytest.raises(EmbedtrainError, match="grad_accum must be >= 1"):
        form_config(ctx, form(ctx, grad_accum=0))
    with pytest.raises(EmbedtrainError, match="lr must be a number"):
        form_config(ctx, form(ctx, lr="fast"))
    with pytest.raises(EmbedtrainError, match="batch_size must be a whole number"):
        form_config(ctx, form(ctx, batch_size=2.5))
    assert derived_text(ctx, form(ctx, data="/nonexistent/x")).startswith("Error: data folder")


def test_form_takes_a1111_piecewise_lr(ctx):
    from embedtrain.ui.train_tab import form_config, schedule_frame
    values = form(ctx, lr="0.005:5, 1e-3:10, 1e-4", steps=20)
    cfg = form_config(ctx, values)
    assert cfg.lr_schedule == "piecewise" and cfg.lr_piecewise.startswith("0.005:5")
    frame, desc = schedule_frame(ctx, values)
    assert list(frame["lr"][:5]) == [0.005] * 5 and frame["lr"].iloc[-1] == pytest.approx(1e-4)
    # A schedule that ends before the run is refused with the reason, not plotted.
    frame, desc = schedule_frame(ctx, form(ctx, lr="0.005:5, 1e-3:10", steps=20))
    assert frame.empty and desc.startswith("Error")


def test_derived_numbers_agree_with_the_calculator(ctx):
    from embedtrain.ui.train_tab import derived_text
    text = derived_text(ctx, form(ctx, batch_size=4, grad_accum=3, steps=10))  # 12 demo images
    assert "12 images" in text and "10 weight updates" in text and "30 batches" in text
    assert "10.00 epochs" in text and "**full-cycle**" in text
    assert "not full-cycle" in derived_text(ctx, form(ctx, batch_size=5, grad_accum=1, steps=10))


def test_plot_frames_and_status_view(tmp_path):
    from embedtrain.ui.jobs import JobStatus
    from embedtrain.ui.train_tab import LOSS_SERIES, LR_SERIES, plot_frames, status_view
    rows = [{"update": "1", "loss": "0.5", "val_loss": "", "lr": "0.01", "effective_lr": "0.01"},
            {"update": "2", "loss": "0.4", "val_loss": "0.45", "lr": "0.01", "effective_lr": "0.02"}]
    loss, lr = plot_frames(rows)
    # every series the plot can show is named from the first value on (a placeholder row without numbers),
    # or the page's chart gives a later series no colour and draws no line
    assert list(loss["series"][:5]) == LOSS_SERIES and loss["value"][:5].isna().all()
    assert list(lr["series"][:2]) == LR_SERIES and lr["lr"][:2].isna().all()
    loss, lr = loss.dropna(), lr.dropna()
    assert list(loss["series"]) == ["loss", "loss", "validation loss", "loss (smoothed 0.9)", "loss (smoothed 0.9)"]
    # the smoothed line starts at the first loss (bias-corrected EMA): (0.09 x 0.5 + 0.1 x 0.4) / 0.19
    assert list(loss["value"][-2:]) == pytest.approx([0.5, (0.9 * 0.1 * 0.5 + 0.1 * 0.4) / 0.19])
    assert list(lr["series"]) == ["lr", "lr", "effective lr (d x lr)"]
    # typed columns even when empty: an object column makes the page's plot read numbers as categories
    empty_loss, empty_lr = plot_frames([])
    assert str(empty_loss.dtypes["update"]) == "float64" and str(empty_loss.dtypes["value"]) == "float64"
    assert str(empty_lr.dtypes["lr"]) == "float64"
    v = status_view(JobStatus("failed", run_dir=str(tmp_path), name="x", update=2, weight_updates=5, loss=0.4,
                              message="loss became nan at update 3", rows=rows))
    assert "Failed" in v["progress"] and "loss became nan" in v["progress"] and "2 / 5" in v["progress"]


def test_epoch_means_close_each_epoch_at_its_last_update():
    from embedtrain.ui.train_tab import loss_trends
    # 2.5 updates per epoch: update 3 straddles epochs 1 and 2 and counts for the epoch it ends in
    rows = [{"update": str(u), "loss": str(float(u - 1)), "epoch": str(u * 0.4)} for u in range(1, 11)]
    _, means = loss_trends(rows)
    assert means == [(2, 0.5), (5, 3.0), (7, 5.5), (10, 8.0)]
    # more epochs than updates: no epoch line (it would repeat the raw loss)
    assert loss_trends([{"update": str(u), "loss": "1", "epoch": str(u * 2.5)} for u in range(1, 6)])[1] == []


def test_form_checks_find_what_the_job_would_crash_on(ctx):
    """BS 13 on the demo's 12 images and the vocabulary word 'star' are refused before a job starts, each
    beside its field; the API's /train (JobManager.start) refuses them too and writes nothing."""
    from embedtrain.ui.jobs import JobError
    from embedtrain.ui.train_tab import form_checks, form_config
    slots, bad = form_checks(ctx, form(ctx, name="star", batch_size=13), {"name": "Embedding name"})
    assert bad == ["Embedding name", "batch_size"]
    assert "already a word of the model's vocabulary" in slots["name"] and "Embedding name" in slots["name"]
    assert "larger than the 12 training images" in slots["plan"] and slots["model"] == slots["data"] == ""
    slots, bad = form_checks(ctx, form(ctx, model="/nonexistent/model", data="/nonexistent/data"))
    assert "not found" in slots["model"] and "not one the web UI may read" in slots["data"]
    slots, bad = form_checks(ctx, form(ctx, data=str(ctx.outputs / "missing")))   # allowed, but not there
    assert "does not exist" in slots["data"]
    slots, bad = form_checks(ctx, form(ctx, lr="0.005:5, 1e-3:10", steps=20))   # the schedule ends early
    assert bad == ["lr_piecewise"] and "ends at update 10" in slots["plan"]
    assert form_checks(ctx, form(ctx))[1] == []
    for bad_form in (form(ctx, name="star"), form(ctx, batch_size=13), form(ctx, template="filewords")):
        with pytest.raises(JobError):
            ctx.jobs.start(form_config(ctx, bad_form))
    assert [p.name for p in ctx.outputs.iterdir() if not p.name.startswith(".")] == []


def test_preview_captions_read_the_png_parameters(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from embedtrain.ui.train_tab import preview_caption
    info = PngInfo()
    info.add_text("parameters", "a photo of [name]\nSteps: 20, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: demo, "
                                "Embedding: pstar, Update: 40")
    Image.new("RGB", (8, 8)).save(tmp_path / "pstar-40.png", pnginfo=info)
    assert preview_caption(tmp_path / "pstar-40.png") == "update 40 · a photo of pstar · seed 7"
    Image.new("RGB", (8, 8)).save(tmp_path / "pstar-80.png")
    assert preview_caption(tmp_path / "pstar-80.png") == "update 80"


def test_stopped_status_points_at_resume_and_stopping_is_shown(tmp_path):
    from embedtrain.ui.jobs import JobStatus
    from embedtrain.ui.train_tab import status_view
    v = status_view(JobStatus("stopped", run_dir=str(tmp_path), name="x", update=3, weight_updates=9,
                              message=f"stopped at update 3 of 9; resume with --resume {tmp_path}"), plots=False)
    assert "Press **Resume**" in v["progress"] and "--resume" not in v["progress"]
    v = status_view(JobStatus("running", run_dir=str(tmp_path), name="x", update=3, weight_updates=9,
                              stopping=True), plots=False)
    assert "Stopping" in v["progress"]


# ---------------------------------------------------------------- exposure rules

def test_refuses_a_public_host_without_auth(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--host", "0.0.0.0", "--port", str(free_port()),
                        "--outputs", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--auth" in r.stderr


def test_auth_parsing(tmp_path):
    sys.path.insert(0, str(ROOT))
    import app
    assert app.parse_auth("ann:secret") == [("ann", "secret")]
    f = tmp_path / "users.txt"
    f.write_text("# team\nann:one\n\nbob:two:three\n")
    assert app.parse_auth(str(f)) == [("ann", "one"), ("bob", "two:three")]
    with pytest.raises(SystemExit, match="user:pass"):
        app.parse_auth("ann:")


# ---------------------------------------------------------------- API and browser

def _wait(predicate, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_http_api_with_auth(tmp_path):
    """Unauthenticated calls are refused; with credentials the 'status' endpoint answers, and a 'train'
    call with a bad setting returns the field-named error instead of starting a job."""
    from gradio_client import Client
    with app_server(tmp_path / "outputs", "--auth", "ann:secret") as url:
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "gradio_api/info", timeout=10)
        assert e.value.code in (401, 403)
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(api_name="/status")
        client = Client(url, auth=("ann", "secret"), verbose=False)
        progress = client.predict(api_name="/status")[0]
        assert "No job running" in progress
        api = client.view_api(print_info=False, return_format="dict")
        assert "/train" in api["named_endpoints"] and "/stop" in api["named_endpoints"]


@pytest.mark.slow
@pytest.mark.browser
def test_browser_train_stop_reload(tmp_path):
    """Open every tab; train 6 updates from the form and see the loss plot fill and the embedding appear;
    start a long run, reload the page mid-run and find it; press Stop and see it saved and resumable."""
    from playwright.sync_api import expect
    outputs = tmp_path / "outputs"
    shots = tmp_path / "shots"
    shots.mkdir()
    with app_server(outputs) as url, chromium_page() as page:
        page.goto(url)
        for tab in ("Calculator", "LR finder", "Grid", "Guide", "Train"):
            page.get_by_role("tab", name=tab).click()
            page.screenshot(path=str(shots / f"tab-{tab}.png"))
            if tab == "Guide":   # the science the tool is built on, on the page (it was a file users never had)
                expect(page.locator("#guide")).to_contain_text("Range test")
                expect(page.locator("#guide")).to_contain_text("Steps and GA")
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('images')")
        assert page.locator("#stop-button").is_disabled() and page.locator("#resume-button").is_disabled()
        # An invalid form is named beside its fields and cannot start a job (it used to crash after starting).
        page.get_by_label("Embedding name").fill("star")
        page.get_by_label("Batch size", exact=True).fill("13")
        page.get_by_label("Batch size", exact=True).press("Tab")
        expect(page.locator("#check-name")).to_contain_text("already a word", timeout=20_000)
        expect(page.locator("#check-plan")).to_contain_text("larger than the 12 training images")
        expect(page.locator("#train-button")).to_be_disabled()
        page.get_by_label("Batch size", exact=True).fill("4")
        page.get_by_label("Embedding name").fill("firststar")
        page.get_by_label("Max steps").fill("6")
        page.get_by_label("Max steps").press("Tab")
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('6 weight updates')")
        expect(page.locator("#train-button")).to_be_enabled()
        assert page.inner_text("#check-name").strip() == "" and page.inner_text("#check-plan").strip() == ""
        page.get_by_text("Validation, saving, previews, seed").click()
        page.get_by_label("Preview every (updates)").fill("3")
        page.get_by_label("Preview every (updates)").press("Tab")
        page.wait_for_timeout(1500)
        page.click("#train-button")
        page.wait_for_function("(document.querySelector('#progress') || {innerText: ''}).innerText.includes('Finished')", timeout=400_000)
        page.wait_for_timeout(2500)   # the plots' last refresh
        page.screenshot(path=str(shots / "finished.png"), full_page=True)
        assert [p.name for p in outputs.iterdir() if not p.name.startswith(".")] == [run.name for run in
                                                                                    outputs.glob("firststar-*")]
        run = next(p for p in outputs.iterdir() if p.name.startswith("firststar-"))
        assert (run / "firststar.safetensors").is_file()
        rows = (run / "log.csv").read_text().strip().splitlines()
        assert len(rows) == 7  # header + 6 updates
        assert "firststar\n.safetensors" in page.inner_text("#run-files")
        # What the plots draw on a fresh server's first run: numeric axes and lines (they used to read every
        # value as a category, "a discrete scale with N values", and draw no line).
        for plot, series in (("#loss-plot", "loss (smoothed 0.9)"), ("#lr-plot", "lr")):
            axes = page.eval_on_selector_all(f"{plot} [aria-label*='-axis']", "els => els.map(e => e.getAttribute('aria-label'))")
            assert len(axes) == 2 and all("linear scale" in a for a in axes), axes
            strokes = page.eval_on_selector_all(f"{plot} g.mark-line path", "els => els.map(e => e.getAttribute('stroke'))")
            assert strokes and all(strokes), strokes   # a line without a colour is not drawn
            marks = page.eval_on_selector_all(f"{plot} [aria-label*='series']", "els => els.map(e => e.getAttribute('aria-label'))")
            assert any(f"series: {series}" in m for m in marks), marks[:5]
        # previews carry their update, prompt and seed, as A1111 shows them
        captions = page.locator("#previews").inner_text()
        assert "update 6 · a photo of firststar · seed 0" in captions, captions
        assert "update 3" in captions

        # A long run: reload mid-run, find it again, stop it.
        page.get_by_label("Embedding name").fill("secondstar")
        page.get_by_label("Max steps").fill("5000")
        page.get_by_label("Max steps").press("Tab")
        page.click("#train-button")
        page.wait_for_function("/Training: secondstar[\\s\\S]*update [1-9]/.test((document.querySelector('#progress') "
                               "|| {innerText: ''}).innerText)", timeout=180_000)
        page.reload()
        page.wait_for_function("(document.querySelector('#progress') || {innerText: ''}).innerText.includes('Training: secondstar')",
                               timeout=30_000)
        page.screenshot(path=str(shots / "after-reload.png"), full_page=True)
        assert page.locator("#train-button").is_disabled()  # one job at a time
        # the reopened form shows the running job's settings, not the defaults
        name_box, deadline = page.get_by_label("Embedding name"), time.time() + 30
        while name_box.input_value() != "secondstar" and time.time() < deadline:
            time.sleep(0.25)
        assert name_box.input_value() == "secondstar"
        assert page.get_by_label("Max steps").input_value() == "5000"
        expect(page.locator("#stop-button")).to_be_enabled()
        page.click("#stop-button")
        page.wait_for_function("(document.querySelector('#progress') || {innerText: ''}).innerText.includes('Stopped')", timeout=240_000)
        page.screenshot(path=str(shots / "stopped.png"), full_page=True)
        expect(page.locator("#progress")).to_contain_text("Press Resume to continue")
        assert "--resume" not in page.inner_text("#progress") and "stopping" not in page.inner_text("#train-message")
        expect(page.locator("#resume-button")).to_be_enabled()
        expect(page.locator("#stop-button")).to_be_disabled()
        page.get_by_text("Run history").click()   # refreshed by itself: no Refresh click
        expect(page.locator("#history")).to_contain_text("stopped", timeout=10_000)
    run2 = next(p for p in outputs.iterdir() if p.name.startswith("secondstar-"))
    assert (run2 / "secondstar.safetensors").is_file() and (run2 / "resume.pt").is_file()
    from safetensors import safe_open
    with safe_open(str(run2 / "secondstar.safetensors"), "pt") as f:
        assert f.metadata()["status"] == "stopped"


@pytest.mark.slow
def test_one_job_at_a_time(tmp_path, images):
    """A second start while a job runs is refused with a message naming the running job; stop ends it."""
    from embedtrain.config import TrainConfig
    from embedtrain.ui.jobs import JobError, JobManager
    jobs = JobManager(tmp_path / "outputs")
    cfg = TrainConfig(model="tiny", data=str(images), name="longrun", init_text="circle", steps=100000,
                      template="object", resolution=32)
    run = jobs.start(cfg)
    try:
        with pytest.raises(JobError, match=r"a training job is already running \(longrun"):
            jobs.start(cfg.replace(name="other"))
        _wait(lambda: jobs.status().update > 0, 120, "the first update")
    finally:
        jobs.stop()
        jobs.wait(90)
        _kill_job(tmp_path / "outputs")
    st = jobs.status(str(run))
    assert st.state == "stopped" and (run / "longrun.safetensors").is_file()


@pytest.mark.slow
def test_stop_pressed_while_the_job_starts_is_not_lost(tmp_path, images):
    """Stop clicked before the job process has even imported torch: the run still stops (and saves)."""
    from embedtrain.config import TrainConfig
    from embedtrain.ui.jobs import JobManager
    jobs = JobManager(tmp_path / "outputs")
    run = jobs.start(TrainConfig(model="tiny", data=str(images), name="quickstop", init_text="circle",
                                 steps=100000, template="object", resolution=32))
    try:
        assert "stopping quickstop" in jobs.stop()
        jobs.wait(180)
    finally:
        _kill_job(tmp_path / "outputs")
    st = jobs.status(str(run))
    assert st.state == "stopped" and st.update < 100, (st.state, st.update, st.message)
    assert (run / "quickstop.safetensors").is_file() and not (run / "STOP").exists()


def test_run_reader_follows_appends_partial_lines_and_rewrites(tmp_path):
    """read_run parses only what was appended since the last read, waits for a line being written,
    and starts over when log.csv is rewritten (a resume)."""
    from embedtrain.ui.jobs import read_run
    from embedtrain.ui.train_tab import plot_frames
    run = tmp_path / "star-1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "star"}))
    ev, log = run / "events.jsonl", run / "log.csv"
    ev.write_text(json.dumps({"event": "start", "summary": "s", "weight_updates": 5000}) + "\n")
    log.write_text("update,loss,val_loss,lr\n1,0.5,,0.01\n")
    st = read_run(run)
    assert (st.name, st.weight_updates, len(st.rows), st.state) == ("star", 5000, 1, "running")
    with open(ev, "a") as fh:
        fh.write(json.dumps({"event": "update", "update": 2, "loss": 0.4}) + "\n" + '{"event": "upd')
    with open(log, "a") as fh:
        fh.write("2,0.4,0.45,0.01\n3,0.3")
    st = read_run(run)
    assert st.update == 2 and [r["update"] for r in st.rows] == ["1", "2"] and st.rows[1]["val_loss"] == "0.45"
    with open(ev, "a") as fh:
        fh.write('ate", "update": 3, "loss": 0.3}\n' + json.dumps({"event": "stopped", "message": "m"}) + "\n")
    with open(log, "a") as fh:
        fh.write(",,0.01\n")
    st = read_run(run)
    assert (st.update, st.state, [r["update"] for r in st.rows]) == (3, "stopped", ["1", "2", "3"])
    log.write_text("update,loss,val_loss,lr\n1,0.5,,0.01\n")   # a resume rewrites log.csv up to its point
    with open(ev, "a") as fh:
        fh.write(json.dumps({"event": "start", "summary": "s", "weight_updates": 5000}) + "\n")
    st = read_run(run)
    assert (st.state, st.message, [r["update"] for r in st.rows]) == ("running", "", ["1"])

    rows = [{"update": str(u), "loss": "0.1", "val_loss": "0.2" if u == 1234 else "", "lr": "0.01"}
            for u in range(1, 5001)]
    loss, lr = plot_frames(rows)
    assert len(lr) <= 610 and lr["update"].iloc[-1] == 5000
    assert ((loss["series"] == "validation loss") & (loss["update"] == 1234)).sum() == 1


def test_api_names_its_endpoints_parameters_and_outputs(tmp_path):
    """The API offers the endpoints people call, by name, with named parameters and outputs; the page's
    internal events (live form checks, refreshes) are private (they were fifteen /refresh_derived_N)."""
    from embedtrain.ui.app import build_app
    from embedtrain.ui.context import UIContext
    from embedtrain.ui.train_tab import FIELDS
    info = build_app(UIContext(outputs=tmp_path / "outputs")).get_api_info()
    named = info["named_endpoints"]
    assert set(named) == {"/train", "/stop", "/resume", "/status", "/load_model", "/grid", "/grid_stop", "/study",
                          "/grid_embeddings", "/grid_use_settings"}, sorted(named)
    assert not info.get("unnamed_endpoints")
    assert [p["parameter_name"] for p in named["/train"]["parameters"]] == FIELDS
    # SDXL's fields, then the recipe's, reach /train too, last (callers passing the older ones by position keep
    # working)
    assert FIELDS[-10:] == ["init_embedding", "train_encoders", "shuffle_tags", "keep_tokens", "tag_dropout",
                            "caption_dropout", "noise_offset", "min_snr_gamma", "report_to", "save_formats"]
    assert FIELDS.index("train_encoders") == 38 and "resolution" in FIELDS
    train = {p["parameter_name"]: p for p in named["/train"]["parameters"]}
    assert train["save_formats"]["parameter_default"] == ["safetensors"]
    assert train["report_to"]["parameter_default"] == "none" and train["keep_tokens"]["parameter_default"] == 0
    for name, ep in named.items():
        params = [p["parameter_name"] for p in ep["parameters"]]
        labels = [r["label"] for r in ep["returns"]]
        assert not any(p.startswith("param_") for p in params), (name, params)
        assert not any(str(lb).startswith("value_") for lb in labels), (name, labels)


def test_every_schedule_field_reaches_the_run_from_the_form(ctx):
    """exp_range without gamma behaved as triangular, polynomial without a power as linear: the form now
    carries every schedule field, and the preview draws what the run will use."""
    from embedtrain.ui.train_tab import schedule_frame
    flat, _ = schedule_frame(ctx, form(ctx, lr_schedule="exp_range", lr_step_size=5, steps=40))
    decayed, desc = schedule_frame(ctx, form(ctx, lr_schedule="exp_range", lr_step_size=5, steps=40, lr_gamma=0.9))
    assert not desc.startswith("Error") and decayed["lr"].max() < flat["lr"].max()
    lin, _ = schedule_frame(ctx, form(ctx, lr_schedule="polynomial", steps=40))
    quad, _ = schedule_frame(ctx, form(ctx, lr_schedule="polynomial", steps=40, lr_power=2.0))
    assert quad["lr"].iloc[20] < lin["lr"].iloc[20]
    stepped, desc = schedule_frame(ctx, form(ctx, lr_schedule="triangular", lr_step_size=2, steps=26,
                                             lr_cycle_decay="3,2,1.5", lr_decay_factor=0.5))
    assert not desc.startswith("Error"), desc
    assert stepped["lr"].iloc[-8:].max() < stepped["lr"].max()


def test_recipe_fields_reach_the_config_and_the_checks(ctx):
    """The Captions, loss and outputs accordion: the checkboxes' list and the API's text both give save_formats
    as the config's comma list, 'none' is no report; a bad value is named by the form checks."""
    from embedtrain.config import TrainConfig
    from embedtrain.ui.train_tab import FIELDS, form_checks, form_config, form_values
    values = form(ctx, shuffle_tags=True, keep_tokens=1, tag_dropout=0.1, caption_dropout=0.05, noise_offset=0.05,
                  min_snr_gamma=5, report_to="tensorboard", save_formats=["safetensors", "png"])
    cfg = form_config(ctx, values)
    assert (cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_dropout, cfg.caption_dropout, cfg.noise_offset,
            cfg.min_snr_gamma, cfg.report_to, cfg.save_formats) == (True, 1, 0.1, 0.05, 0.05, 5.0, "tensorboard",
                                                                    "safetensors,png")
    shown = dict(zip(FIELDS, form_values(cfg)))
    assert shown["save_formats"] == ["safetensors", "png"] and shown["report_to"] == "tensorboard"
    assert dict(zip(FIELDS, form_values(TrainConfig(name="x", data="d"))))["report_to"] == "none"
    assert form_config(ctx, form(ctx, save_formats="a1111, png", report_to="none")).save_formats == "a1111, png"
    assert form_config(ctx, form(ctx, report_to="none")).report_to == ""
    for bad, field in ((dict(tag_dropout=1.5), "tag_dropout"), (dict(save_formats=[]), "save_formats"),
                       (dict(min_snr_gamma=-1), "min_snr_gamma"), (dict(keep_tokens=-2), "keep_tokens")):
        slots, names = form_checks(ctx, form(ctx, **bad), {})
        assert names == [field], (bad, slots)
