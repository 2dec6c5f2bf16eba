"""embedtrain: textual-inversion embeddings for Stable Diffusion, from a web page, a CLI or several GPUs.

The words used everywhere (step, epoch, weight update, full-cycle) are defined in calculator.py;
docs/guide.md explains for users why they matter and how the LR tools are read.
Heavy libraries (torch, diffusers, gradio) are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"


class EmbedtrainError(ValueError):
    """A user-facing error. The message names the field, the bad value and what would be valid."""


def shown(value, limit: int = 120) -> str:
    """A typed value as an error message quotes it: its repr, cut to `limit` characters (a 5000-character
    path must not turn a one-line error into 5000 characters)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "…" + text[-4:]
