"""embedtrain: textual-inversion embeddings for Stable Diffusion, from a web page, a CLI or several GPUs.

The words used everywhere (step, epoch, weight update, full-cycle) are defined in calculator.py;
docs/guide.md explains for users why they matter and how the LR tools are read.
Heavy libraries (torch, diffusers, gradio) are imported lazily by the modules that need them.
"""

from pathlib import Path

__version__ = "0.1.0"


def _shared(folder: str) -> Path:
    """A folder shipped beside the package: in a checkout it is the repository's (assets/, docs/); after
    `pip install .` it lies under the install prefix's share/embedtrain/ (pyproject.toml's data-files)."""
    import sys
    checkout = Path(__file__).resolve().parent.parent / folder
    if checkout.is_dir():
        return checkout
    for prefix in (Path(__file__).resolve().parents[4], Path(sys.prefix)):   # PREFIX/lib/pythonX.Y/site-packages/embedtrain
        installed = prefix / "share" / "embedtrain" / folder
        if installed.is_dir():
            return installed
    return checkout


ASSETS = _shared("assets")   # demo model, demo dataset, prompt templates
DOCS = _shared("docs")       # the guide


class EmbedtrainError(ValueError):
    """A user-facing error. The message names the field, the bad value and what would be valid."""


def shown(value, limit: int = 120) -> str:
    """A typed value as an error message quotes it: its repr, cut to `limit` characters (a 5000-character
    path must not turn a one-line error into 5000 characters)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "…" + text[-4:]


# The SD family a one-encoder embedding's width means (SD 1.x: CLIP ViT-L; SD 2.x: OpenCLIP ViT-H); any other
# width is a tiny or unusual model. Every message and label that names a family from a width reads it here.
SD_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}
