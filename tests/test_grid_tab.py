"""Grid tab: its pure helpers (what it offers, the command it runs, the errors), and one real browser
session that renders a grid of two runs' embeddings on the tiny model, shows a clear error for an
incompatible embedding, and sends a run's settings to the Train tab."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from embedtrain.config import TrainConfig
from embedtrain.embedding import save_embedding
from embedtrain.grid import GridError

META = {"batch_size": 3, "grad_accum": 2, "step": 7, "step_unit": "update", "updates": 7, "epochs": "5.2500",
        "lr": 0.004, "init_text": "star"}


def make_outputs(root, data):
    """An outputs folder with two finished runs (tiny-model embeddings), a resume state and a foreign file."""
    out = root / "outputs"
    g = torch.Generator().manual_seed(0)
    save_embedding(out / "alpha-run" / "alpha.safetensors", torch.randn(1, 32, generator=g), "alpha", META)
    TrainConfig(model="tiny", data=str(data), name="alpha", batch_size=3, grad_accum=2, steps=7, lr=0.004,
                init_text="star", out=str(out)).save(out / "alpha-run" / "config.json")
    time.sleep(0.02)
    save_embedding(out / "beta-run" / "beta.safetensors", 2 * torch.randn(2, 32, generator=g), "beta",
                   dict(META, batch_size=6, grad_accum=1))
    (out / "beta-run" / "resume.pt").write_bytes(b"x")
    save_embedding(out / "sd1" / "wide.safetensors", torch.randn(1, 768, generator=g), "wide")
    return out


def test_helpers_offer_outputs_files_and_build_checked_commands(tmp_path, images):
    from embedtrain.ui.context import UIContext
    from embedtrain.ui.grid_tab import embedding_choices, grid_command, settings_of, study_command
    out = make_outputs(tmp_path, images)
    ctx = UIContext(outputs=out, model="tiny", data=str(images))
    choices = embedding_choices(out)
    assert set(choices) == {"alpha-run/alpha.safetensors", "beta-run/beta.safetensors", "sd1/wide.safetensors"}
    v = {"model": "tiny", "picked": ["alpha-run/alpha.safetensors"], "extra": "beta-run/beta.safetensors",
         "prompts": "a photo of {}\n\n a {} on a green background ", "seeds": "1, 3-4", "sample_steps": 2,
         "cfg_scale": 5, "sampler": "euler_a", "baseline": "this text", "baseline_text": "star", "legend": True}
    argv, png = grid_command(ctx, v)
    assert argv[:4] == ["grid", "--embeddings", str(out / "alpha-run/alpha.safetensors"),
                        str(out / "beta-run/beta.safetensors")]
    assert argv[argv.index("--prompts") + 1:argv.index("--seeds")] == ["a photo of {}", "a {} on a green background"]
    assert argv[argv.index("--seeds") + 1:argv.index("--sample-steps")] == ["1", "3", "4"]
    assert "--baseline=star" in argv and png.parent == out / "grids"
    for bad, field in [({"extra": str(tmp_path / "elsewhere.pt")}, "outside the outputs folder"),
                       ({"extra": "beta-run/gone.safetensors"}, "gone.safetensors does not exist"),
                       ({"prompts": "a photo"}, "placeholder"), ({"seeds": "one"}, "seeds"),
                       ({"sample_steps": 0}, "sample_steps"), ({"baseline_text": ""}, "baseline_text")]:
        with pytest.raises((GridError, ValueError), match=field):
            grid_command(ctx, dict(v, **bad))
    with pytest.raises(GridError, match="embeddings"):
        grid_command(ctx, dict(v, picked=[], extra="", baseline="none"))

    sent = settings_of(ctx, ["alpha-run/alpha.safetensors"])
    assert (sent["batch_size"], sent["grad_accum"], sent["steps"], sent["lr"]) == (3, 2, 7, "0.004")
    with pytest.raises(GridError, match="no config.json"):
        settings_of(ctx, ["beta-run/beta.safetensors"])

    sargv, folder = study_command(ctx, {"data": str(images), "name": "zorb", "low": "13,2", "high": "3 x 17",
                                        "low_steps": 150, "high_steps": 3000.0, "step_unit": "batch", "lr": "",
                                        "seed": 2}, dict(v, baseline="none"))
    assert sargv[:2] == ["study", "--model"] and folder.parent == out
    assert sargv[sargv.index("--high") + 1] == "3,17" and sargv[sargv.index("--high-steps") + 1] == "3000"
    assert "--lr" not in sargv and "--baseline=none" in sargv and "--seed" in sargv
    with pytest.raises(GridError, match="low must be BATCH_SIZE,GRAD_ACCUM"):
        study_command(ctx, {"data": str(images), "low": "13", "high": "3,17"}, v)


def test_choices_include_embedding_pngs_and_the_diffusers_file_but_not_previews_grids_or_models(tmp_path):
    import base64

    from PIL.PngImagePlugin import PngInfo

    from embedtrain.embedding import embedding_file
    from embedtrain.ui.grid_tab import embedding_choices
    out = tmp_path / "outputs"
    vec = torch.ones(1, 32)
    for fmt in ("safetensors", "a1111", "diffusers"):
        save_embedding(embedding_file(out / "zorb-run", "zorb", fmt), vec, "zorb", fmt=fmt)
    (out / "zorb-run" / "previews").mkdir()
    preview = PngInfo()
    preview.add_text("parameters", "a photo of zorb\nSteps: 20")
    Image.new("RGB", (16, 16)).save(out / "zorb-run" / "previews" / "zorb-2.png", pnginfo=preview)
    (out / "grids").mkdir()
    Image.new("RGB", (16, 16)).save(out / "grids" / "grid-1.png")
    card = PngInfo()   # an AUTOMATIC1111 embedding card dropped into outputs
    card.add_text("sd-ti-embedding", base64.b64encode(json.dumps(
        {"string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}}, "name": "card"}).encode()).decode())
    (out / "cards").mkdir()
    Image.new("RGB", (16, 16)).save(out / "cards" / "card.png", pnginfo=card)
    with open(out / "cards" / "model.safetensors", "wb") as fh:   # too big for an embedding: not offered
        fh.truncate(65 * 2 ** 20)
    assert set(embedding_choices(out)) == {"zorb-run/zorb.safetensors", "zorb-run/zorb.pt",
                                          "zorb-run/diffusers/zorb.safetensors", "cards/card.png"}


@pytest.mark.browser
@pytest.mark.slow
def test_grid_tab_renders_shows_errors_and_sends_settings(tmp_path, images):
    from uihelp import app_server, chromium_page
    out = make_outputs(tmp_path, images)
    with app_server(out, "--model", "tiny", "--data", str(images)) as url, chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Grid").click()
        tab = page.locator("#tab-grid")
        boxes = tab.locator("#grid-embeddings")
        # the page's on-load refresh must not undo the ticks below: wait for the page's load events (the Train
        # tab's derived line is written by one of them) and then a moment (the page polls every second, so
        # the network is never idle)
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('images')")
        boxes.get_by_label("alpha-run/alpha.safetensors").wait_for()
        page.wait_for_timeout(2000)
        boxes.get_by_label("alpha-run/alpha.safetensors").check()
        boxes.get_by_label("beta-run/beta.safetensors").check()
        tab.get_by_label("Prompts (one per line)").fill("a photo of {}")
        tab.get_by_label("Seeds").fill("1 2")
        tab.get_by_label("Sampling steps").fill("2")
        tab.locator("#grid-baseline").get_by_label("init text").check()
        tab.locator("#grid-render").click()
        status = tab.locator("#grid-status")
        status.get_by_text("Wrote").wait_for(timeout=180_000)
        tab.locator("#grid-image img").wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "grid-tab.png"), full_page=True)
        assert boxes.get_by_label("alpha-run/alpha.safetensors").is_checked()

        grids = sorted((out / "grids").glob("*.png"))
        assert len(grids) == 1
        grid = Image.open(grids[0])
        assert 'X Values: "alpha, beta, baseline: star"' in grid.text["parameters"]
        spec = json.loads(grid.text["embedtrain"])
        assert spec["settings"]["seeds"] == [1, 2] and spec["settings"]["sample_steps"] == 2
        assert len(list(grids[0].with_suffix("").glob("*.png"))) == 2 * 3
        assert grids[0].stem in tab.locator("#grid-file").inner_text()   # offered for download

        # a second render in the same page session (it used to stay pending behind the first one's
        # process teardown): an embedding made for another model family is a clear error naming the file
        tab.get_by_label("More embedding files").fill("sd1/wide.safetensors")
        tab.locator("#grid-render").click()
        try:
            status.get_by_text("Error").wait_for(timeout=60_000)
        finally:
            page.screenshot(path=str(tmp_path / "grid-error.png"), full_page=True)
        text = status.inner_text()
        assert "wide.safetensors" in text and "768" in text and "32" in text, text

        # ... and a third one, fixed, renders again without a reload
        tab.get_by_label("More embedding files").fill("")
        tab.locator("#grid-render").click()
        status.get_by_text("Wrote").wait_for(timeout=180_000)
        assert len(list((out / "grids").glob("*.png"))) == 2

        # the first picked run's settings go to the Train tab
        boxes.get_by_label("alpha-run/alpha.safetensors").check()
        tab.locator("#grid-use").click()
        train = page.locator("#tab-train")
        train.get_by_label(re.compile(r"^Batch size")).wait_for(state="visible", timeout=15_000)
        assert train.get_by_label(re.compile(r"^Batch size")).input_value() == "3"
        assert train.get_by_label(re.compile(r"^Gradient accumulation steps")).input_value() == "2"


@pytest.mark.slow
def test_a_grid_outlives_its_server_and_a_new_one_finds_it(tmp_path, images):
    """The grid process ran on a pipe held by the web server: a restart killed it and no page could find
    it. Now it writes its events to a file in its own session; a new server's Runner follows it to its
    result, and a second render is refused meanwhile (one job at a time)."""
    from embedtrain.ui.context import UIContext
    from embedtrain.ui.grid_tab import Runner, grid_command
    from embedtrain.ui.jobs import JobSlot
    out = make_outputs(tmp_path, images)
    ctx = UIContext(outputs=out, model="tiny", data=str(images))
    argv, png = grid_command(ctx, {"model": "tiny", "picked": ["alpha-run/alpha.safetensors"], "extra": "",
                                   "prompts": "a photo of {}\na {} on a red background", "seeds": "1-12",
                                   "sample_steps": 4, "cfg_scale": 5, "sampler": "default", "baseline": "none"})
    first = Runner(out)
    events = first.stream(argv)
    assert next(events)["event"] in ("progress", "done")   # it runs
    events.close()          # the page and its server go away; the process does not
    first.proc = None
    later = Runner(out)     # a restarted server
    deadline, seen_running = time.time() + 240, False
    while time.time() < deadline:
        view = later.job_view()
        if view["state"] == "running":
            seen_running = True
            with pytest.raises(Exception, match="already running"):
                list(later.stream(argv))
        if view["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert view["state"] == "done", view
    assert Path(view["event"]["grid"]) == png and png.is_file()
    assert seen_running or JobSlot(out).running() is None


@pytest.mark.browser
@pytest.mark.slow
def test_a_study_survives_a_server_restart_and_the_new_page_follows_it(tmp_path, images):
    """Run study from the page, restart the server while the study trains, open the page again: it shows the
    study running (the Job record and events file, not the old server's memory), then its result."""
    from uihelp import app_server, chromium_page
    out = make_outputs(tmp_path, images)
    events = out / "grids" / ".job-events.jsonl"
    with app_server(out, "--model", "tiny", "--data", str(images)) as url, chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Grid").click()
        tab = page.locator("#tab-grid")
        tab.get_by_label("Sampling steps").fill("2")
        tab.get_by_label("Seeds").fill("1")
        tab.locator("#grid-study").click()   # open the accordion
        study = tab.locator("#grid-study")
        study.get_by_label("Init text").fill("circle")
        study.get_by_label("Setting 1: BS,GA").fill("2,2")
        study.get_by_label("Setting 2: BS,GA").fill("1,4")
        study.get_by_label("Low steps").fill("8")
        study.get_by_label("High steps").fill("800")
        tab.locator("#grid-study-run").click()
        deadline = time.time() + 120
        while time.time() < deadline and '"progress"' not in (events.read_text() if events.is_file() else ""):
            time.sleep(0.2)
        assert '"progress"' in events.read_text(), (out / "grids" / ".last-render.log").read_text()[-2000:]
    # the first server is gone; the study's process is not
    job = json.loads((out / "grids" / ".job.json").read_text())
    assert job["argv"][0] == "study"
    with app_server(out, "--model", "tiny", "--data", str(images)) as url, chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Grid").click()
        status = page.locator("#tab-grid #grid-status")
        status.get_by_text("A study is running").wait_for(timeout=60_000)
        status.get_by_text("Study written to").wait_for(timeout=300_000)
        page.locator("#tab-grid #grid-image img").wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "study-after-restart.png"), full_page=True)
    folders = sorted(out.glob("study-*"))
    assert len(folders) == 1 and (folders[0] / "study.csv").is_file()
