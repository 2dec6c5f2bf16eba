"""The demo world's judge: reads shape, colour and background from an image of the demo world.

Rule-based and deterministic (no training):
- background: the majority colour class of the image's border pixels;
- foreground: pixels far from the background colour (threshold at half the distance between the
  background and the shape's core colour, so anti-aliased edges split where the renderer blended);
  the largest 4-connected component is the shape (specks of a generated image are ignored);
- colour: hue-based class of the median core colour (black/white from value/saturation), so a
  drifted purple is still purple;
- shape: the component's bounding box, resampled to 24 x 24, compared (mean absolute difference)
  with each shape's canonical mask resampled from its own bounding box: robust to size, position,
  blur and a stretched aspect ratio.

Used by the scores (demo.score), the demo pretraining's reconstruction check (demo.pretrain) and the
grid's demo-score lines (grid.demo_score_lines); it imports neither of them.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from embedtrain.demo.world import RESOLUTION, SHAPES, Spec, shape_mask

GRID = 24                    # side of the normalised shape mask

# Hue boundaries (degrees) halfway between the palette's hues: red 0, orange 29, yellow 55,
# green 129, blue 227, purple 278.
HUE_BINS = ((15, "red"), (42, "orange"), (92, "yellow"), (178, "green"), (252, "blue"), (318, "purple"),
            (361, "red"))


def colour_class(rgb) -> str:
    """Palette name of an RGB colour (0-255), by hue; black and white by value and saturation."""
    r, g, b = (float(c) / 255 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if v < 0.3:
        return "black"
    if s < 0.3:
        return "white" if v > 0.6 else "black"
    deg = h * 360
    for upper, name in HUE_BINS:
        if deg < upper:
            return name
    return "red"


@lru_cache(maxsize=None)
def canonical_masks() -> dict[str, np.ndarray]:
    """Each shape's mask cropped to its bounding box and resampled to GRID x GRID (float 0..1)."""
    out = {}
    for shape in SHAPES:
        m = np.asarray(shape_mask(shape, 128, 128, 200, resolution=256), dtype=np.float32) / 255
        out[shape] = _crop_resize(m, m > 0.5)
    return out


def _crop_resize(soft: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = Image.fromarray((soft[y0:y1, x0:x1] * 255).astype(np.uint8))
    return np.asarray(crop.resize((GRID, GRID), Image.BILINEAR), dtype=np.float32) / 255


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (an iterative flood fill, no scipy)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        label += 1
        stack, size = [(sy, sx)], 0
        labels[sy, sx] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


@dataclass
class Judgement:
    shape: str | None
    colour: str | None
    background: str


def judge(image: Image.Image) -> Judgement:
    """Read shape, colour and background from an image of the demo world."""
    img = image.convert("RGB")
    if img.size != (RESOLUTION, RESOLUTION):
        img = img.resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    classes = [colour_class(p) for p in border]
    background = max(set(classes), key=classes.count)
    bg_ref = np.median(border[[c == background for c in classes]], axis=0)
    dist = np.linalg.norm(a - bg_ref, axis=2)
    if dist.max() < 40:
        return Judgement(None, None, background)
    core = dist > 0.75 * dist.max()
    fg_ref = np.median(a[core], axis=0)
    split = 0.5 * np.linalg.norm(fg_ref - bg_ref)
    mask = _largest_component(dist > split)
    if mask.sum() < 6:
        return Judgement(None, None, background)
    colour = colour_class(np.median(a[mask & core], axis=0) if (mask & core).any() else fg_ref)
    soft = np.clip(dist / max(2 * split, 1e-6), 0, 1) * mask_dilate(mask)
    norm = _crop_resize(soft, mask)
    errors = {s: float(np.abs(norm - m).mean()) for s, m in canonical_masks().items()}
    return Judgement(min(errors, key=errors.get), colour, background)


def mask_dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (keeps the anti-aliased rim of the component in the soft mask)."""
    m = mask.copy()
    m[1:] |= mask[:-1]
    m[:-1] |= mask[1:]
    m[:, 1:] |= mask[:, :-1]
    m[:, :-1] |= mask[:, 1:]
    return m


def agrees(j: Judgement, want: Spec) -> bool:
    """True when every attribute `want` names (non-None) is what the judge read."""
    return all(getattr(want, k) is None or getattr(want, k) == getattr(j, k)
               for k in ("shape", "colour", "background"))


def score_images(images, prompts_specs) -> float:
    """Fraction of images whose judged attributes match what their prompt asked for.

    Args:
        images: PIL images of the demo world.
        prompts_specs: one `Spec` per image (None fields are not checked), or (prompt, Spec) pairs.
    """
    if len(images) != len(prompts_specs):
        raise ValueError(f"images and prompts_specs must have the same length, got {len(images)} and "
                         f"{len(prompts_specs)}")
    specs = [ps[1] if isinstance(ps, tuple) else ps for ps in prompts_specs]
    if not specs:
        return 0.0
    return sum(agrees(judge(im), sp) for im, sp in zip(images, specs)) / len(specs)


def clean_accuracy(n: int = 500, seed: int = 0) -> dict:
    """The judge on clean renders of random specs (the held-out concept included)."""
    import random
    from embedtrain.demo.world import complete, render
    rng = random.Random(seed)
    right = {"shape": 0, "colour": 0, "background": 0, "all": 0}
    for i in range(n):
        spec = complete(Spec(), rng)
        j = judge(render(spec, i))
        ok = {k: getattr(j, k) == getattr(spec, k) for k in ("shape", "colour", "background")}
        for k, v in ok.items():
            right[k] += v
        right["all"] += all(ok.values())
    return {k: v / n for k, v in right.items()}
