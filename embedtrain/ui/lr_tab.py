"""Placeholder until this tab's issue lands (its owner replaces this file)."""

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("This tab is being built.")
