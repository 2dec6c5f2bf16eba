"""The demo world: flat-coloured shapes on flat backgrounds, 64 x 64, with exact captions.

A `Spec` says what is in an image (shape, colour, background, centre, size); `render(spec, seed)`
draws it deterministically (fields left as None are drawn from the seed). `caption(spec, rng)`
writes one of many caption forms: attributes optional, different orders, the A1111 object
templates' "a photo of a ..." prefixes, so that the prompts users and textual-inversion templates
write are in the pretraining distribution (a prototype trained on one fixed pattern answered
"a star on a red background" with the wrong background 80% of the time).

The held-out concept (`HELD_OUT`, a purple star) never appears in pretraining images or captions:
purple is only seen on other shapes and stars only in other colours. The demo dataset for textual
inversion is made of it: `python -m embedtrain.demo.world --make-dataset assets/demo_dataset`.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from embedtrain.demo.model import BASE_WORDS

RESOLUTION = 64
SUPERSAMPLE = 4          # draw at 4x and box-filter down: anti-aliased, still deterministic

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
PALETTE = {              # name -> RGB; hues far apart so a hue-based judge tolerates drift
    "red": (220, 30, 30),
    "orange": (245, 120, 0),
    "yellow": (240, 220, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
BACKGROUNDS = COLOURS    # any palette colour but the shape's own
HELD_OUT = ("purple", "star")   # (colour, shape): never in pretraining
MIN_SIZE, MAX_SIZE = 18, 40     # bounding-box side in pixels
SMALL_BELOW, LARGE_ABOVE = 25, 33

# Every word a caption or TI template may use; each becomes one token of the demo tokenizer.
WORDS = tuple(dict.fromkeys(list(BASE_WORDS) + list(SHAPES) + list(COLOURS) + ["an", "with"]))

# Caption prefixes: the A1111 object templates plus plain forms. [name] is "colour shape", etc.
PREFIXES = (
    "a [name]", "a [name]", "a [name]", "[name]",
    "a photo of a [name]", "a photo of a [name]", "a rendering of a [name]", "a picture of the [name]",
    "a close up photo of a [name]", "a bright photo of the [name]", "a cropped photo of a [name]",
    "a good photo of the [name]", "a photo of one [name]", "a nice photo of a [name]",
    "a clean photo of a [name]", "a good photo of a [name]", "a picture of a [name]",
)


@dataclass(frozen=True)
class Spec:
    """What one image shows. None fields are drawn from the seed by `complete`."""
    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    x: float | None = None       # centre, pixels
    y: float | None = None
    size: float | None = None    # bounding-box side, pixels

    @property
    def size_word(self) -> str | None:
        if self.size is None:
            return None
        return "small" if self.size < SMALL_BELOW else "large" if self.size > LARGE_ABOVE else None


def is_held_out(spec: Spec) -> bool:
    return (spec.colour, spec.shape) == HELD_OUT


def complete(spec: Spec, rng: random.Random, allow_held_out: bool = True) -> Spec:
    """Fill None fields from rng. Without allow_held_out, a free shape/colour avoids HELD_OUT."""
    for _ in range(1000):
        shape = spec.shape or rng.choice(SHAPES)
        colour = spec.colour or rng.choice(COLOURS)
        if allow_held_out or (colour, shape) != HELD_OUT:
            break
    else:
        raise ValueError(f"spec {spec} can only be the held-out concept {HELD_OUT}")
    background = spec.background or rng.choice([c for c in BACKGROUNDS if c != colour])
    if background == colour:
        raise ValueError(f"background must differ from colour, both are {colour!r}")
    size = spec.size if spec.size is not None else rng.uniform(MIN_SIZE, MAX_SIZE)
    margin = size / 2 + 2
    x = spec.x if spec.x is not None else rng.uniform(margin, RESOLUTION - margin)
    y = spec.y if spec.y is not None else rng.uniform(margin, RESOLUTION - margin)
    return Spec(shape, colour, background, x, y, size)


def shape_polygons(shape: str, x: float, y: float, s: float) -> list[tuple[str, list]]:
    """Drawing ops for a shape whose bounding box is s x s around (x, y): ("fill"|"hole", points)."""
    r = s / 2
    if shape == "circle":
        return [("ellipse", [x - r, y - r, x + r, y + r])]
    if shape == "ring":
        q = r * 0.55
        return [("ellipse", [x - r, y - r, x + r, y + r]), ("hole", [x - q, y - q, x + q, y + q])]
    if shape == "square":
        q = r * 0.85
        return [("polygon", [(x - q, y - q), (x + q, y - q), (x + q, y + q), (x - q, y + q)])]
    if shape == "triangle":
        return [("polygon", [(x, y - r), (x + r, y + r), (x - r, y + r)])]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a) + r * 0.1))
        return [("polygon", pts)]
    if shape == "cross":
        w = r * 0.36
        return [("polygon", [(x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w),
                             (x + r, y + w), (x + w, y + w), (x + w, y + r), (x - w, y + r),
                             (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w)])]
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_mask(shape: str, x: float, y: float, s: float, resolution: int = RESOLUTION) -> Image.Image:
    """Anti-aliased 'L' mask (255 = shape) at `resolution`."""
    k = SUPERSAMPLE
    big = Image.new("L", (resolution * k, resolution * k), 0)
    draw = ImageDraw.Draw(big)
    for op, pts in shape_polygons(shape, x * k, y * k, s * k):
        if op == "ellipse":
            draw.ellipse(pts, fill=255)
        elif op == "hole":
            draw.ellipse(pts, fill=0)
        else:
            draw.polygon(pts, fill=255)
    return big.resize((resolution, resolution), Image.BOX)


def render(spec: Spec, seed: int = 0) -> Image.Image:
    """The RGB image of `spec`; None fields are drawn from `seed`. Same (spec, seed), same pixels."""
    spec = complete(spec, random.Random(seed))
    img = Image.new("RGB", (RESOLUTION, RESOLUTION), PALETTE[spec.background])
    fg = Image.new("RGB", (RESOLUTION, RESOLUTION), PALETTE[spec.colour])
    img.paste(fg, (0, 0), shape_mask(spec.shape, spec.x, spec.y, spec.size))
    return img


def article(text: str) -> str:
    """'a orange ...' -> 'an orange ...' (half of the captions keep the template's plain 'a')."""
    return re.sub(r"\ba orange\b", "an orange", text)


def caption(spec: Spec, rng: random.Random) -> str:
    """One caption of `spec`, in a randomly chosen form. Every word it states is true."""
    c, s, b = spec.colour, spec.shape, spec.background
    z = spec.size_word
    u = rng.random()
    if u < 0.55:
        name = f"{c} {s}"
    elif u < 0.75:
        name = s
    elif u < 0.85:
        name = f"{z} {c} {s}" if z else f"{c} {s}"
    elif u < 0.92:
        name = f"{z} {s}" if z else s
    else:
        name = f"{c} shape"
    v = rng.random()
    if v < 0.1:
        text = f"a {b} background with a {name}"
    else:
        text = rng.choice(PREFIXES).replace("[name]", name)
        if v < 0.7:
            text += f" on a {b} background"
    if rng.random() < 0.5:
        text = article(text)
    return text


def pretraining_sample(rng: random.Random) -> tuple[Spec, str]:
    """A random (spec, caption) pair of the pretraining distribution (never the held-out concept)."""
    spec = complete(Spec(), rng, allow_held_out=False)
    return spec, caption(spec, rng)


def dataset_specs(n: int = 12, seed: int = 1234) -> list[Spec]:
    """The demo dataset: the held-out concept at varied positions, sizes and backgrounds."""
    rng = random.Random(seed)
    backgrounds = [b for b in BACKGROUNDS if b != HELD_OUT[0]]
    specs = []
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]
        specs.append(complete(Spec(HELD_OUT[1], HELD_OUT[0], bg), rng))
    return specs


def make_dataset(folder: Path, n: int = 12, seed: int = 1234) -> list[Path]:
    """Write n PNGs of the held-out concept with sidecar captions that name all but the concept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(dataset_specs(n, seed)):
        path = folder / f"{HELD_OUT[0]}_{HELD_OUT[1]}_{i:02d}.png"
        render(spec).save(path)
        path.with_suffix(".txt").write_text(article(f"on a {spec.background} background") + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedtrain.demo.world", description=__doc__.split("\n")[0])
    p.add_argument("--make-dataset", metavar="DIR", help="write the demo dataset of the held-out concept")
    p.add_argument("--n", type=int, default=12, help="images in the demo dataset")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--samples", type=int, default=0, help="print this many pretraining captions")
    args = p.parse_args(argv)
    if args.make_dataset:
        paths = make_dataset(Path(args.make_dataset), args.n, args.seed)
        print(f"wrote {len(paths)} images + captions to {args.make_dataset}")
    rng = random.Random(args.seed)
    for _ in range(args.samples):
        spec, text = pretraining_sample(rng)
        print(f"{text!r:60} {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
