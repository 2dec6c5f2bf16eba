"""Preprocessing: a folder of images -> a new folder of training-ready PNGs, each with its caption beside it.

`python -m embedtrain prepare --data FOLDER --out NEW_FOLDER [--resolution 512] [--crop center|focal|none]
[--flip] [--split] [--caption-model MODEL]`; the web UI calls `prepare_folder` with the same options.

What it does to each image of --data (not recursive; the trainer's own reading, data.py: EXIF rotation,
transparency on white, CMYK/16-bit/grayscale to RGB, the decompression-bomb guard, the same skip reasons):
- resize so the short side is `resolution` (smaller images are upscaled, and the summary lists them);
- crop a `resolution` x `resolution` square: `center` (exactly the trainer's own crop, data.fit), `focal`
  (the square around the image's area of interest, see `focal_point`) or `none` (no crop: the aspect
  ratio is kept, for aspect-ratio buckets);
- `split`: an image whose long side is over SPLIT_RATIO (1.5) times its short side is cut into
  overlapping squares along its long side instead (see `tile_offsets` for how the overlap is chosen);
- `flip`: every output also gets a horizontally mirrored copy, NAME-flip.png. (The trainer's own flip
  option mirrors at random while training; use one or the other, not both.)

Names: NAME.png for source NAME.jpg; tiles NAME-1.png, NAME-2.png, ...; mirrored copies NAME-flip.png,
NAME-1-flip.png. Every output gets a NAME....txt caption: the source's caption file copied byte for byte;
where there is none, the caption the auto-captioner wrote (`caption_model`), else the caption the trainer
would have taken from the source's file name (so "-1"/"-flip" never leak into [filewords]).

Never over the originals: the output folder must be new or empty and neither the data folder nor inside
it; every file is created exclusively (an existing file is never replaced), so running twice into the
same folder is refused. Two sources whose outputs would share a name (a.jpg and a.png) are not merged:
the later one is skipped with the reason.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from embedtrain import shown
from embedtrain.config import MAX_RESOLUTION
from embedtrain.data import (MAX_PIXELS, DataError, Skipped, _image_files, _none_usable, caption_file_check,
                             caption_for, display_name, load_image)

CROPS = ("center", "focal", "none")
SPLIT_RATIO = 1.5         # --split cuts an image whose long side is over this many times its short side
SPLIT_MIN_OVERLAP = 0.2   # neighbouring tiles share at least this fraction of a tile (A1111's default)
FOCAL_SIDE = 256          # focal_point measures detail on the image reduced to at most this many pixels a side
FOCAL_CENTRE_PULL = 0.25  # crop focal centres its square this fraction of the way back to the centre
CAPTION_EXAMPLE = "Salesforce/blip-image-captioning-base"
CAPTION_MAX_TOKENS = 40   # a caption's length bound (CLIP reads about 75 tokens; BLIP says about 10-20)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")   # namespace/name (or a bare name)

Captioner = Callable[[object], str]   # a PIL RGB image -> its caption


class PrepareError(DataError):
    """A setting that cannot be used; `field` names it (out, resolution, crop, split, caption_model)
    and the message starts with that name, which the CLI turns into the flag (--out ...)."""

    def __init__(self, field_: str, message: str):
        super().__init__(message)
        self.field = field_


@dataclass
class Prepared:
    """One source image's outputs."""
    source: Path
    images: list[Path]           # the PNGs written, each with its .txt beside it
    caption_from: str            # "file" (its caption file, copied), "name" (its file name) or "captioner"
    upscaled: bool = False       # its short side was under the resolution


@dataclass
class PrepareResult:
    data: Path
    out: Path
    read: int                                        # image files found in the data folder
    prepared: list[Prepared] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def written(self) -> list[Path]:
        return [p for item in self.prepared for p in item.images]

    def summary(self) -> str:
        """What was read, written and skipped (and why), and where the outputs are: a few lines of text."""
        by = {k: sum(item.caption_from == k for item in self.prepared) for k in ("file", "name", "captioner")}
        captions = ", ".join(f"{n} {what}" for n, what in ((by["file"], "copied from caption files"),
                                                             (by["name"], "from file names"),
                                                             (by["captioner"], "by the captioner")) if n)
        lines = [f"read {self.read} image files in {display_name(self.data)}; wrote {len(self.written)} images "
                 f"from {len(self.prepared)} of them into {display_name(self.out)}"
                 + (f" (captions: {captions})" if captions else "") + f" in {self.seconds:.1f} s"]
        upscaled = [display_name(item.source.name) for item in self.prepared if item.upscaled]
        if upscaled:
            lines.append(f"upscaled {len(upscaled)} (short side under the resolution): " + ", ".join(upscaled[:10])
                         + (", ..." if len(upscaled) > 10 else ""))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {display_name(s.path.name)}: {s.reason}" for s in self.skipped]
        lines.append(f"output folder: {display_name(self.out)}")
        return "\n".join(lines)


# ---------------------------------------------------------------- checks
def check_resolution(value) -> int:
    """The resolution as an int, or PrepareError: a multiple of 8 from 8 to config.MAX_RESOLUTION."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if not (8 <= n <= MAX_RESOLUTION and n % 8 == 0):
        raise PrepareError("resolution", f"resolution must be a multiple of 8 from 8 to {MAX_RESOLUTION} pixels "
                                         f"(512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL), got {shown(value)}")
    return n


def check_options(resolution, crop: str, split: bool) -> int:
    """PrepareError for a bad resolution, crop or combination; the resolution as an int."""
    n = check_resolution(resolution)
    if crop not in CROPS:
        raise PrepareError("crop", f"crop must be one of {', '.join(CROPS)}, got {shown(crop)}")
    if split and crop == "none":
        raise PrepareError("split", "split cuts square tiles; it cannot go with crop none (which keeps every "
                                    "image's aspect ratio). Choose one")
    return n


def check_out_folder(data, out) -> Path:
    """PrepareError unless `out` is a new or empty folder that is neither the data folder nor inside it."""
    if not str(out).strip():
        raise PrepareError("out", "out must name a new or empty folder for the prepared images")
    src, dst = Path(data).resolve(), Path(out).resolve()
    where = f"out {display_name(out)}"
    if dst == src:
        raise PrepareError("out", f"{where} is the data folder itself; give a new or empty folder outside it "
                                  "(prepare never writes beside the originals)")
    if src in dst.parents:
        raise PrepareError("out", f"{where} is inside the data folder {display_name(data)}; give a new or empty "
                                  "folder outside it (prepare never writes beside the originals)")
    try:
        if dst.exists() and not dst.is_dir():
            raise PrepareError("out", f"{where} is a file; give a new or empty folder")
        above = next((p for p in dst.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise PrepareError("out", f"{where} cannot be made: {display_name(above)} is a file; give a new or "
                                      "empty folder")
        count = sum(1 for _ in dst.iterdir()) if dst.exists() else 0
    except OSError as e:
        raise PrepareError("out", f"{where} cannot be read ({e.strerror or e}); give a new or empty folder") from None
    if count:
        raise PrepareError("out", f"{where} is not empty ({count} entries, a previous run's?); give a new or empty "
                                  "folder: prepare never writes over existing files")
    return Path(out)


# ---------------------------------------------------------------- images (pure)
def resize_short_side(img, resolution: int):
    """The short side to `resolution`, the aspect ratio kept: data.fit's resize, so a center crop of this
    is pixel for pixel the trainer's own."""
    from PIL import Image

    return img.resize(resized_size(img.size, resolution), Image.Resampling.LANCZOS)


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `resolution` (data.fit's rounding)."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def focal_point(img) -> tuple[float, float]:
    """(x, y) of the image's area of interest, as fractions of its width and height (0.5, 0.5 = centre).

    Deterministic and cheap: the image, in grayscale and reduced to at most FOCAL_SIDE pixels a side, gets
    each pixel's detail energy = the squared gradient magnitude (numpy.gradient; squared so that a few strong
    edges outweigh a wide smooth gradient or faint noise). The point is the energy-weighted centroid; a flat
    image (no detail at all) gives the centre. crop_boxes then adds the bias to the centre.
    """
    import numpy as np
    from PIL import Image

    gray = img.convert("L")
    k = max(gray.size) / FOCAL_SIDE
    if k > 1:
        gray = gray.resize((max(1, round(gray.width / k)), max(1, round(gray.height / k))), Image.Resampling.BOX)
    a = np.asarray(gray, dtype=np.float64)
    if min(a.shape) < 2:
        return 0.5, 0.5
    gy, gx = np.gradient(a)
    energy = gx * gx + gy * gy
    total = energy.sum()
    if total <= 1e-9:
        return 0.5, 0.5
    h, w = energy.shape
    cx = float((energy.sum(axis=0) * (np.arange(w) + 0.5)).sum() / total / w)
    cy = float((energy.sum(axis=1) * (np.arange(h) + 0.5)).sum() / total / h)
    return cx, cy


def _focal_start(focus: float, length: int, n: int) -> int:
    """Where a square of side n starts along `length` for crop focal: centred on the focus point moved
    FOCAL_CENTRE_PULL (a quarter) of the way back to the image's centre, but by no more than a quarter of
    the square (so the point stays in the square's middle half), then kept inside the image."""
    p, c = focus * length, length / 2
    p -= math.copysign(min(FOCAL_CENTRE_PULL * abs(p - c), n / 4), p - c)
    return min(max(round(p - n / 2), 0), length - n)


def tile_offsets(length: int, tile: int) -> list[int]:
    """Where the square tiles of --split start along a long side of `length` pixels (short side = `tile`).

    The overlap: count = ceil((length - tile * o) / (tile * (1 - o))) with o = SPLIT_MIN_OVERLAP (0.2), the
    fewest tiles that cover the side with neighbours sharing at least a fifth of a tile; they are then
    spread evenly, the first at 0 and the last ending at `length`, so the actual overlap is that fifth or
    more (a 1:1.6 image gives 2 tiles sharing 0.4 of a tile, 1:2 gives 3 sharing half, 1:3 gives 4 sharing
    a third)."""
    if length <= tile:
        return [0]
    count = max(2, math.ceil((length - tile * SPLIT_MIN_OVERLAP) / (tile * (1 - SPLIT_MIN_OVERLAP))))
    step = (length - tile) / (count - 1)
    return [round(i * step) for i in range(count)]


def crop_boxes(size: tuple[int, int], resolution: int, crop: str, split: bool,
               focus: tuple[float, float] = (0.5, 0.5)) -> list[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes to cut from an image already resized to `size` (short side =
    resolution): one square (center / focal around `focus`), the whole image (none), or --split's tiles
    when split is set and the long side is over SPLIT_RATIO times the short one."""
    w, h = size
    n = resolution
    if crop == "none":
        return [(0, 0, w, h)]
    if split and max(w, h) > SPLIT_RATIO * min(w, h):
        if w >= h:
            return [(x, 0, x + n, n) for x in tile_offsets(w, n)]
        return [(0, y, n, y + n) for y in tile_offsets(h, n)]
    if crop == "focal":
        left, top = _focal_start(focus[0], w, n), _focal_start(focus[1], h, n)
    else:   # center, exactly data.fit's offsets
        left, top = (w - n) // 2, (h - n) // 2
    return [(left, top, left + n, top + n)]


def render(img, resolution: int, crop: str = "center", split: bool = False, flip: bool = False) -> list:
    """One RGB image -> [(name suffix, image), ...]: ("", square) or ("-1", tile), ("-2", tile) ...,
    each followed by its ("...-flip", mirror) when flip is set."""
    from PIL import Image

    w, h = resized_size(img.size, resolution)
    if w * h > MAX_PIXELS:   # a thin strip: 8x2000 px at 512 would be 512x128000
        raise DataError(f"{img.width}x{img.height} resized to {resolution} px on its short side would be {w}x{h}, "
                        f"over the {MAX_PIXELS // 1_000_000} MP limit")
    resized = resize_short_side(img, resolution)
    focus = focal_point(resized) if crop == "focal" else (0.5, 0.5)
    boxes = crop_boxes(resized.size, resolution, crop, split, focus)
    outputs = []
    for i, box in enumerate(boxes, start=1):
        part = resized if box == (0, 0, *resized.size) else resized.crop(box)
        suffix = f"-{i}" if len(boxes) > 1 else ""
        outputs.append((suffix, part))
        if flip:
            outputs.append((suffix + "-flip", part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return outputs


# ---------------------------------------------------------------- captions
def load_captioner(model: str) -> Captioner:
    """transformers' image-to-text pipeline for `model` (a local folder or a hub id) as a Captioner, or
    PrepareError("caption_model") saying what to give. transformers 5 replaced the image-to-text task by
    image-text-to-text (which needs a prompt: an empty one, so a captioner such as BLIP captions freely)."""
    if not str(model).strip():
        raise PrepareError("caption_model", "caption_model is empty; give a local folder or hub id of an "
                                            f"image-to-text model such as a BLIP captioner ({CAPTION_EXAMPLE})")
    local = Path(str(model)).expanduser()
    if local.exists():
        model = str(local)
    elif not HUB_ID.fullmatch(str(model)):
        raise PrepareError("caption_model", f"caption_model {shown(model)} is neither a folder nor a hub id "
                                            "(namespace/name); give a local folder or hub id of an image-to-text "
                                            f"model such as a BLIP captioner ({CAPTION_EXAMPLE})")
    try:
        from transformers import pipeline
        from transformers.pipelines import SUPPORTED_TASKS
    except ImportError:
        raise PrepareError("caption_model", "caption_model needs the transformers package (pip install "
                                            "transformers torch)") from None
    task = "image-to-text" if "image-to-text" in SUPPORTED_TASKS else "image-text-to-text"
    try:
        import torch
        device = 0 if torch.cuda.is_available() else -1
        pipe = pipeline(task, model=model, device=device)
    except Exception as e:  # noqa: BLE001  a missing folder, an unknown id, no network, a model of another kind
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PrepareError("caption_model", f"caption_model {shown(model)} cannot be loaded as an image-to-text "
                                            f"model ({why}); give a local folder or hub id of an image-to-text "
                                            f"model such as a BLIP captioner ({CAPTION_EXAMPLE})") from None
    if task == "image-text-to-text":
        return lambda img: _generated_text(pipe(images=img, text="", max_new_tokens=CAPTION_MAX_TOKENS))
    return lambda img: _generated_text(pipe(img, max_new_tokens=CAPTION_MAX_TOKENS))


def _generated_text(result) -> str:
    """The caption in a pipeline's answer: a str, {"generated_text": ...} or lists of those."""
    while isinstance(result, (list, tuple)) and result:
        result = result[0]
    if isinstance(result, dict):
        result = result.get("generated_text", "")
    return " ".join(str(result or "").split())


def _caption(path: Path, img, captioner: Captioner | None) -> tuple[bytes, str]:
    """(the caption file's bytes, where it came from: file / captioner / name), or DataError."""
    side = path.with_suffix(".txt")
    if side.is_file():
        try:
            return side.read_bytes(), "file"
        except OSError as e:
            raise DataError(f"caption file {display_name(side.name)} cannot be read ({e.strerror or e})") from None
    if captioner is None:
        return caption_for(path).encode("utf-8"), "name"
    try:
        text = _generated_text(captioner(img))
    except Exception as e:  # noqa: BLE001  one image the model chokes on costs that image, not the run
        raise DataError(f"the captioner failed ({type(e).__name__}: {str(e)[:100]})") from None
    if not text:
        raise DataError("the captioner returned no text")
    return text.encode("utf-8"), "captioner"


# ---------------------------------------------------------------- writing
def _write_new(path: Path, data: bytes) -> None:
    """Create `path` with `data`; FileExistsError if it exists (never replaced). A failed write leaves no file."""
    fh = open(path, "xb")
    try:
        with fh:
            fh.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_outputs(out: Path, stem: str, outputs: list, caption: bytes) -> list[Path]:
    """Each (suffix, image) as out/STEM+suffix.png with its .txt; on any failure the ones written are removed."""
    done: list[Path] = []
    try:
        for suffix, img in outputs:
            for path, data in ((out / f"{stem}{suffix}.png", _png_bytes(img)), (out / f"{stem}{suffix}.txt", caption)):
                _write_new(path, data)
                done.append(path)
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return [p for p in done if p.suffix == ".png"]


def _prepare_one(path: Path, out: Path, resolution: int, crop: str, split: bool, flip: bool,
                 captioner: Captioner | None, taken: dict[str, Path]) -> Prepared:
    """One source image's outputs written, or DataError with the reason it is skipped."""
    caption_file_check(path)
    img = load_image(path)
    outputs = render(img, resolution, crop, split, flip)
    names = [f"{path.stem}{suffix}" for suffix, _ in outputs]
    for name in names:   # casefolded: on Windows and macOS a.png and A.png are one file
        if name.casefold() in taken:
            raise DataError(f"its output {display_name(name)}.png is already written from "
                            f"{display_name(taken[name.casefold()].name)} (the same file name stem); rename one")
    caption, source = _caption(path, img, captioner)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = _write_outputs(out, path.stem, outputs, caption)
    except FileExistsError as e:
        raise DataError(f"its output {display_name(Path(e.filename or '').name)} already exists in the output "
                        "folder (written by something else meanwhile); nothing replaced") from None
    except OSError as e:
        raise PrepareError("out", f"out {display_name(out)}: cannot write {display_name(path.stem)}'s outputs "
                                  f"({e.strerror or e})") from None
    taken.update({name.casefold(): path for name in names})
    return Prepared(path, written, source, upscaled=min(img.size) < resolution)


def prepare_folder(data, out, resolution=512, crop: str = "center", flip: bool = False, split: bool = False,
                   caption_model: str = "", captioner: Captioner | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> PrepareResult:
    """Prepare every image of the folder `data` into the new or empty folder `out` (see the module's
    docstring); the input folder is only read. `captioner` (a callable PIL image -> caption) is used for
    images without a caption file; else `caption_model` is loaded as one (load_captioner) when such an
    image exists. `progress(done, total, file name)` is called before each image.

    PrepareError (its .field names the setting) for bad settings, before anything is written; DataError
    when the folder has no usable image. Images that cannot be used are skipped with the reason."""
    start = time.monotonic()
    resolution = check_options(resolution, crop, split)
    files = _image_files(data)
    out = check_out_folder(data, out)
    if captioner is None and str(caption_model or "").strip() and any(
            not p.with_suffix(".txt").is_file() for p in files):
        captioner = load_captioner(caption_model)
    result = PrepareResult(Path(data), out, len(files))
    taken: dict[str, Path] = {}
    for i, path in enumerate(files):
        if progress:
            progress(i, len(files), display_name(path.name))
        try:
            result.prepared.append(_prepare_one(path, out, resolution, crop, split, flip, captioner, taken))
        except PrepareError:
            raise
        except DataError as e:
            result.skipped.append(Skipped(path, str(e)))
    if not result.prepared:
        raise _none_usable(data, result.skipped)
    result.seconds = time.monotonic() - start
    return result


# ---------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit code 2, instead of argparse's usage block."""
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m embedtrain prepare", allow_abbrev=False,
                description="Resize and crop a folder of images for training into a new folder, each output "
                            "with its caption (.txt) beside it. The input folder is only read.")
    p.add_argument("--data", required=True, help="folder of source images (png/jpg/jpeg/webp/bmp), captions in "
                                                 "sidecar .txt files")
    p.add_argument("--out", required=True, help="new or empty folder for the prepared images (not inside --data)")
    p.add_argument("--resolution", default="512", help="short side, and square side, in pixels: a multiple of 8 "
                                                       "(default 512; 768 for SD 2.x, 1024 for SDXL)")
    p.add_argument("--crop", default="center", choices=CROPS,
                   help="center (the trainer's own crop), focal (the square around the most detailed area) or "
                        "none (resize only, keep the aspect ratio); default center")
    p.add_argument("--flip", action="store_true", help="also write a mirrored copy of each output, NAME-flip.png")
    p.add_argument("--split", action="store_true",
                   help=f"cut images whose long side is over {SPLIT_RATIO}x the short side into overlapping "
                        "square tiles NAME-1.png, NAME-2.png, ... instead of cropping them")
    p.add_argument("--caption-model", default="", metavar="MODEL",
                   help="caption images that have no .txt with this image-to-text model (a local folder or hub "
                        f"id, e.g. {CAPTION_EXAMPLE}); needs transformers")
    return p


def cli(argv=None) -> int:
    """`python -m embedtrain prepare ...`: 0 and the summary on stdout; 2 and one line on stderr otherwise."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:   # --help (0) or an argparse error already printed (2)
        return stop.code if isinstance(stop.code, int) else 2

    def report(done: int, total: int, name: str) -> None:
        print(f"[{done + 1}/{total}] {name}", file=sys.stderr, flush=True)

    try:
        result = prepare_folder(args.data, args.out, args.resolution, args.crop, args.flip, args.split,
                                caption_model=args.caption_model, progress=report)
    except DataError as e:
        text, name = str(e), getattr(e, "field", "")
        if name and text.startswith(name):
            text = "--" + name.replace("_", "-") + text[len(name):]
        print(f"error: {text}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
