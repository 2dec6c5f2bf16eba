"""Train tab (being written)."""

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("Train")
