"""Shared fixtures: small real image folders and configs for the tiny model (CPU, seconds, no network)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, n: int = 8, size: int = 48, captions: bool = True) -> Path:
    """n distinct little pictures (a coloured disc or box on a background), each with a caption file."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 40, 40), (40, 160, 60), (50, 70, 200), (220, 200, 40), (150, 60, 170), (240, 140, 30)]
    for i in range(n):
        img = Image.new("RGB", (size, size), colours[(i + 3) % len(colours)])
        d = ImageDraw.Draw(img)
        box = (6 + i % 5, 8 + i % 3, size - 10 + i % 4, size - 6 - i % 5)
        (d.ellipse if i % 2 else d.rectangle)(box, fill=colours[i % len(colours)])
        img.save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text("on a red background" if i % 2 else "on a blue background")
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "data", 8)


@pytest.fixture
def tiny_cfg(images, tmp_path):
    """A config for a short run on the tiny test model; tests .replace() what they vary."""
    from embedtrain.config import TrainConfig, apply_preset
    cfg = TrainConfig(model="tiny", data=str(images), name="zorblat", init_text="circle", steps=6,
                      batch_size=2, lr=5e-3, out=str(tmp_path / "out"), template="object")
    return apply_preset(cfg, explicit={"steps", "batch_size", "lr", "init_text", "template"})


XL_WIDTHS = (32, 48)   # the tiny SDXL's token widths (clip_l, clip_g): different, so a swap of the halves fails


@pytest.fixture(scope="session")
def xl_folder(tmp_path_factory):
    """The tiny SDXL saved as a diffusers folder (model_index.json, tokenizer, tokenizer_2, ...), as a user's
    SDXL folder would be."""
    from embedtrain.demo.model import build_sdxl_pipeline
    folder = tmp_path_factory.mktemp("xl") / "tiny-sdxl"
    build_sdxl_pipeline("tiny").save_pretrained(folder)
    return folder
