"""SDXL in the web UI: the preflight checks that need the model's family (read from its configs, no weights),
the Train tab's new fields, and a real Chromium session that trains a tiny SDXL folder from the page."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_images
from embedtrain.config import TrainConfig
from embedtrain.embedding import save_embedding

from conftest import XL_WIDTHS

L, G = XL_WIDTHS


@pytest.fixture
def files(tmp_path):
    """Start embeddings of each kind: SD (tiny's width), SDXL (the tiny SDXL's widths), SDXL of other widths."""
    out = tmp_path / "embeddings"
    out.mkdir()
    sd = save_embedding(out / "sdstar.safetensors", torch.randn(2, L), "sdstar")
    xl = save_embedding(out / "xlstar.safetensors", {"clip_l": torch.randn(3, L), "clip_g": torch.randn(3, G)}, "xlstar")
    big = save_embedding(out / "bigxl.safetensors", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)},
                         "bigxl")
    junk = out / "junk.safetensors"
    junk.write_bytes(b"not an embedding at all")
    return dict(sd=str(sd), xl=str(xl), big=str(big), junk=str(junk))


def cfg_for(model, data, **kw) -> TrainConfig:
    return TrainConfig(**{"model": str(model), "data": str(data), "name": "zorblat", "init_text": "circle",
                          "steps": 4, "template": "object", **kw})


def test_the_family_is_read_from_the_configs_without_loading(xl_folder, tmp_path):
    from embedtrain.preflight import model_kind
    kind = model_kind(str(xl_folder))
    assert (kind.name, kind.family, kind.dims, kind.label) == ("tiny-sdxl", "SDXL", (L, G), "SDXL")
    assert (model_kind("tiny-xl").family, model_kind("tiny-xl").dims) == ("SDXL", (L, G))
    assert (model_kind("tiny").family, model_kind("tiny").label) == ("SD", "SD")
    assert model_kind("demo").family == "SD"
    # an SDXL folder whose model_index.json names another class still counts by its text_encoder_2
    other = tmp_path / "renamed"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (other / "text_encoder").mkdir()
    (other / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 768}))
    assert (model_kind(str(other)).family, model_kind(str(other)).label) == ("SD", "SD 1.x")
    (other / "text_encoder_2").mkdir()
    (other / "text_encoder_2" / "config.json").write_text(json.dumps({"hidden_size": 1280}))
    assert (model_kind(str(other)).family, model_kind(str(other)).dims) == ("SDXL", (768, 1280))
    # what only a load can tell: a single file, an uncached hub id, another kind of pipeline
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert model_kind(str(ckpt)) is model_kind("someorg/notcached") is model_kind(str(other)) is None


def test_family_problems_are_named_beside_their_fields(xl_folder, files, tmp_path):
    """Each problem a slow load would end in is found from the configs, one line naming its field."""
    from embedtrain.preflight import check_run
    data = make_images(tmp_path / "data", 4, size=40)

    def problems(model, **kw):
        return [(p.field, p.message) for p in check_run(cfg_for(model, data, **kw))]

    assert problems(xl_folder) == []
    assert problems(xl_folder, init_embedding=files["xl"], train_encoders="clip_g") == []
    assert problems("tiny-xl", init_embedding=files["xl"], train_encoders="clip_l") == []
    assert problems("tiny", init_embedding=files["sd"]) == []

    [(field, msg)] = problems(xl_folder, init_embedding=files["sd"])
    assert field == "init_embedding" and msg.startswith("init_embedding sdstar.safetensors is an SD-style embedding "
                                                        f"(one vector set, {L} wide); model tiny-sdxl is SDXL")
    assert "leave init_embedding empty" in msg and "\n" not in msg
    [(field, msg)] = problems("tiny", init_embedding=files["xl"])
    assert field == "init_embedding" and "is an SDXL embedding (clip_l + clip_g); model tiny is SD" in msg
    [(field, msg)] = problems(xl_folder, init_embedding=files["big"])
    assert field == "init_embedding"
    assert "has vectors clip_l [1, 768] + clip_g [1, 1280]; model tiny-sdxl (SDXL) needs clip_l [1, 32] + clip_g [1, 48]" in msg
    [(field, msg)] = problems(xl_folder, init_embedding=files["junk"])
    assert field == "init_embedding" and msg.startswith("init_embedding: ") and "junk.safetensors" in msg

    [(field, msg)] = problems("tiny", train_encoders="clip_l")
    assert field == "train_encoders" and "train_encoders 'clip_l' applies to SDXL models" in msg and "use 'both'" in msg
    [(field, msg)] = problems(xl_folder, save_formats="safetensors,a1111")
    assert field == "save_formats" and msg.startswith("save_formats: a1111 (.pt)") and "and/or diffusers" in msg
    assert problems(xl_folder, save_formats="safetensors,diffusers") == []


def test_sdxl_tokenizer_checks_the_name_and_a_start_file_replaces_the_init_text(xl_folder, files, tmp_path):
    from embedtrain.preflight import check_run, model_tokenizer
    data = make_images(tmp_path / "data", 4, size=40)
    assert model_tokenizer(str(xl_folder)) is not None and model_tokenizer("tiny-xl") is None
    found = check_run(cfg_for(xl_folder, data).replace(name="circle"))
    assert [p.field for p in found] == ["name"] and "vocabulary" in found[0].message
    # an init text without tokens is refused, unless a start file replaces it (and its vector count)
    assert [p.field for p in check_run(cfg_for(xl_folder, data, init_text=" "))] == ["init_text"]
    assert check_run(cfg_for(xl_folder, data, init_text=" ", vectors=9, init_embedding=files["xl"])) == []


# ---------------------------------------------------------------- the Train tab's helpers (no server)

@pytest.fixture
def ctx(tmp_path, xl_folder):
    from embedtrain.ui.context import UIContext
    data = make_images(tmp_path / "data", 4, size=40)
    return UIContext(outputs=tmp_path / "outputs", model=str(xl_folder), data=str(data))


def form(ctx, **changes):
    from embedtrain.ui.train_tab import FIELDS, default_config
    cfg = default_config(ctx)
    values = {k: getattr(cfg, k) for k in FIELDS}
    values["lr"] = str(values["lr"])
    values.update(changes, template="object", steps=4)
    return values


def test_the_encoders_box_is_fixed_at_both_on_sd_models(xl_folder, tmp_path):
    from embedtrain.ui.train_tab import encoders_box
    for model in ("tiny", "demo"):
        assert {k: encoders_box(model)[k] for k in ("value", "interactive")} == {"value": "both", "interactive": False}
    for model in (str(xl_folder), "tiny-xl", str(tmp_path / "some.safetensors"), "someorg/notcached"):
        box = encoders_box(model)   # SDXL, or only a load can tell: open
        assert box["interactive"] is True and "value" not in box


def test_the_form_carries_the_sdxl_fields_and_checks_them_beside_the_start_row(ctx, files):
    import shutil

    from embedtrain.ui.train_tab import form_checks, form_config
    cfg = form_config(ctx, form(ctx))
    assert (cfg.resolution, cfg.init_embedding, cfg.train_encoders) == (0, "", "both")   # 0 = the model's own
    assert form_checks(ctx, form(ctx))[1] == []
    # a start file inside the outputs folder, typed relative to it
    (ctx.outputs / "runs").mkdir(parents=True)
    shutil.copy(files["xl"], ctx.outputs / "runs" / "xlstar.safetensors")
    shutil.copy(files["sd"], ctx.outputs / "runs" / "sdstar.safetensors")
    cfg = form_config(ctx, form(ctx, init_embedding="runs/xlstar.safetensors", train_encoders="clip_g"))
    assert cfg.init_embedding == str(ctx.outputs / "runs" / "xlstar.safetensors") and cfg.train_encoders == "clip_g"
    assert form_checks(ctx, form(ctx, init_embedding="runs/xlstar.safetensors"))[1] == []
    labels = {"init_embedding": "Start from embedding"}
    slots, bad = form_checks(ctx, form(ctx, init_embedding="runs/sdstar.safetensors"), labels)
    assert bad == ["Start from embedding"] and "model tiny-sdxl is SDXL" in slots["init"]
    assert slots["name"] == slots["plan"] == slots["model"] == ""
    # a file outside the folders the page may read is refused unread, alike whether it exists or not
    for outside in (files["xl"], "/nonexistent/x.safetensors"):
        slots, bad = form_checks(ctx, form(ctx, init_embedding=outside), labels)
        assert bad == ["Start from embedding"] and "not one the web UI may read" in slots["init"], slots


# ---------------------------------------------------------------- Chromium

def _text(page, selector: str) -> str:
    return page.inner_text(selector) if page.locator(selector).count() else ""


@pytest.mark.slow
@pytest.mark.browser
def test_browser_trains_an_sdxl_folder_from_the_page(tmp_path, xl_folder):
    """The app started on a tiny SDXL folder: Load says SDXL and both widths; an SD start embedding is named
    beside its field and keeps Train off; an SDXL start embedding trains clip_l only from the page, and the
    run folder holds NAME.safetensors with clip_l [2, 32] (moved) and clip_g [2, 48] (its start vectors)."""
    from playwright.sync_api import expect
    from uihelp import app_server, chromium_page

    from embedtrain.embedding import load_embedding
    outputs, data = tmp_path / "outputs", make_images(tmp_path / "data", 4, size=40)
    start = outputs / "start"
    start.mkdir(parents=True)
    save_embedding(start / "sdstar.safetensors", torch.randn(1, L), "sdstar")
    xl_start = {"clip_l": torch.randn(2, L), "clip_g": torch.randn(2, G)}
    save_embedding(start / "xlstart.safetensors", xl_start, "xlstart")
    with app_server(outputs, "--model", str(xl_folder), "--data", str(data)) as url, chromium_page() as page:
        page.goto(url)
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('images')")
        page.get_by_role("button", name="Load", exact=True).click()
        expect(page.locator("#model-info")).to_contain_text("tiny-sdxl: tiny SDXL, token dims 32 + 48, 32 px",
                                                            timeout=60_000)
        field = page.get_by_label("Start from embedding")
        field.fill("start/sdstar.safetensors")
        field.press("Tab")
        expect(page.locator("#check-init")).to_contain_text("is an SD-style embedding", timeout=20_000)
        expect(page.locator("#check-init")).to_contain_text("Start from embedding")
        expect(page.locator("#train-button")).to_be_disabled()
        expect(page.get_by_label("Vectors per token")).to_be_disabled()   # the file's count is used

        field.fill("start/xlstart.safetensors")
        page.get_by_label("Embedding name").fill("xlstar")
        page.get_by_label("Batch size", exact=True).fill("2")
        page.get_by_label("Max steps").fill("3")
        page.get_by_label("Max steps").press("Tab")
        page.get_by_label("Text encoders trained (SDXL)").click()
        page.get_by_role("option", name="clip_l").click()
        page.wait_for_function("(document.querySelector('#derived') || {innerText: ''}).innerText.includes('3 weight updates')",
                               timeout=20_000)
        expect(page.locator("#train-button")).to_be_enabled()
        for slot in ("#check-model", "#check-name", "#check-init", "#check-plan"):
            expect(page.locator(slot)).not_to_contain_text("⚠")
        page.click("#train-button")
        page.wait_for_function("/Finished|Failed|Crashed/.test((document.querySelector('#progress') || "
                               "{innerText: ''}).innerText)", timeout=300_000)
        page.screenshot(path=str(tmp_path / "sdxl-finished.png"), full_page=True)
        progress, message = _text(page, "#progress"), _text(page, "#train-message")
        assert "Finished: xlstar" in progress and "Error" not in progress + message, (progress, message)
        expect(page.locator("#run-files")).to_contain_text("xlstar")
        page.locator("#train-model textarea").fill("tiny")   # SD: one text encoder, so 'both' and fixed
        page.locator("#train-model textarea").press("Tab")
        expect(page.get_by_label("Text encoders trained (SDXL)")).to_be_disabled()
        expect(page.get_by_label("Text encoders trained (SDXL)")).to_have_value("both")
    run = next(p for p in outputs.iterdir() if p.name.startswith("xlstar-"))
    config = json.loads((run / "config.json").read_text())
    assert (config["init_embedding"], config["train_encoders"]) == (str(start / "xlstart.safetensors"), "clip_l")
    # the form's resolution 0 is the model's own: 32 px for the tiny SDXL
    assert json.loads((run / "job.json").read_text())["resolution"] == 0 and config["resolution"] == 32
    emb = load_embedding(run / "xlstar.safetensors")
    assert tuple(emb.vectors.shape) == (2, L) and tuple(emb.vectors_g.shape) == (2, G)
    assert not torch.equal(emb.vectors, xl_start["clip_l"])          # trained
    torch.testing.assert_close(emb.vectors_g, xl_start["clip_g"])   # kept: only clip_l was trained
