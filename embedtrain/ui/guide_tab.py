"""Guide tab: the project's guide (docs/guide.md) on the page, so the science the tool is built on (the
range test, cyclical LR, the short-run sweep, steps vs GA, validation on small sets, learning-rate-free
optimizers) is one click away from the settings it explains."""

from __future__ import annotations

import gradio as gr

from embedtrain import DOCS

GUIDE = DOCS / "guide.md"


def build(ctx) -> None:
    try:
        text = GUIDE.read_text(encoding="utf-8")
    except OSError as e:
        text = f"The guide could not be read ({GUIDE}: {e.strerror or e}); it ships as docs/guide.md."
    gr.Markdown(text, elem_id="guide")
