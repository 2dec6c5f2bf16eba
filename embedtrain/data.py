"""Training data: a folder of images -> captioned samples -> cached VAE latents -> an endless stream.

Image hygiene: EXIF orientation applied; RGBA/LA/P-with-transparency composited on white; CMYK,
16-bit and grayscale converted; truncated or unreadable files skipped with a reason for the run log.
The trainer decodes every image (scan_folder); the web UI only looks (inspect_folder): the same
usable/skipped split from headers and cheap checks, and thumbnails decoded within a pixel budget.
Sampling: an endless stream of per-epoch shuffles, seeded; batches may straddle an epoch
boundary and no image is ever dropped, so the calculator's formulas are exact.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from embedtrain import ASSETS, EmbedtrainError
from embedtrain.calculator import split_counts

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64_000_000          # larger images are refused unread (decompression-bomb guard)
# The web UI decodes no image larger than this (counted after JPEG's reduced decoding) to check it or
# draw its thumbnail: a 64 MP 16-bit PNG took the server from 186 MB to 1.9 GB. Larger ones are
# checked from their header (and PNG chunk checksums) and shown as a placeholder; the trainer loads them.
PREVIEW_MAX_PIXELS = 16_000_000
# A caption is a sentence or a list of tags (CLIP reads 75 tokens, a few hundred bytes); a bigger .txt is
# not a caption (a log, a misnamed file) and its image is skipped with the reason, never read whole.
MAX_CAPTION_BYTES = 64 * 1024
MAX_TEMPLATE_BYTES = 256 * 1024  # a template file: one prompt per line, a few dozen lines
TEMPLATE_DIR = ASSETS / "templates"


class DataError(EmbedtrainError):
    """The dataset cannot be used; the message names the folder or file."""


# Inside `shared_data()`: what scan_folder and LatentCache already made, by what they were made from.
_SHARED: ContextVar[dict | None] = ContextVar("embedtrain_shared_data", default=None)


@contextmanager
def shared_data():
    """Within this block a folder scanned again (same folder, same resolution) gives the first scan's
    samples, and the same images encoded again (same VAE, device and settings, batch included) the first
    latents. Several Trainers built in the block on one dataset (the study's four runs) so decode the
    images once and encode them once per batch size, and all of them train on the same data even if the
    folder changes meanwhile. Nested blocks share the outer one's store."""
    token = _SHARED.set(_SHARED.get() if _SHARED.get() is not None else {})
    try:
        yield
    finally:
        _SHARED.reset(token)


@dataclass
class Sample:
    path: Path
    caption: str                 # [filewords]: sidecar .txt, else the cleaned file name
    image: "object" = None       # PIL.Image, RGB, resolution x resolution (inspect_folder: a thumbnail or None)
    note: str = ""               # inspect_folder: why there is no thumbnail (too many pixels to decode)
    size: tuple = (0, 0)         # the original image's (width, height), EXIF rotation applied
    crop: tuple = (0, 0)         # (top, left) of the training crop in the resized image


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
        # Integer rounding (v * 255 + 32767) // 65535 is v / 65535 * 255 rounded half up, exactly (no ties
        # exist), in 4 bytes a pixel instead of float64's 8.
        arr = np.asarray(img).astype(np.int32)
        np.clip(arr, 0, 65535, out=arr)
        arr *= 255
        arr += 32767
        arr //= 65535
        img = Image.fromarray(arr.astype(np.uint8), "L")
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
    """Resize the short side to `resolution` and center-crop a square: (image, (top, left) of the crop in
    the resized image), the offset SDXL's micro-conditioning is told."""
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution)), (top, left)


@contextmanager
def _image_errors():
    """Whatever PIL raises for one file becomes a DataError with the reason the run log shows."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError("too many pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise DataError("not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(display_name(f"unreadable ({(str(e).splitlines() or [type(e).__name__])[0][:120]})")) \
            from None
    except Exception as e:  # noqa: BLE001  PIL opens any format whatever the extension; one odd file
        # (struct.error, IndexError, MemoryError ... from some plugin) must cost that file, not the run.
        raise DataError(display_name(f"unreadable ({type(e).__name__}: {str(e)[:100]})")) from None


def _check_header(img) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise DataError(f"{img.width}x{img.height} is over the {MAX_PIXELS // 1_000_000} MP limit")


def _check_size(width: int, height: int) -> None:
    if min(width, height) < 8:
        raise DataError(f"only {width}x{height} pixels; at least 8x8 are needed")


def load_image(path: Path):
    """One image as 8-bit RGB at its full size, EXIF rotation applied, or DataError with the reason a run log
    shows (the trainer's and `prepare`'s image handling)."""
    from PIL import Image, ImageOps

    with _image_errors():
        with Image.open(path) as img:
            _check_header(img)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    _check_size(*img.size)
    return img


def open_image(path: Path, resolution: int):
    """One training image ready for the VAE: (image, original (width, height), (top, left) of the crop), or
    DataError with a reason."""
    img = load_image(path)
    size = img.size
    img, crop = fit(img, resolution)
    return img, size, crop


def look_at_image(path: Path, thumb: int | None = None, max_pixels: int = PREVIEW_MAX_PIXELS):
    """The web UI's check of one image: (thumbnail or None, note), or DataError with the trainer's reason.

    Never decodes more than `max_pixels`: a JPEG is decoded at a reduced scale (1/2 to 1/8, its draft
    mode), anything else whole only when it fits the budget; a larger image is judged by its header
    alone (a PNG also by the checksum of every chunk, which finds a truncated or damaged file) and gets
    no thumbnail, only a note. `thumb`: the thumbnail's side in pixels (RGB, square); None = only check,
    then a PNG is never decoded (its checksums suffice) and a JPEG only at 1/8 scale.
    """
    from PIL import Image, ImageOps

    with _image_errors():
        with Image.open(path) as img:
            _check_header(img)
            w, h = img.size
            if img.format == "JPEG":   # no checksum: decoding (at 1/8 scale to check, 2x the thumb to show) finds damage
                img.draft(None, (2 * thumb, 2 * thumb) if thumb else (8, 8))
            decode = img.width * img.height <= max_pixels and (thumb or img.format != "PNG")
            if not decode:
                if img.format == "PNG":
                    img.verify()
                _check_size(w, h)
                note = "" if not thumb else (f"{w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels // 1_000_000} "
                                             "MP a thumbnail may decode; training still loads it")
                return None, note
            img.load()
            if not thumb:
                _check_size(w, h)
                return None, ""
            k = min(img.size) // (2 * thumb)
            if k > 4:   # pick every n-th pixel down to ~4x the thumbnail first: every other way (a box filter,
                # a mode conversion) copies the whole image (RGBA premultiplied, 16-bit widened)
                img = img.resize((max(1, img.width * 4 // k), max(1, img.height * 4 // k)),
                                 Image.Resampling.NEAREST)
                k = min(img.size) // (2 * thumb)
            if img.mode.startswith("I;16"):
                img = img.convert("I")      # 16-bit greyscale cannot be reduced; to_rgb scales "I" the same way
            if img.mode in ("1", "P", "PA"):
                img = to_rgb(img)           # palette indices must not be averaged
            if k > 1:
                img = img.reduce(k)         # box average; the EXIF tag stays with it
            img = to_rgb(ImageOps.exif_transpose(img))
    _check_size(w, h)
    return fit(img, thumb)[0], ""


def display_name(name) -> str:
    """A file name (or path) as text that can be printed, tokenized and sent as JSON. Linux names are
    bytes; Python keeps bytes that are not UTF-8 as lone surrogates ('caf\\udce9'), which the tokenizer,
    a UTF-8 console and JSON refuse. They become U+FFFD here ('caf\ufffd')."""
    name = str(name)
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:   # a surrogate that did not come from a file name's bytes
        return name.encode("utf-8", "replace").decode("utf-8")


def caption_file_check(path: Path) -> None:
    """DataError when the image's caption file is too big to be a caption (MAX_CAPTION_BYTES)."""
    side = path.with_suffix(".txt")
    try:
        size = side.stat().st_size if side.is_file() else 0
    except OSError:
        size = 0
    if size > MAX_CAPTION_BYTES:
        raise DataError(f"caption file {display_name(side.name)} holds {size:,} bytes; a caption may hold at most "
                        f"{MAX_CAPTION_BYTES // 1024} KB (the text encoder reads about 75 tokens). Shorten it "
                        "or move it away")


def caption_for(path: Path) -> str:
    """[filewords] of an image: its sidecar .txt (at most MAX_CAPTION_BYTES of it are read), else its name."""
    side = path.with_suffix(".txt")
    if side.is_file():
        with open(side, "rb") as fh:
            text = fh.read(MAX_CAPTION_BYTES).decode("utf-8", errors="replace")
        return " ".join(text.split())
    # A1111 style: "00012-a red ball" -> "a red ball"
    return re.sub(r"^\d+[-_ ]*", "", display_name(path.stem)).replace("_", " ").strip()


def _image_files(folder) -> list[Path]:
    folder = Path(folder)
    if not str(folder).strip() or not folder.exists():
        raise DataError(f"data folder {display_name(folder)!r} does not exist")
    if not folder.is_dir():
        raise DataError(f"data {display_name(folder)} is a file; give the folder that holds the images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _none_usable(folder, skipped: list[Skipped]) -> DataError:
    why = f"; skipped {len(skipped)}: " + "; ".join(f"{display_name(s.path.name)}: {s.reason}"
                                                     for s in skipped[:5]) if skipped else ""
    return DataError(f"data folder {display_name(folder)} has no usable image ({', '.join(IMAGE_EXTS)}){why}")


def scan_folder(folder, resolution: int) -> tuple[list[Sample], list[Skipped]]:
    """Every usable image in `folder` (not recursive), sorted by name, and the skipped ones with reasons.
    Inside `shared_data()`, a folder already scanned at this resolution is not read again."""
    shared = _SHARED.get()
    key = ("scan", os.path.abspath(folder), resolution) if shared is not None else None
    if key in (shared or {}):
        samples, skipped = shared[key]
        return list(samples), list(skipped)   # new lists: callers may extend them (the trainer's skipped)
    samples, skipped = [], []
    for path in _image_files(folder):
        try:
            caption_file_check(path)
            image, size, crop = open_image(path, resolution)
            samples.append(Sample(path, caption_for(path), image, size=size, crop=crop))
        except DataError as e:
            skipped.append(Skipped(path, str(e)))
    if not samples:
        raise _none_usable(folder, skipped)
    if key is not None:
        shared[key] = (list(samples), list(skipped))
    return samples, skipped


def inspect_folder(folder, thumb: int = 96, thumbs: int = 24,
                   max_pixels: int = PREVIEW_MAX_PIXELS) -> tuple[list[Sample], list[Skipped]]:
    """scan_folder's usable/skipped split without loading the images (look_at_image), for the web UI:
    the first `thumbs` usable images get a `thumb`-pixel thumbnail (or a note saying why not)."""
    samples, skipped = [], []
    for path in _image_files(folder):
        try:
            caption_file_check(path)
            image, note = look_at_image(path, thumb if len(samples) < thumbs else None, max_pixels)
            samples.append(Sample(path, caption_for(path), image, note))
        except DataError as e:
            skipped.append(Skipped(path, str(e)))
    if not samples:
        raise _none_usable(folder, skipped)
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
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise DataError(f"template file {display_name(path)} holds {path.stat().st_size:,} bytes; a template file "
                        f"may hold at most {MAX_TEMPLATE_BYTES // 1024} KB (one prompt per line)")
    with open(path, "rb") as fh:
        text = fh.read(MAX_TEMPLATE_BYTES).decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"template file {path} has no lines")
    return lines


def vary_caption(caption: str, rng, shuffle: bool = False, keep: int = 0, tag_dropout: float = 0.0,
                 caption_dropout: float = 0.0) -> str:
    """One sample's caption: with probability caption_dropout none at all; else its comma-separated tags,
    the first `keep` in place, each other one dropped with probability tag_dropout, the rest shuffled
    (kohya's --shuffle_caption, --keep_tokens, --caption_tag_dropout_rate, --caption_dropout_rate).
    `rng` (random.Random) is the sample's own, so a run replays exactly."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    if not (shuffle or tag_dropout):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    if tag_dropout:
        tail = [t for t in tail if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(tail)
    return ", ".join(head + tail)


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
    Inside `shared_data()`, images already encoded the same way are not encoded again.
    """

    def __init__(self, vae, images: list, device, sampling: str = "deterministic", flip: bool = False,
                 seed: int = 0, batch: int = 8):
        self.sampling, self.flip = sampling, flip
        shared = _SHARED.get()
        # by identity: the same VAE and the same image objects (a shared scan's); the entry keeps them alive
        key = ("latents", id(vae), tuple(map(id, images)), str(device), sampling, flip, seed, batch)
        if shared is not None and key in shared:
            self.mean, self.std = shared[key][2:]
            return
        self._encode(vae, images, device, sampling, flip, seed, batch)
        if shared is not None:
            shared[key] = (vae, list(images), self.mean, self.std)

    def _encode(self, vae, images, device, sampling, flip, seed, batch) -> None:
        import numpy as np
        import torch

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
