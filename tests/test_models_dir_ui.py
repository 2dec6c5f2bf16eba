"""The web UI's --models-dir (issue 19, A1111 folder convention): an A1111 install's checkpoints in the model
dropdowns with their architecture, its embeddings in the Grid tab, the folder readable by the page; and a run
with the recipe options (issue 23) set from the page."""

import json
import subprocess
import sys

import pytest

from test_library import LORA, SDXL, embedding, fake_header
from uihelp import ROOT, app_server, chromium_page


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """A fake A1111 install: a header-only SDXL base file, a tiny SD diffusers folder (loads without
    --model-config), a stray LoRA, and an embedding in DIR/embeddings."""
    from embedtrain.demo.model import build_pipeline
    root = tmp_path_factory.mktemp("models") / "stable-diffusion-webui"
    ckpts = root / "models" / "Stable-diffusion"
    fake_header(ckpts / "sd_xl_base_1.0.safetensors", SDXL)
    fake_header(ckpts / "stray_lora.safetensors", LORA)
    build_pipeline("tiny").save_pretrained(ckpts / "tiny_diffusers")
    embedding(root / "embeddings" / "goodstyle.safetensors", 32)
    return root


def test_models_dir_is_readable_and_its_embeddings_reach_the_grid(webui, tmp_path):
    from embedtrain.ui.context import NotAllowed, UIContext
    from embedtrain.ui.grid_tab import grid_command, grid_embedding_choices
    ctx = UIContext(outputs=tmp_path / "outputs", models_dirs=[str(webui)])
    assert ctx.allowed_folder(webui / "models" / "Stable-diffusion" / "tiny_diffusers")
    assert ("stable-diffusion-webui/embeddings/goodstyle.safetensors",
            str(webui / "embeddings" / "goodstyle.safetensors")) in grid_embedding_choices(ctx)
    choices = dict((v, k) for k, v in ctx.model_choices())
    assert choices["demo"] == "demo"
    assert choices[str(webui / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors")] == "sd_xl_base_1.0 · SDXL"
    argv, _ = grid_command(ctx, {"model": "demo", "picked": [str(webui / "embeddings" / "goodstyle.safetensors")],
                                 "prompts": "a photo of {}", "seeds": "1", "sample_steps": 2, "cfg_scale": 5})
    assert str(webui / "embeddings" / "goodstyle.safetensors") in argv
    # only its embeddings folders: a file elsewhere in the install is not a grid embedding
    with pytest.raises(ValueError, match="outside the outputs folder"):
        grid_command(ctx, {"model": "demo", "picked": [str(webui / "models" / "Stable-diffusion" /
                                                           "stray_lora.safetensors")],
                           "prompts": "a photo of {}", "seeds": "1", "sample_steps": 2, "cfg_scale": 5})
    # without --models-dir the install is neither listed nor readable
    plain = UIContext(outputs=tmp_path / "outputs")
    assert plain.model_library() is None and plain.model_choices() == [("demo", "demo")]
    with pytest.raises(NotAllowed):
        plain.allowed_folder(webui / "embeddings")


def test_a_ckpt_is_read_off_the_serving_path(tmp_path):
    """The page's first listing does not open a .ckpt (that takes torch); a background read fills the
    library's cache, and the next listing (a page load) shows its architecture."""
    import time

    import torch

    from embedtrain.ui.context import UIContext
    from test_library import SD15
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"state_dict": {k: torch.zeros(s) for k, s in SD15.items()}}, folder / "old.ckpt")
    ctx = UIContext(outputs=tmp_path / "outputs", models_dirs=[str(folder)])
    assert ctx.model_choices()[-1] == ("old.ckpt · architecture not read yet (reload the page)", str(folder / "old.ckpt"))
    deadline = time.time() + 30
    while ctx.model_choices()[-1][0] != "old · SD 1.x" and time.time() < deadline:
        time.sleep(0.1)
    assert ctx.model_choices()[-1] == ("old · SD 1.x", str(folder / "old.ckpt"))


def test_models_dir_must_be_a_folder(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--models-dir", str(tmp_path / "nope"), "--outputs",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--models-dir" in r.stderr and "is not a folder" in r.stderr


@pytest.mark.slow
@pytest.mark.browser
def test_browser_models_dir_dropdowns(webui, tmp_path):
    """The Train tab's model dropdown lists the install's checkpoints with their architecture (and says what it
    skipped); picking the diffusers folder and pressing Load loads it; the Grid tab offers DIR/embeddings."""
    from playwright.sync_api import expect
    with app_server(tmp_path / "outputs", "--models-dir", str(webui)) as url, chromium_page() as page:
        page.goto(url)
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('images')")
        expect(page.locator("#train-model")).to_contain_text("skipped 1: stray_lora.safetensors (a LoRA, not a model)")
        page.locator("#train-model input").click()
        expect(page.get_by_role("option", name="sd_xl_base_1.0 · SDXL")).to_be_visible()
        expect(page.get_by_role("option", name="demo", exact=True)).to_be_visible()
        page.get_by_role("option", name="tiny_diffusers · SD · diffusers").click()
        page.get_by_role("button", name="Load", exact=True).click()
        expect(page.locator("#model-info")).to_contain_text("Loaded tiny_diffusers", timeout=90_000)
        page.screenshot(path=str(tmp_path / "models-dir-train.png"), full_page=True)
        page.get_by_role("tab", name="Grid").click()
        expect(page.locator("#grid-embeddings")).to_contain_text("stable-diffusion-webui/embeddings/goodstyle"
                                                                 ".safetensors")
        page.locator("#grid-model input").click()
        expect(page.get_by_role("option", name="sd_xl_base_1.0 · SDXL")).to_be_visible()


@pytest.mark.slow
@pytest.mark.browser
def test_browser_recipe_options_reach_the_run(tmp_path):
    """Shuffle tags, keep tokens 1 and save formats with png, set on the page, are the run's settings, and
    NAME.png (A1111's embedding card) is written."""
    from playwright.sync_api import expect
    from conftest import make_images
    data = make_images(tmp_path / "data", 4)
    for i, txt in enumerate(sorted(data.glob("*.txt"))):
        txt.write_text(f"disc, red background, shape {i}")
    outputs = tmp_path / "outputs"
    with app_server(outputs, "--model", "tiny", "--data", str(data)) as url, chromium_page() as page:
        page.goto(url)
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('images')")
        page.get_by_label("Embedding name").fill("recipestar")
        page.get_by_label("Batch size", exact=True).fill("2")
        page.get_by_label("Max steps").fill("2")
        page.get_by_label("Prompt template").fill("object_filewords")
        page.get_by_label("Prompt template").press("Enter")
        page.get_by_text("Captions, loss and outputs").click()
        page.get_by_label("Shuffle tags").check()
        page.get_by_label("Keep tokens (tags)").fill("1")
        page.locator("#save-formats").get_by_label("png").check()
        page.get_by_label("Keep tokens (tags)").press("Tab")
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('2 weight updates')",
                               timeout=20_000)
        expect(page.locator("#train-button")).to_be_enabled()
        page.wait_for_timeout(1000)
        page.click("#train-button")
        page.wait_for_function("/Finished|Failed|Crashed/.test((document.querySelector('#progress') || "
                               "{innerText: ''}).innerText)", timeout=300_000)
        progress = page.inner_text("#progress")
        assert "Finished: recipestar" in progress, progress
    run = next(p for p in outputs.iterdir() if p.name.startswith("recipestar-"))
    config = json.loads((run / "config.json").read_text())
    assert (config["shuffle_tags"], config["keep_tokens"], config["template"]) == (True, 1, "object_filewords")
    assert config["save_formats"].split(",") == ["safetensors", "png"]
    assert (run / "recipestar.png").is_file() and (run / "recipestar.safetensors").is_file()
    from embedtrain.fileio import is_embedding_file
    assert is_embedding_file(run / "recipestar.png")
