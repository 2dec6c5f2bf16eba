"""Calculator tab: steps, epochs and weight updates for one setting, updated as the user types.

`compute(values)` is the whole tab as a pure function (a dict of input values in, a dict of output
values out), so it is tested without a browser; `build(ctx)` only lays out components and wires them.
All arithmetic is embedtrain.calculator's; this file only words and tabulates it.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from embedtrain import calculator as calc
from embedtrain.calculator import CalcError

# Every word once (the README's "The words"); the inputs' info lines give units and valid values only.
GLOSSARY = """\
| word | meaning |
|---|---|
| **images** | training images: the folder's images minus the validation split, times repeats |
| **batch size (BS)** | images in one forward/backward pass (a micro-batch) |
| **gradient accumulation (GA)** | batches whose gradients are summed into one weight update |
| **weight update** | one optimizer step; learning-rate schedules count these |
| **step** | what you type for "how long", counted in the step unit: *update* (A1111's code, diffusers, kohya) or *batch* (the A1111 wiki and the "Steps and GA" guide) |
| **epoch** | images shown / images; fractions are fine (batches may straddle two epochs, no image is dropped) |
| **full-cycle** | BS x GA = images: every weight update sees each image once, so updates = epochs |
| **step size (CLR)** | weight updates from one end of the learning-rate range to the other; a cycle is two step sizes |
"""

# Inputs: key -> (label, info, default). Keys are calculator argument names (and TrainConfig fields).
INPUTS = {
    "images": ("Images in the folder", "whole number >= 1; before the validation split", 26),
    "val_split": ("Validation split", "fraction held out, 0 to < 1 (0 = none)", 0),
    "repeats": ("Repeats", "times each training image counts per epoch; whole number >= 1", 1),
    "batch_size": ("Batch size (BS)", "images per batch; whole number, at most the training images", 13),
    "grad_accum": ("Gradient accumulation (GA)", "batches per weight update; whole number >= 1", 2),
    "steps": ("Steps", "run length, counted in the step unit; whole number >= 1", 3000),
    "step_unit": ("Step unit", "what one step is", "batch"),
    "processes": ("Processes (GPUs)", "data-parallel processes, each with its own batch", 1),
    "max_batch_size": ("Largest BS your GPU fits", "images; limits the full-cycle table (0 or empty = no limit)", 0),
    "target_epochs": ("Target epochs", "epochs; the steps that reach it (0 or empty = skip)", 100),
    "target_updates": ("Target weight updates", "updates; the steps that reach it (0 or empty = skip)", 0),
    "clr_step_size": ("CLR step size", "weight updates per half cycle; whole number >= 1", 50),
    "clr_cycles": ("Target cycles", "cycles (5.5 ends on the low point)", 5.5),
    "study_batch_size": ("Other BS", "batch size of the second setting (images)", 3),
    "study_grad_accum": ("Other GA", "gradient accumulation of the second setting (batches)", 17),
    "study_steps": ("Other steps", "the second run length, in the step unit", 150),
}
DEFAULTS = {k: v[2] for k, v in INPUTS.items()}
# Calculator field names that are not input keys, mapped to the input the user should fix.
FIELD_ALIASES = {"min_updates": "steps", "total_updates": "steps", "step_size": "clr_step_size",
                 "cycles": "clr_cycles", "epochs": "target_epochs", "updates": "target_updates",
                 "low_batch_size": "batch_size", "low_grad_accum": "grad_accum", "low_steps": "steps",
                 "high_batch_size": "study_batch_size", "high_grad_accum": "study_grad_accum",
                 "high_steps": "study_steps"}
SEND = ("batch_size", "grad_accum", "steps", "step_unit")  # what "Use these settings" sends to the Train tab

DERIVED_COLUMNS = ["quantity", "formula", "value", "unit"]
UNITS = {"images": "images", "batches": "batches", "weight_updates": "updates", "images_shown": "images",
         "epochs": "epochs", "epochs_floor": "whole epochs", "batches_per_epoch": "batches / epoch",
         "updates_per_epoch": "updates / epoch", "full_cycle": "yes / no", "incomplete_batches": "batches",
         "straddle": "images"}
STUDY_COLUMNS = ["run", "meaning", "BS (images)", "GA (batches)", "steps", "batches", "weight updates",
                 "epochs", "whole epochs"]
CLR_COLUMNS = ["k (epochs per half cycle)", "step size (updates)", "cycles in this run", "ends low at (updates)"]


def fmt(x) -> str:
    """Whole numbers plainly, others with up to 4 decimals (the calculator's rule)."""
    return calc._fmt(x)


def message(err: CalcError) -> str:
    """The calculator's message with its field name turned into the label the user sees."""
    text = str(err)
    key = FIELD_ALIASES.get(err.field, err.field)
    if err.field and text.startswith(err.field) and key in INPUTS:
        text = f"**{INPUTS[key][0]}**" + text[len(err.field):]
    for name, key in FIELD_ALIASES.items():  # other fields named inside the sentence ("differ from low_grad_accum")
        if "_" in name and name in text:
            text = text.replace(name, INPUTS[key][0])
    return text


def warn(text: str) -> str:
    """The error line as shown: a warning sign in front, so it stands out from the numbers."""
    return f"### ⚠ {text}" if text else ""


def _unset(x) -> bool:
    """An optional input left empty. A Gradio number box shows an empty value as 0, so 0 counts too."""
    if isinstance(x, str):
        x = x.strip()
    return x is None or x == "" or (isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0)


def _frame(columns, rows=()) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=columns)


def _full_cycle_columns(units: str) -> list[str]:
    return ["BS (images)", "GA (batches)", "images per update", "updates per epoch", f"steps for the same epochs ({units})"]


def empty_outputs(error: str = "") -> dict:
    """The outputs with no numbers; with an error, every section says why it is empty."""
    why = f"Nothing to show until the inputs above are fixed: {error}" if error else ""
    return {
        "error": error, "summary": why, "derived": _frame(DERIVED_COLUMNS),
        "full_cycle": _frame(_full_cycle_columns("steps")), "full_cycle_note": why, "target": why, "clr": why,
        "clr_table": _frame(CLR_COLUMNS), "study": _frame(STUDY_COLUMNS), "study_note": why, "settings": None,
    }


def from_train(data: str, batch_size, grad_accum, steps, step_unit, val_split, ctx=None) -> dict:
    """Calculator inputs for the Train tab's form: its dataset's usable images (0 when the folder cannot be
    read: the calculator then says why) and its BS, GA, steps, step unit and validation split."""
    from embedtrain import EmbedtrainError
    from embedtrain.ui.train_tab import _count_images
    try:
        images = _count_images(str(data or ""), ctx)   # only a folder the web UI may read
    except (EmbedtrainError, OSError):
        images = 0
    return {"images": images, "batch_size": batch_size, "grad_accum": grad_accum, "steps": steps,
            "step_unit": step_unit, "val_split": val_split}


def compute(values: dict) -> dict:
    """Every output of the tab from its input values (keys of INPUTS; missing ones take DEFAULTS).

    Returns a dict: error (Markdown, "" when the inputs are valid), summary, derived (DataFrame of
    quantity/formula/value/unit), full_cycle (DataFrame) and full_cycle_note, target, clr and clr_table,
    study (DataFrame) and study_note, settings (the values "Use these settings" sends, or None).
    Never raises for bad input: a section whose own inputs are bad shows the message in its place.
    """
    v = {**DEFAULTS, **values}
    try:
        d = calc.derive(v["images"], v["batch_size"], v["grad_accum"], v["steps"], v["step_unit"],
                        repeats=v["repeats"], val_split=v["val_split"], processes=v["processes"])
    except CalcError as err:
        return empty_outputs(message(err))
    out = empty_outputs()
    unit = d.step_unit
    units = "updates" if unit == "update" else "batches"  # the step unit's plural, for labels
    out["settings"] = {"batch_size": d.batch_size, "grad_accum": d.grad_accum, "steps": d.steps, "step_unit": unit}

    # 1. the headline and every derived number with its formula
    head = (f"**{d.steps} steps ({units})** = **{d.batches} batches** = **{d.weight_updates} weight updates** = "
            f"**{fmt(d.epochs)} epochs** ({d.epochs_floor} whole) on **{d.images} images**; "
            f"full-cycle: **{'yes' if d.full_cycle else 'no'}**")
    out["summary"] = "\n\n".join([head] + [f"Note: {n}." for n in d.notes()])
    out["derived"] = _frame(DERIVED_COLUMNS, [(name, formula, value, UNITS.get(name, ""))
                                              for name, formula, value in d.formula_rows()])

    # 2. full-cycle settings for these images, with the steps that keep the same number of epochs
    try:
        cap = None if _unset(v["max_batch_size"]) else v["max_batch_size"]
        advice = calc.nearest_full_cycle(d.images, cap, d.processes)
        rows = [(bs, ga, bs * ga * d.processes, 1,
                 calc.steps_for_target(d.images, bs, ga, unit, epochs=d.epochs, processes=d.processes))
                for bs, ga in advice.settings]
        out["full_cycle"] = _frame(_full_cycle_columns(units), rows)
        out["full_cycle_note"] = advice.message + (
            "" if advice.good else ". Without a full-cycle setting, pick the row or option above that fits.")
    except CalcError as err:
        out["full_cycle_note"] = message(err)

    # 3. steps for a target number of epochs or weight updates
    lines = []
    for key, kind in (("target_epochs", "epochs"), ("target_updates", "updates")):
        if _unset(v[key]):
            continue
        try:
            s = calc.steps_for_target(d.images, d.batch_size, d.grad_accum, unit, processes=d.processes,
                                      **{kind: v[key]})
            t = calc.derive(d.images, d.batch_size, d.grad_accum, s, unit, processes=d.processes)
            what = f"{fmt(float(v[key]))} epochs" if kind == "epochs" else f"{int(float(v[key]))} weight updates"
            lines.append(f"- {what}: **{s} steps ({units})** = {t.batches} batches = {t.weight_updates} updates "
                         f"= {fmt(t.epochs)} epochs")
        except CalcError as err:
            lines.append(f"- {message(err)}")
        except ValueError:  # float("abc") on the label: the calculator already said what is wrong
            pass
    out["target"] = "\n".join(lines) or "Type a target number of epochs or weight updates."

    # 4. cyclical learning rates (Smith 2017; docs/guide.md#cyclical-lr)
    upe = d.updates_per_epoch
    u = d.weight_updates
    clr = [f"- updates per epoch = images / (BS x GA{' x processes' if d.processes > 1 else ''}) = "
           f"{d.images} / {d.images_per_update} = **{fmt(upe)}** updates / epoch"]
    try:
        out["clr_table"] = _frame(CLR_COLUMNS, [
            (k, s, fmt(calc.cycles_for_run(u, s)), calc.low_point_run(s, u)) for k in range(2, 11)
            for s in [calc.step_size_for_epochs(k, d.images, d.batch_size, d.grad_accum, d.processes)]])
        s = calc._whole("step_size", v["clr_step_size"])
        low = calc.low_point_run(s, u)
        clr.append(f"- step size {s} updates: this run of {u} updates = {u} / (2 x {s}) = "
                   f"**{fmt(calc.cycles_for_run(u, s))} cycles**; the shortest run of at least {u} updates that "
                   f"ends on the low point (n.5 cycles) is **{low} updates** = {fmt(low / upe)} epochs")
        c = v["clr_cycles"]
        if c is not None and c != "":
            cu = calc.updates_for_cycles(c, s)
            clr.append(f"- {fmt(float(c))} cycles of step size {s} = {fmt(float(c))} x 2 x {s} = **{cu} updates** "
                       f"= {fmt(cu / upe)} epochs = {cu if unit == 'update' else cu * d.grad_accum} steps ({units})")
            clr.append(f"- step size for {fmt(float(c))} cycles in this run of {u} updates = {u} / (2 x "
                       f"{fmt(float(c))}) = **{calc.step_size_for_cycles(u, c)} updates**")
    except CalcError as err:
        clr.append(f"- {message(err)}")
    out["clr"] = "\n".join(clr)

    # 5. the steps-vs-GA study: this setting and another, this run length and another
    try:
        runs = calc.study_table(d.images, (d.batch_size, d.grad_accum), (v["study_batch_size"], v["study_grad_accum"]),
                                d.steps, v["study_steps"], unit, processes=d.processes)
        out["study"] = _frame(STUDY_COLUMNS, [(r.name, r.meaning, r.batch_size, r.grad_accum, r.steps, r.batches,
                                               r.weight_updates, fmt(r.epochs), r.epochs_floor) for r in runs])
        out["study_note"] = (f"Names follow the 'Steps and GA' write-up (Guide tab): lower case = low (gaST = low GA, high steps). Steps are "
                             f"{units}; whole epochs are what the write-up reports.")
    except CalcError as err:
        out["study_note"] = message(err)
    return out


def use_settings(values: dict) -> dict | None:
    """The Train tab values for "Use these settings", or None when the inputs are invalid."""
    return compute(values)["settings"]


# ------------------------------------------------------------------ layout and wiring

FROM_TRAIN = ("data", "batch_size", "grad_accum", "steps", "step_unit", "val_split")  # Train inputs read


def build(ctx) -> None:
    first = compute(DEFAULTS)
    box = {}
    # "Use these settings" goes to whichever of the Train tab's inputs exist, then switches to that tab.
    targets = [(k, ctx.train[k]) for k in SEND if ctx.train.get(k) is not None]

    def number(key, **kw):
        label, info, default = INPUTS[key]
        box[key] = gr.Number(value=default, label=label, info=info, elem_id=f"calc-{key.replace('_', '-')}", **kw)

    with gr.Accordion("What the words mean", open=False):
        gr.Markdown(GLOSSARY)
    with gr.Row():
        number("images")
        number("val_split", step=0.05)
        number("repeats")
        number("processes")
    with gr.Row():
        number("batch_size")
        number("grad_accum")
        number("steps")
        box["step_unit"] = gr.Radio(["update", "batch"], value=DEFAULTS["step_unit"], label=INPUTS["step_unit"][0],
                                    info="update = weight updates; batch = batches shown", elem_id="calc-step-unit")
    error = gr.Markdown(warn(first["error"]), visible=bool(first["error"]), elem_id="calc-error")
    summary = gr.Markdown(first["summary"], elem_id="calc-summary")
    with gr.Row():
        use = gr.Button("Use these settings", variant="primary", scale=0, min_width=200, elem_id="calc-use",
                        interactive=bool(targets))
        reread = gr.Button("Read the Train tab", scale=0, min_width=160, elem_id="calc-from-train")
        gr.Markdown("**Use these settings** sends batch size, gradient accumulation, steps and step unit to the Train "
                    "tab; **Read the Train tab** takes its dataset's image count and settings" if targets
                    else "(the Train tab is not available, so there is nothing to send the settings to)")
    derived = gr.Dataframe(first["derived"], label="Derived numbers (formula with your numbers filled in)",
                           wrap=True, interactive=False, elem_id="calc-derived")

    gr.Markdown("### Full-cycle settings (BS x GA = images)")
    number("max_batch_size")
    full_note = gr.Markdown(first["full_cycle_note"], elem_id="calc-full-cycle-note")
    full = gr.Dataframe(first["full_cycle"], interactive=False, elem_id="calc-full-cycle")

    gr.Markdown("### Steps for a target")
    with gr.Row():
        number("target_epochs")
        number("target_updates")
    target = gr.Markdown(first["target"], elem_id="calc-target")

    gr.Markdown("### Cyclical learning rate (Smith 2017: step size = 2 to 10 x updates per epoch)")
    with gr.Row():
        number("clr_step_size")
        number("clr_cycles", step=0.5)
    clr = gr.Markdown(first["clr"], elem_id="calc-clr")
    clr_table = gr.Dataframe(first["clr_table"], interactive=False, label="step size = k x updates per epoch",
                             elem_id="calc-clr-table")

    gr.Markdown("### Steps vs gradient accumulation study (this setting and run length against the others)")
    with gr.Row():
        number("study_batch_size")
        number("study_grad_accum")
        number("study_steps")
    study_note = gr.Markdown(first["study_note"], elem_id="calc-study-note")
    study = gr.Dataframe(first["study"], interactive=False, elem_id="calc-study")

    shown = {"error": error, "summary": summary, "derived": derived, "full_cycle": full,
             "full_cycle_note": full_note, "target": target, "clr": clr, "clr_table": clr_table,
             "study": study, "study_note": study_note}
    _wire(ctx, box, shown, use, reread, targets)


def _wire(ctx, box: dict, shown: dict, use, reread, targets: list) -> None:
    """Live updates of every output, "Read the Train tab" (also on page load) and "Use these settings"."""
    names = list(box)
    switch = getattr(ctx, "tabs", None)

    def refresh(*args):
        out = compute(dict(zip(names, args)))
        return [gr.update(value=warn(out["error"]), visible=bool(out["error"]))] + \
            [out[k] for k in list(shown)[1:]] + [gr.update(interactive=bool(targets) and out["settings"] is not None)]

    gr.on([c.change for c in box.values()], refresh, inputs=[box[k] for k in names],
          outputs=list(shown.values()) + [use], show_progress="hidden", api_visibility="private")

    # The calculator opens on the Train tab's dataset and settings (and can read them again), so "Use these
    # settings" sends numbers that fit the dataset the Train tab will use.
    sources = [ctx.train.get(k) for k in FROM_TRAIN]
    if all(src is not None for src in sources):
        filled = ["images", "batch_size", "grad_accum", "steps", "step_unit", "val_split"]

        def read_train(*args):
            got = from_train(*args, ctx=ctx)
            return [got[k] for k in filled]

        reread.click(read_train, sources, [box[k] for k in filled], api_visibility="private")
        ctx.on_load.append((read_train, sources, [box[k] for k in filled]))
    else:
        reread.visible = False

    if not targets:
        return

    def send(*args):
        values = dict(zip(names, args))
        settings = use_settings(values)
        if settings is None:
            gr.Warning("Fix the calculator's inputs first: " + compute(values)["error"].replace("**", ""))
            return [gr.skip()] * (len(targets) + (switch is not None))
        return [settings[k] for k, _ in targets] + ([gr.Tabs(selected="train")] if switch is not None else [])

    use.click(send, inputs=[box[k] for k in names],
              outputs=[c for _, c in targets] + ([switch] if switch is not None else []), api_visibility="private")
