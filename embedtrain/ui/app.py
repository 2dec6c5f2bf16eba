"""The web UI: one gr.Blocks made of one module per tab. `app.py` at the top parses flags and launches.

Each tab module has `build(ctx: UIContext) -> None`, called inside its `gr.Tab`. The Train tab is built
first and registers its inputs in `ctx.train`, so later tabs can wire "Use these settings" buttons to it.
"""

from __future__ import annotations

import gradio as gr

from embedtrain.ui.context import UIContext

CSS = """
#train-button {min-height: 3.2em; font-size: 1.15em}
.et-derived {font-family: ui-monospace, monospace}
"""

# (tab label, element id, module) in page order
TABS = [
    ("Train", "train", "embedtrain.ui.train_tab"),
    ("Calculator", "calculator", "embedtrain.ui.calculator_tab"),
    ("LR finder", "lr", "embedtrain.ui.lr_tab"),
    ("Grid", "grid", "embedtrain.ui.grid_tab"),
    ("Guide", "guide", "embedtrain.ui.guide_tab"),
]


def build_app(ctx: UIContext) -> gr.Blocks:
    import importlib

    with gr.Blocks(title="embedtrain") as demo:
        gr.Markdown("## embedtrain: textual-inversion embeddings for Stable Diffusion")
        with gr.Tabs(selected="train") as tabs:
            ctx.tabs = tabs
            for label, tab_id, module in TABS:
                with gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id}"):
                    importlib.import_module(module).build(ctx)
        for fn, inputs, outputs in ctx.on_load:
            demo.load(fn, inputs, outputs, show_progress="hidden", api_visibility="private")
    return demo
