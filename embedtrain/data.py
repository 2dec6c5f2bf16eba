"""Training data: a folder of images -> captioned samples -> cached VAE latents -> an endless stream.

Image hygiene: EXIF orientation applied; RGBA/LA/P-with-transparency composited on white; CMYK,
16-bit and grayscale converted; truncated or unreadable files skipped with a reason for the run log.
Sampling (DESIGN.md): an endless stream of per-epoch shuffles, seeded; batches may straddle an epoch
boundary and no image is ever dropped, so the calculator's formulas are exact.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from embedtrain import EmbedtrainError
from embedtrain.calculator import split_counts

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64_000_000          # larger images are refused unread (decompression-bomb guard)
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "assets" / "templates"


class DataError(EmbedtrainError):
    """The dataset cannot be used; the message names the folder or file."""


@dataclass
class Sample:
    path: Path
    caption: str                 # [filewords]: sidecar .txt, else the cleaned file name
    image: "object" = None       # PIL.Image, RGB, resolution x resolution


@dataclass
class Skipped:
    path: Path
    reason: str


# ---------------------------------------------------------------- images
def to_rgb(img):
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white."""
    import numpy as np
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (PNG): scale 0..65535 to 0..255. Always the full 16-bit range: guessing the range
        # from the brightest pixel would turn a dark 16-bit image (all values < 256) into a bright one.
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def fit(img, resolution: int):
    """Resize the short side to `resolution` and center-crop a square."""
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def open_image(path: Path, resolution: int):
    """Load one training image ready for the VAE, or raise DataError with a reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DataError(f"{img.width}x{img.height} is over the {MAX_PIXELS // 1_000_000} MP limit")
                img.load()
                img = ImageOps.exif_transpose(img)
                img = to_rgb(img)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError("too many pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise DataError("not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"unreadable ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    except Exception as e:  # noqa: BLE001  PIL opens any format whatever the extension; one odd file
        # (struct.error, IndexError, MemoryError ... from some plugin) must cost that file, not the run.
        raise DataError(f"unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if min(img.size) < 8:
        raise DataError(f"only {img.width}x{img.height} pixels; at least 8x8 are needed")
    return fit(img, resolution)


def caption_for(path: Path) -> str:
    side = path.with_suffix(".txt")
    if side.is_file():
        return " ".join(side.read_text(encoding="utf-8", errors="replace").split())
    # A1111 style: "00012-a red ball" -> "a red ball"
    return re.sub(r"^\d+[-_ ]*", "", path.stem).replace("_", " ").strip()


def scan_folder(folder, resolution: int) -> tuple[list[Sample], list[Skipped]]:
    """Every usable image in `folder` (not recursive), sorted by name, and the skipped ones with reasons."""
    folder = Path(folder)
    if not str(folder).strip() or not folder.exists():
        raise DataError(f"data folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise DataError(f"data {folder} is a file; give the folder that holds the images")
    samples, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            samples.append(Sample(path, caption_for(path), open_image(path, resolution)))
        except DataError as e:
            skipped.append(Skipped(path, str(e)))
    if not samples:
        why = f"; skipped {len(skipped)}: " + "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:5]) \
            if skipped else ""
        raise DataError(f"data folder {folder} has no usable image ({', '.join(IMAGE_EXTS)}){why}")
    return samples, skipped


def split(samples: list, val_split: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, validation); the count rule is the calculator's, so numbers agree."""
    n_train, n_val = split_counts(len(samples), val_split)
    order = list(range(len(samples)))
    random.Random(f"split:{seed}").shuffle(order)
    val = sorted(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in set(val)], [samples[i] for i in val]


# ---------------------------------------------------------------- prompts
def load_templates(template: str) -> list[str]:
    path = Path(template) if Path(template).is_file() else TEMPLATE_DIR / f"{template}.txt"
    if not path.is_file():
        raise DataError(f"template {template!r} not found; use object, style, object_filewords, style_filewords, "
                        "filewords, name or a .txt file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"template file {path} has no lines")
    return lines


def make_prompt(template: str, name: str, caption: str) -> str:
    text = template.replace("[name]", name).replace("[filewords]", caption)
    return " ".join(text.split()).strip(" ,")


# ---------------------------------------------------------------- the stream
class Stream:
    """Position i of an endless sequence of per-epoch shuffles of n items (seeded, pure in i)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(f"order:{self.seed}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # only the current epoch is ever needed again
        return self._perms[epoch]

    def __getitem__(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        return self._perm(epoch)[pos]

    def take(self, start: int, count: int) -> list[int]:
        return [self[i] for i in range(start, start + count)]


# ---------------------------------------------------------------- latent cache
class LatentCache:
    """VAE latents of every image, encoded once (the VAE never runs in the training step).

    sampling: deterministic = posterior mean; once = one posterior sample drawn at caching time;
    random = keep mean and std and draw a fresh sample at each use (seeded by the caller).
    With flip, the mirrored image is encoded too (a mirrored latent is not the latent of a mirror).
    """

    def __init__(self, vae, images: list, device, sampling: str = "deterministic", flip: bool = False,
                 seed: int = 0, batch: int = 8):
        import numpy as np
        import torch

        self.sampling, self.flip = sampling, flip
        scale = vae.config.scaling_factor
        means, stds = [], []
        views = [images] + ([[im.transpose(0) for im in images]] if flip else [])  # 0 = FLIP_LEFT_RIGHT
        with torch.no_grad():
            for view in views:
                m_all, s_all = [], []
                for k in range(0, len(view), batch):
                    arr = np.stack([np.asarray(im, dtype=np.float32) for im in view[k:k + batch]])
                    x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(device) / 127.5 - 1.0
                    dist = vae.encode(x.to(vae.dtype)).latent_dist
                    m_all.append(dist.mean.float() * scale)
                    s_all.append(dist.std.float() * scale)
                means.append(torch.cat(m_all))
                stds.append(torch.cat(s_all))
        self.mean = torch.stack(means)          # [views, n, 4, h, w]
        self.std = torch.stack(stds)
        if sampling == "once":
            g = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn(self.mean.shape, generator=g).to(self.mean.device)
            self.mean = self.mean + self.std * noise
        if sampling != "random":
            self.std = None

    def __len__(self) -> int:
        return self.mean.shape[1]

    def get(self, idx: list[int], flips: list[bool] | None = None, noise=None):
        """Latents of images `idx` (mirrored where `flips`); `noise` draws the random-mode samples."""
        import torch

        view = torch.tensor([int(f) for f in flips] if (self.flip and flips) else [0] * len(idx))
        index = torch.tensor(idx)
        lat = self.mean[view, index]
        if self.std is not None:
            lat = lat + self.std[view, index] * noise
        return lat
