"""Calculator tab: its pure `compute` on the users' numbers and bad input, then the real page in Chromium."""

import pytest

from embedtrain.ui import calculator_tab as tab
from embedtrain.ui.calculator_tab import DEFAULTS, INPUTS, compute
from uihelp import app_server, chromium_page


def values(**kw):
    return {**DEFAULTS, **kw}


def cell_rows(frame):
    return [tuple(str(x) for x in row) for row in frame.itertuples(index=False)]


# ------------------------------------------------------------------ the pure function

def test_defaults_show_the_guides_study_on_26_images():
    out = compute(DEFAULTS)
    assert out["error"] == ""
    assert "**3000 steps (batches)** = **3000 batches** = **1500 weight updates** = **1500 epochs**" in out["summary"]
    assert out["settings"] == {"batch_size": 13, "grad_accum": 2, "steps": 3000, "step_unit": "batch"}
    study = {r[0]: r for r in cell_rows(out["study"])}
    #                      run      meaning                BS    GA   steps  batches updates epochs  whole
    assert study["gaST"] == ("gaST", "low GA, high steps", "13", "2", "3000", "3000", "1500", "1500", "1500")
    assert study["gast"] == ("gast", "low GA, low steps", "13", "2", "150", "150", "75", "75", "75")
    assert study["GAST"] == ("GAST", "high GA, high steps", "3", "17", "3000", "3000", "176", "346.1538", "346")
    assert study["GAst"] == ("GAst", "high GA, low steps", "3", "17", "150", "150", "8", "17.3077", "17")
    # every derived number has its formula and a unit
    derived = {r[0]: r for r in cell_rows(out["derived"])}
    assert derived["weight_updates"] == ("weight_updates", "floor(batches / GA) = floor(3000 / 2)", "1500", "updates")
    assert derived["epochs"][2:] == ("1500", "epochs") and derived["straddle"][3] == "images"
    assert all(r[3] for r in derived.values())
    # full-cycle pairs for 26 images, and the steps (batches) that keep the run at 1500 epochs
    assert cell_rows(out["full_cycle"]) == [("26", "1", "26", "1", "1500"), ("13", "2", "26", "1", "3000"),
                                            ("2", "13", "26", "1", "19500"), ("1", "26", "26", "1", "39000")]
    assert list(out["full_cycle"].columns)[-1] == "steps for the same epochs (batches)"


def test_users_clr_numbers_20_images_bs4():
    out = compute(values(images=20, batch_size=4, grad_accum=1, steps=550, step_unit="update",
                         clr_step_size=50, clr_cycles=5.5, target_epochs=110))
    assert "= **550 weight updates** = **110 epochs**" in out["summary"]
    clr = out["clr"]
    assert "updates per epoch = images / (BS x GA) = 20 / 4 = **5** updates / epoch" in clr
    assert "this run of 550 updates = 550 / (2 x 50) = **5.5 cycles**" in clr
    assert "ends on the low point (n.5 cycles) is **550 updates** = 110 epochs" in clr
    assert "5.5 cycles of step size 50 = 5.5 x 2 x 50 = **550 updates** = 110 epochs = 550 steps (updates)" in clr
    assert "step size for 5.5 cycles in this run of 550 updates = 550 / (2 x 5.5) = **50 updates**" in clr
    table = {int(r[0]): r for r in cell_rows(out["clr_table"])}
    assert table[10] == ("10", "50", "5.5", "550") and table[2][1] == "10"
    assert "- 110 epochs: **550 steps (updates)** = 550 batches = 550 updates = 110 epochs" in out["target"]


def test_users_clr_numbers_16_images_bs4_with_a_validation_split():
    # 20 images, 20 % validation -> 16; BS 4 -> 4 updates per epoch; 800 updates, step size 40 -> 10 cycles
    out = compute(values(images=20, val_split=0.2, batch_size=4, grad_accum=1, steps=800, step_unit="update",
                         clr_step_size=40, target_epochs=200, target_updates=400))
    assert "on **16 images**" in out["summary"] and "**200 epochs**" in out["summary"]
    assert "= **4** updates / epoch" in out["clr"] and "**10 cycles**" in out["clr"]
    assert {int(r[0]): r[1] for r in cell_rows(out["clr_table"])}[10] == "40"
    assert "- 200 epochs: **800 steps (updates)**" in out["target"]
    assert "- 400 weight updates: **400 steps (updates)** = 400 batches = 400 updates = 100 epochs" in out["target"]
    assert "(20 - 4) x 1" in cell_rows(out["derived"])[0][1]


def test_a_prime_gets_the_nearest_full_cycle_options():
    out = compute(values(images=29, batch_size=4, grad_accum=1, steps=100, max_batch_size=8))
    # 100 batches of 4 = 400 images; with BS 1 that is 400 batches
    assert cell_rows(out["full_cycle"]) == [("1", "29", "29", "1", "400")]
    note = out["full_cycle_note"]
    assert note.startswith("29 is prime") and "drop 1 image -> 28 = 7 x 4" in note and "add 1 -> 30 = 6 x 5" in note
    # 0 (what an emptied number box shows) means no limit
    assert len(compute(values(images=24, max_batch_size=0, batch_size=4))["full_cycle"]) == 8
    assert len(compute(values(images=24, max_batch_size=6, batch_size=4))["full_cycle"]) == 5


@pytest.mark.parametrize("key,value,says", [
    ("images", 0, "must be a whole number >= 1, got 0"),
    ("images", -5, "must be a whole number >= 1, got -5"),
    ("images", None, "got nothing"),
    ("batch_size", 0, "must be a whole number >= 1, got 0"),
    ("batch_size", 2.5, "must be a whole number >= 1, got 2.5"),
    ("batch_size", 27, "27 is larger than the 26 training images"),
    ("grad_accum", -1, ">= 1, got -1"),
    ("steps", 10.5, "whole number >= 1, got 10.5"),
    ("steps", 0, ">= 1, got 0"),
    ("repeats", 0, ">= 1"),
    ("val_split", 1, "must be a number in [0, 1), got 1"),
    ("processes", 0, ">= 1"),
    ("step_unit", None, "must be one of update, batch"),
    ("steps", 1, "make no weight update"),  # 1 batch with GA 2
])
def test_bad_input_shows_one_message_naming_the_field(key, value, says):
    out = compute(values(**{key: value}))
    label = INPUTS[key][0]
    assert out["error"].startswith(f"**{label}**") and says in out["error"], out["error"]
    # nothing stale is left on the page, every emptied section says why, and nothing can be sent to the Train tab
    assert out["derived"].empty and out["study"].empty and out["full_cycle"].empty and out["clr_table"].empty
    for key_ in ("summary", "clr", "study_note", "full_cycle_note", "target"):
        assert out[key_].startswith("Nothing to show until the inputs above are fixed") and says in out[key_]
    assert out["settings"] is None and tab.use_settings(values(**{key: value})) is None


def test_a_bad_section_input_only_blanks_its_own_section():
    out = compute(values(clr_step_size=0, study_grad_accum=2, target_updates=-3))
    assert out["error"] == "" and "1500 weight updates" in out["summary"]
    assert "**CLR step size** must be a whole number >= 1, got 0" in out["clr"]
    assert out["study_note"].startswith("**Other GA** must differ from Gradient accumulation (GA)") and out["study"].empty
    assert "**Target weight updates** must be a whole number >= 1, got -3" in out["target"]
    assert "100 epochs" in out["target"]


def test_no_input_combination_raises():
    # Every section copes with whatever the number boxes send: empty (None), 0, negatives, fractions,
    # text, nan, huge values, and settings that leave a run without a single weight update.
    import random
    rng = random.Random(0)
    pool = [None, 0, -1, 1, 2, 3, 13, 29, 2.5, 0.2, 1e10, float("nan"), float("inf"), "", "abc", "12", True,
            10**9, "update", "batch"]
    for _ in range(150):
        v = {k: rng.choice(pool) if rng.random() < 0.4 else DEFAULTS[k] for k in INPUTS}
        out = compute(v)
        assert (out["settings"] is None) == bool(out["error"]), (v, out["error"])
        assert "Traceback" not in str(out)


def test_module_is_light_and_build_wires_live_updates_and_the_send_button():
    import ast
    import inspect
    # module-level imports only (a subprocess importing gradio would take ~10 s on a busy CI machine)
    tree = ast.parse(inspect.getsource(tab))
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not top & {"torch", "diffusers", "transformers"}, top

    import gradio as gr
    from embedtrain.ui.context import UIContext
    with gr.Blocks() as demo:
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                train = {k: gr.Number(label=k) for k in ("batch_size", "grad_accum", "steps")}
                train["step_unit"] = gr.Radio(["update", "batch"], label="step_unit")
            with gr.Tab("Calculator", id="calculator"):
                ctx = UIContext(outputs="/tmp/never-written", train=train, tabs=tabs)
                tab.build(ctx)
    deps = demo.config["dependencies"]
    ids = {c._id: c for c in demo.blocks.values()}
    clicks = [d for d in deps if any(t[1] == "click" for t in d["targets"])]
    assert len(clicks) == 1
    assert {ids[i] for i in clicks[0]["outputs"]} == set(train.values()) | {tabs}
    live = [d for d in deps if any(t[1] == "change" for t in d["targets"])]
    assert len(live) == 1 and len(live[0]["targets"]) == len(INPUTS)  # every input, no button needed


# ------------------------------------------------------------------ the page in a real browser

def slow_expect():
    """Playwright's expect, waiting up to 60 s (its default 5 s is too short on a busy 2-core CI machine)."""
    from playwright.sync_api import expect
    expect.set_options(timeout=60_000)
    return expect


def summary_of(page):
    return page.locator("#calc-summary")


def type_into(page, key, text):
    box = page.locator(f"#calc-{key.replace('_', '-')} input")
    box.fill(str(text))
    box.press("Tab")  # also fires a blur, like a user leaving the field


@pytest.mark.slow
@pytest.mark.browser
def test_calculator_tab_in_chromium(tmp_path):
    expect = slow_expect()
    with app_server(tmp_path / "outputs") as url, chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Calculator").click()
        # it opens on the Train tab's dataset (the demo's 12 images) and settings (BS 4, 200 updates)
        expect(summary_of(page)).to_contain_text("200 steps (updates) = 200 batches = 200 weight updates = "
                                                 "66.6667 epochs (66 whole) on 12 images")
        expect(page.locator("#calc-use")).to_be_enabled()
        type_into(page, "images", 26)
        type_into(page, "batch_size", 13)
        type_into(page, "grad_accum", 2)
        type_into(page, "steps", 3000)
        page.locator("#calc-step-unit").get_by_label("batch").check()
        expect(summary_of(page)).to_contain_text("1500 weight updates = 1500 epochs")
        expect(page.locator("#calc-study")).to_contain_text("346.1538")

        # the guide's GAST run: typed in, read back
        type_into(page, "batch_size", 3)
        type_into(page, "grad_accum", 17)
        expect(summary_of(page)).to_contain_text("3000 batches = 176 weight updates = 346.1538 epochs (346 whole)")
        expect(summary_of(page)).to_contain_text("full-cycle: no")
        expect(summary_of(page)).to_contain_text("embedtrain skips them, so it trains 2992 batches")
        derived = page.locator("#calc-derived")
        expect(derived).to_contain_text("floor(3000 / 17)")
        expect(derived).to_contain_text("updates / epoch")

        # the users' CLR run: 20 images, BS 4, 550 updates
        type_into(page, "images", 20)
        type_into(page, "batch_size", 4)
        type_into(page, "grad_accum", 1)
        type_into(page, "steps", 550)
        page.locator("#calc-step-unit").get_by_label("update").check()
        expect(summary_of(page)).to_contain_text("550 steps (updates) = 550 batches = 550 weight updates = 110 epochs")
        expect(page.locator("#calc-clr")).to_contain_text("5.5 cycles")
        expect(page.locator("#calc-clr")).to_contain_text("20 / 4 = 5 updates / epoch")
        expect(page.locator("#calc-full-cycle")).to_contain_text("steps for the same epochs (updates)")
        page.locator("#calc-summary").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "calculator.png"), full_page=True)

        # a prime with a GPU limit: the nearest options
        type_into(page, "images", 29)
        type_into(page, "max_batch_size", 8)
        expect(page.locator("#calc-full-cycle-note")).to_contain_text("29 is prime")
        expect(page.locator("#calc-full-cycle-note")).to_contain_text("drop 1 image -> 28 = 7 x 4")

        # bad input: a clear message naming the field, the numbers cleared, no traceback anywhere
        error = page.locator("#calc-error")
        expect(error).to_be_hidden()
        type_into(page, "batch_size", 0)
        expect(error).to_be_visible()
        expect(error).to_contain_text("Batch size (BS) must be a whole number >= 1, got 0")
        expect(summary_of(page)).not_to_contain_text("weight updates")
        type_into(page, "batch_size", 40)
        expect(error).to_contain_text("Batch size (BS) 40 is larger than the 29 training images")
        type_into(page, "batch_size", 2)
        type_into(page, "steps", 2.5)
        expect(error).to_contain_text("Steps must be a whole number >= 1, got 2.5")
        page.screenshot(path=str(tmp_path / "calculator-error.png"))
        type_into(page, "steps", 29)
        expect(error).to_be_hidden()
        expect(summary_of(page)).to_contain_text("29 weight updates = 2 epochs")
        assert "Traceback" not in page.content()

        # "Use these settings" fills the app's own Train tab and switches to it
        type_into(page, "grad_accum", 3)
        expect(summary_of(page)).to_contain_text("29 steps (updates) = 87 batches")
        page.locator("#calc-use").click()
        expect(page.get_by_role("tab", name="Train", selected=True)).to_be_visible()
        train = page.locator("#tab-train")
        field = lambda label: train.locator("label", has_text=label).first.locator("input")  # noqa: E731
        expect(field("Batch size")).to_have_value("2")
        expect(field("Gradient accumulation")).to_have_value("3")
        expect(field("Max steps")).to_have_value("29")
        expect(train.get_by_label("update", exact=True)).to_be_checked()
        # bad input sends nothing: the button is off, the emptied tables say why, the Train tab keeps its values
        page.get_by_role("tab", name="Calculator").click()
        type_into(page, "batch_size", 0)
        expect(error).to_be_visible()
        expect(page.locator("#calc-use")).to_be_disabled()
        expect(page.locator("#calc-study-note")).to_contain_text("Nothing to show until the inputs above are fixed")
        page.get_by_role("tab", name="Train").click()
        expect(field("Batch size")).to_have_value("2")
        # "Read the Train tab" takes the dataset's count and the form's settings again
        page.get_by_role("tab", name="Calculator").click()
        page.locator("#calc-from-train").click()
        expect(summary_of(page)).to_contain_text("on 12 images")
        expect(page.locator("#calc-use")).to_be_enabled()
