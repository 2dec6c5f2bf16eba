"""Seed-locked comparison grids of several embeddings.

A grid has one row per (prompt, seed) and one column per embedding (`swap_axes` turns it), plus an
optional baseline column (the init text, or no embedding at all). The model loads once; every
embedding is loaded under its own internal tokens, and prompts name it with a placeholder (`{}` or
`[name]`). Every cell's starting latents come from a CPU `torch.Generator` freshly seeded with its
row's seed, so all columns start from the same noise (a cell is exactly the image
`pipe(prompt, generator=torch.Generator().manual_seed(seed))` draws alone; the same generator also
feeds ancestral samplers). Cells are rendered in batches of rows of one column, so equal columns run
the very same computation; batching never changes which noise a cell gets.

Output: one PNG with A1111-style `parameters` (and a JSON `embedtrain` text chunk), and a folder
beside it with every cell as its own PNG, each with its own `parameters`; all written atomically.

    python -m embedtrain grid --model demo --embeddings a.safetensors b.pt \\
        --prompts "a photo of {}" "a {} on a green background" --seeds 1 2 3 --out outputs/grids/ab.png

The steps-vs-GA study (`python -m embedtrain study`, embedtrain.study) trains four embeddings and grids
them with this module; the command-line helpers below (add_grid_arguments, settings_from_args,
progress_reporter, print_done, print_error) serve both commands.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from embedtrain import EmbedtrainError, SD_WIDTHS
from embedtrain.config import model_cfg_scale
from embedtrain.fileio import EMBEDDING_SUFFIXES

PLACEHOLDERS = ("{}", "[name]")
DEFAULT_PROMPTS = ("a photo of {}", "a {} on a green background")
MIN_CELL = 192     # small (demo/tiny) images are enlarged, pixel for pixel, to at least this in the grid
MAX_SEED = 2 ** 32 - 1

# sampler name -> (diffusers scheduler class, extra config, name in A1111's infotext)
SAMPLERS = {
    "default": (None, {}, None),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
}

class GridError(EmbedtrainError):
    """A grid or study cannot be made; the message names the field or file and says what would work."""


# ------------------------------------------------------------------ settings (pure, no torch)
@dataclass
class GridSettings:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # each with {} or [name]
    seeds: list[int] = field(default_factory=lambda: [1, 2])   # one row per (prompt, seed)
    sample_steps: int = 20          # sampler steps per image
    cfg_scale: float = 7.5          # classifier-free guidance scale
    sampler: str = "default"        # a key of SAMPLERS; default = the model's own scheduler
    width: int = 0                  # image size in pixels; 0 = the model's resolution
    height: int = 0
    negative_prompt: str = ""
    baseline: str | None = None     # None: no baseline column; "": prompts without the embedding; else the text
    swap_axes: bool = False         # True: embeddings are rows, (prompt, seed) are columns
    legend: bool = True             # column headers and row labels
    margin: int = 0                 # pixels between cells
    cell_size: int = 0              # grid cell width in pixels (0 = native, small images enlarged to MIN_CELL)
    batch_size: int = 8             # cells rendered together
    device: str = "auto"
    demo_scores: bool = False       # demo model: under each column, how many cells the demo judge reads as
                                    # the held-out concept (purple star)

    def validate(self) -> "GridSettings":
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise GridError("prompts must be one or more non-empty prompts, each with a placeholder {} or [name] "
                            "where the embedding goes, e.g. 'a photo of {}'")
        for p in self.prompts:
            if not any(ph in p for ph in PLACEHOLDERS):
                raise GridError(f"prompts: {p!r} has no placeholder; write {{}} or [name] where the embedding "
                                "goes, e.g. 'a photo of {}'")
        if not self.seeds:
            raise GridError("seeds must list one or more seeds, e.g. 1 2 3")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise GridError(f"seeds must be whole numbers from 0 to {MAX_SEED}, got {s!r}")
        _check(isinstance(self.sample_steps, int) and 1 <= self.sample_steps <= 1000, "sample_steps",
               self.sample_steps, "a whole number from 1 to 1000")
        _check(isinstance(self.cfg_scale, (int, float)) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 0,
               "cfg_scale", self.cfg_scale, "a number >= 0 (1 = no guidance, 7.5 is usual)")
        _check(self.sampler in SAMPLERS, "sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            _check(isinstance(v, int) and (v == 0 or (8 <= v <= 4096 and v % 8 == 0)), name, v,
                   "0 (the model's resolution) or a multiple of 8 from 8 to 4096")
        _check(isinstance(self.margin, int) and 0 <= self.margin <= 256, "margin", self.margin, "0 to 256 pixels")
        _check(isinstance(self.cell_size, int) and (self.cell_size == 0 or 16 <= self.cell_size <= 4096),
               "cell_size", self.cell_size, "0 (automatic) or 16 to 4096 pixels")
        _check(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 256, "batch_size", self.batch_size,
               "a whole number from 1 to 256")
        return self


def _check(ok: bool, name: str, value, valid: str) -> None:
    if not ok:
        raise GridError(f"{name} must be {valid}, got {value!r}")


def parse_seeds(text) -> list[int]:
    """Seeds from text: '1 2 3', '1, 2, 3' or ranges '1-4' (inclusive). Errors name `seeds`."""
    if isinstance(text, (list, tuple)):
        text = " ".join(str(t) for t in text)
    seeds = []
    for part in re.split(r"[\s,;]+", str(text).strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise GridError(f"seeds: {part!r} is not a seed; write whole numbers >= 0 or ranges, e.g. '1 2 3' "
                            "or '1-4'")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a or b - a >= 1000:
            raise GridError(f"seeds: range {part!r} must go up and hold at most 1000 seeds")
        seeds += range(a, b + 1)
    if not seeds:
        raise GridError("seeds must list one or more seeds, e.g. 1 2 3")
    for s in seeds:
        if s > MAX_SEED:
            raise GridError(f"seeds must be whole numbers from 0 to {MAX_SEED}, got {s}")
    return seeds


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def fill(prompt: str, text: str) -> str:
    """The prompt with every placeholder replaced by `text` (an embedding's tokens or name)."""
    for ph in PLACEHOLDERS:
        prompt = prompt.replace(ph, text)
    return " ".join(prompt.split())


def format_number(v) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.2f}".rstrip("0").rstrip(".")


def _lr(v) -> str:
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)


def describe_meta(meta: dict) -> list[str]:
    """Label lines from an embedding's metadata: BS / GA, steps, epochs / weight updates, LR.

    Only what the file says is shown (an A1111 .pt knows its step, an embedtrain file everything)."""
    m = {k: str(v) for k, v in (meta or {}).items() if str(v) not in ("", "None")}
    lines = []
    bs_ga = [f"{label} {m[k]}" for k, label in (("batch_size", "BS"), ("grad_accum", "GA")) if k in m]
    if bs_ga:
        lines.append(" · ".join(bs_ga))
    if "step" in m:
        unit = {"batch": "batches", "update": "updates"}.get(m.get("step_unit", ""), m.get("step_unit", ""))
        lines.append(f"steps {m['step']}" + (f" ({unit})" if unit else ""))
    ep_up = []
    if "epochs" in m:
        ep_up.append(f"epochs {format_number(m['epochs'])}")
    if "updates" in m:
        ep_up.append(f"updates {m['updates']}")
    if ep_up:
        lines.append(" · ".join(ep_up))
    if "lr" in m:
        sched = m.get("lr_schedule", "")
        lines.append(f"LR {_lr(m['lr'])}" + (f" {sched}" if sched and sched != "constant" else ""))
    return lines


def infotext(prompt: str, negative: str, fields: dict) -> str:
    """A1111's `parameters` text: prompt, optional negative prompt, then `Key: value, ...`."""
    def q(v):
        s = str(v)
        return json.dumps(s) if any(c in s for c in ',:\n"') else s
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {q(v)}" for k, v in fields.items() if v not in ("", None)))
    return "\n".join(lines)


def safe_filename(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^\w.-]+", "_", text).strip("._") or "x"
    return s[:limit]


# ------------------------------------------------------------------ the picture (pure PIL)
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if not line or font.getlength(trial) <= width:
            line = trial
        else:
            out.append(line)
            line = word
        while font.getlength(line) > width and len(line) > 1:  # a single word wider than the cell
            cut = len(line) - 1
            while cut > 1 and font.getlength(line[:cut]) > width:
                cut -= 1
            out.append(line[:cut])
            line = line[cut:]
    if line:
        out.append(line)
    return out


def _label_block(label: list[str], width: int, title_font, font) -> list[tuple[str, object]]:
    lines = []
    for i, text in enumerate(label):
        f = title_font if i == 0 else font
        lines += [(piece, f) for piece in _wrap(text, f, width)]
    return lines


def _block_height(lines, gap: int) -> int:
    return sum(f.size + gap for _, f in lines) if lines else 0


def compose(images: list, n_cols: int, col_labels=None, row_labels=None, margin: int = 0, cell: int = 0):
    """Paste images (row-major) into one grid with optional labels; returns a PIL image.

    Args:
        images: PIL images of equal size, row after row; len must be a multiple of n_cols.
        col_labels / row_labels: per column / row a list of lines (the first is the title), or None
            for no labels on that axis.
        margin: pixels between cells.
        cell: cell width in pixels; 0 = the images' own width, enlarged to MIN_CELL if smaller.
    """
    from PIL import Image, ImageDraw

    if not images or len(images) % n_cols:
        raise GridError(f"compose needs a whole number of rows: {len(images)} images, {n_cols} columns")
    n_rows = len(images) // n_cols
    w0, h0 = images[0].size
    if any(im.size != (w0, h0) for im in images):
        raise GridError("compose needs images of one size")
    if cell <= 0:
        cell = w0 * max(1, math.ceil(MIN_CELL / w0)) if w0 < MIN_CELL else w0
    cw, ch = cell, max(1, round(h0 * cell / w0))
    title_font, font = _font(max(13, round(cw * 0.075))), _font(max(11, round(cw * 0.06)))
    gap, pad = 3, 6
    head = [_label_block(lb, cw - 2 * pad, title_font, font) for lb in col_labels] if col_labels else []
    head_h = max((_block_height(b, gap) for b in head), default=0) + (2 * pad if col_labels else 0)
    side_w = max(140, round(cw * 0.8)) if row_labels else 0
    side = [_label_block(lb, side_w - 2 * pad, title_font, font) for lb in row_labels] if row_labels else []
    W = side_w + n_cols * cw + (n_cols - 1) * margin
    H = head_h + n_rows * ch + (n_rows - 1) * margin
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, n_cols)
        if im.size != (cw, ch):
            im = im.resize((cw, ch), Image.NEAREST if cw % w0 == 0 else Image.LANCZOS)
        canvas.paste(im.convert("RGB"), (side_w + c * (cw + margin), head_h + r * (ch + margin)))
    for c, block in enumerate(head):
        x0, y = side_w + c * (cw + margin), head_h - pad - _block_height(block, gap)
        for text, f in block:
            tw = f.getlength(text)
            draw.text((x0 + (cw - tw) / 2, y), text, fill="black", font=f)
            y += f.size + gap
    for r, block in enumerate(side):
        y = head_h + r * (ch + margin) + max(pad, (ch - _block_height(block, gap)) // 2)
        for text, f in block:
            draw.text((side_w - pad - f.getlength(text), y), text, fill="black", font=f)
            y += f.size + gap
    return canvas


# ------------------------------------------------------------------ embeddings in a pipeline
@dataclass
class Column:
    """One column (or row, swapped) of a grid: an embedding, or the baseline."""
    name: str                       # the embedding's name (what A1111 prompts call it), or the baseline's
    text: str                       # what replaces the placeholder in prompts
    details: list[str] = field(default_factory=list)
    path: str = ""
    meta: dict = field(default_factory=dict)
    note: str = ""                  # a renamed file: "file name; saved as OLDNAME"
    where: str = ""                 # the run folder (or more of the path) when another file has this name

    @property
    def title(self) -> str:
        """The header: the name, plus what tells it apart or explains it."""
        extra = "; ".join(x for x in (self.where, self.note) if x)
        return f"{self.name} ({extra})" if extra else self.name

    @property
    def label(self) -> list[str]:
        return [self.title, *self.details]


def load_columns(pipe, paths, model_name: str = "the model") -> list[Column]:
    """Load each embedding file into the pipeline under its own internal tokens (a file may repeat).

    Errors name the file: missing, unreadable, or vectors of the wrong size for this model."""
    from embedtrain.embedding import EmbeddingError, install, load_embedding
    from embedtrain.textside import text_side
    side = text_side(pipe)   # SD: one vector set per file; SDXL: clip_l + clip_g
    dim = side.parts[0].dim
    columns = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise GridError(f"embedding file {path} does not exist" if not path.exists() else
                            f"embedding {path} is a folder; give the embedding file inside it")
        emb = load_embedding(path)  # its errors already name the file
        size = emb.vectors.shape[1]
        if side.family == "SD" and emb.vectors_g is None and size != dim:
            family = SD_WIDTHS.get(size, f"a model with token size {size}")
            raise GridError(f"embedding file {path} has vectors of size {size} (made for {family}), but "
                            f"{model_name} needs size {dim}: pick embeddings trained on this model family")
        k = len(install(pipe.tokenizer, pipe.text_encoder).extras)
        try:
            ts = side.add_loaded(emb, f"gridemb{k}", f"embedding file {path}", model_name)
        except EmbeddingError as e:
            raise GridError(str(e)) from None
        # the name is the file's (as in A1111); a renamed file's header also shows the name it was saved as
        note = f"file name; saved as {emb.saved_name}" if emb.saved_name else ""
        columns.append(Column(emb.name, " ".join(ts.tokens), describe_meta(emb.meta), str(path), dict(emb.meta),
                              note=note))
    return columns


def tell_apart(columns: list[Column]) -> list[Column]:
    """Columns of different files with the same name get where their file is (`where`) in the title:
    the run folder, or as much of the path below their common folder as it takes. The same file
    picked twice, and names that differ only in case (gaST, GAST), stay as they are."""
    import os
    groups: dict[str, set] = {}
    for c in columns:
        if c.path:
            groups.setdefault(c.name, set()).add(Path(c.path).absolute())
    where = {}
    for paths in groups.values():
        if len(paths) < 2:
            continue
        try:
            common = Path(os.path.commonpath(list(paths)))
        except ValueError:  # different drives (Windows)
            where.update({p: str(p) for p in paths})
            continue
        rel = {p: p.relative_to(common) for p in paths}
        if len({p.name for p in paths}) == 1 and all(r.parent.parts for r in rel.values()):
            # the same file name in different folders: the folders say it
            where.update({p: r.parent.as_posix() for p, r in rel.items()})
        else:
            where.update({p: r.as_posix() for p, r in rel.items()})
    return [replace(c, where=where[Path(c.path).absolute()]) if c.path and Path(c.path).absolute() in where else c
            for c in columns]


def baseline_column(text: str) -> Column:
    text = " ".join(text.split())
    return Column("no embedding" if not text else f"baseline: {text}", text,
                  ["prompt without the embedding"] if not text else ["init text in its place"])


def init_text_of(columns: list[Column]) -> str:
    """The init text recorded in the first embedding that has one ('' when none does)."""
    for c in columns:
        t = c.meta.get("init_text", "").strip()
        if t and t != "*":
            return t
    return ""


# ------------------------------------------------------------------ rendering
@dataclass
class Cell:
    row: int            # (prompt, seed) index: prompt_index * len(seeds) + seed_index
    col: int            # column index (baseline last)
    prompt: str         # with the placeholder filled by the column's name (for people)
    seed: int
    column: str


@dataclass
class GridResult:
    path: Path | None
    folder: Path | None
    image: object                    # the grid, a PIL image
    images: list                     # one PIL image per cell, in `cells` order
    cells: list[Cell]
    columns: list[Column]
    parameters: str
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    fields: dict = field(default_factory=dict)   # the infotext fields shared by every cell


def _scheduler(pipe, sampler: str):
    if SAMPLERS[sampler][0] is None:
        return pipe.scheduler
    import diffusers
    cls_name, extra, _ = SAMPLERS[sampler]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def sampler_label(pipe, sampler: str) -> str:
    a1111 = SAMPLERS[sampler][2]
    if a1111:
        return a1111
    current = type(pipe.scheduler).__name__
    for cls_name, extra, label in SAMPLERS.values():
        if cls_name == current and not extra:
            return label
    return current


def render_grid(pipe, info, embeddings, settings: GridSettings, out=None, progress=None) -> GridResult:
    """Render a seed-locked grid with an already loaded pipeline; write it when `out` is given.

    Args:
        pipe, info: from `embedtrain.models.load_pipeline` (info gives the model's name, hash, size).
        embeddings: embedding files, or `Column`s already loaded into `pipe`.
        out: the grid's PNG path; the cells go to a folder of the same name beside it.
        progress: optional `progress(done, total, message)`; `done` counts cells (fractional within a batch).
    """
    import torch

    from embedtrain import models

    t0 = time.perf_counter()
    s = settings.validate()
    columns = [c if isinstance(c, Column) else None for c in embeddings]
    paths = [p for p, c in zip(embeddings, columns) if c is None]
    loaded = iter(load_columns(pipe, paths, f"model {info.name!r} ({info.architecture})"))
    columns = tell_apart([c if c is not None else next(loaded) for c in columns])
    if s.baseline is not None:
        columns.append(baseline_column(s.baseline))
    if not columns:
        raise GridError("embeddings must list one or more embedding files (or ask for a baseline column)")
    width, height = s.width or info.resolution, s.height or info.resolution
    _check_lengths(pipe, s.prompts, columns)

    rows = [(p, seed) for p in s.prompts for seed in s.seeds]
    cells = [Cell(r, c, fill(p, col.name if col.path else (col.text or "")), seed, col.title)
             for r, (p, seed) in enumerate(rows) for c, col in enumerate(columns)]
    texts = [fill(rows[cell.row][0], columns[cell.col].text) for cell in cells]

    device = models.resolve_device(s.device)
    dtype = models.resolve_precision("auto", device)
    pipe.to(device)
    original = pipe.scheduler
    pipe.scheduler = _scheduler(pipe, s.sampler)
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    total = len(cells)
    images = [None] * total
    done = 0
    try:
        for batch in render_batches(len(rows), len(columns), s.batch_size):
            # a fresh generator per cell, seeded with its row's seed: the same starting noise in every column
            gens = [torch.Generator().manual_seed(cells[i].seed) for i in batch]
            latents = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(device)

            def on_step(p, step, timestep, kw, _n=len(batch), _done=done):
                if progress:
                    progress(_done + _n * (step + 1) / s.sample_steps, total,
                             f"{cells[batch[0]].column}: step {step + 1}/{s.sample_steps} of cells "
                             f"{_done + 1}-{_done + _n} of {total}")
                return {}

            autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
            try:
                with torch.no_grad(), autocast:
                    out_ = pipe(prompt=[texts[i] for i in batch],
                                negative_prompt=[s.negative_prompt] * len(batch) if s.negative_prompt else None,
                                latents=latents, generator=gens, num_inference_steps=s.sample_steps,
                                guidance_scale=s.cfg_scale, height=height, width=width, output_type="pil",
                                callback_on_step_end=on_step)
            except torch.OutOfMemoryError:
                raise GridError(f"batch_size {s.batch_size} ran out of {device.type} memory at {width}x{height}; "
                                f"render fewer cells together (--render-batch {max(1, s.batch_size // 2)})") from None
            for i, im in zip(batch, out_.images):
                images[i] = im
            done += len(batch)
            if progress:
                progress(done, total, f"rendered {done} of {total} cells")
    finally:
        sampler = sampler_label(pipe, s.sampler)
        pipe.scheduler = original

    if s.demo_scores:
        columns = [replace(col, details=[*col.details, line])
                   for col, line in zip(columns, demo_score_lines(images, len(columns)))]
    fields = dict(Steps=s.sample_steps, Sampler=sampler, **{"CFG scale": format_number(s.cfg_scale)},
                  Seed=s.seeds[0], Size=f"{width}x{height}", **{"Model hash": info.hash}, Model=info.name)
    grid_fields = axes_fields(fields, [c.title for c in columns], rows, s.swap_axes)
    parameters = infotext(cells[0].prompt, s.negative_prompt, grid_fields)
    grid = grid_picture(images, rows, columns, s)
    result = GridResult(None, None, grid, images, cells, columns, parameters, fields=fields)
    if out is not None:
        result.path, result.folder = Path(out), Path(out).with_suffix("")
        result.files = _write(result, s, fields, info)
    result.seconds = time.perf_counter() - t0
    return result


def render_batches(n_rows: int, n_cols: int, batch_size: int) -> list[list[int]]:
    """Cell indices (row-major: row * n_cols + col) in the batches they are rendered in.

    A batch holds rows of one column, chunked the same way in every column. So two columns whose
    embeddings are equal run bit-for-bit the same computation and give pixel-identical images; mixing
    columns in a batch would not (CPU and GPU kernels round differently at different batch positions).
    """
    return [[r * n_cols + c for r in range(start, min(start + batch_size, n_rows))]
            for c in range(n_cols) for start in range(0, n_rows, batch_size)]


def demo_score_lines(images, n_cols: int) -> list[str]:
    """Per column, how many of its cells the demo world's judge reads as the held-out concept."""
    from embedtrain.demo.judge import judge
    from embedtrain.demo.world import HELD_OUT
    colour, shape = HELD_OUT
    hits = [0] * n_cols
    for i, im in enumerate(images):
        j = judge(im)
        hits[i % n_cols] += j.shape == shape and j.colour == colour
    n = len(images) // n_cols
    return [f"judge: {colour} {shape} in {h}/{n}" for h in hits]


def axes_fields(fields: dict, col_titles: list[str], rows, swap: bool) -> dict:
    """The infotext fields of a grid: the cells' fields plus what its axes hold (X/Y/Z-plot style)."""
    cols = {"X Type": "Embedding", "X Values": ", ".join(col_titles)}
    rws = {"Y Type": "Prompt, Seed", "Y Values": " | ".join(f"{p} (seed {seed})" for p, seed in rows)}
    if swap:
        cols, rws = ({"X" + k[1:]: v for k, v in rws.items()}, {"Y" + k[1:]: v for k, v in cols.items()})
    return dict(fields, **cols, **rws)


def _check_lengths(pipe, prompts, columns) -> None:
    """CLIP reads 77 tokens; refuse prompts that the tokenizer would cut (it truncates silently)."""
    limit = pipe.tokenizer.model_max_length - 2
    for p in prompts:
        for c in columns:
            n = len(pipe.tokenizer(fill(p, c.text), add_special_tokens=False).input_ids)
            if n > limit:
                raise GridError(f"prompts: {p!r} with {c.name!r} is {n} tokens long; the text encoder reads at "
                                f"most {limit}: shorten it")


def grid_picture(images, rows, columns, s: GridSettings):
    """The grid picture of row-major cell images (rows = (prompt, seed), one column per `columns`),
    turned when `s.swap_axes`, labelled unless `s.legend` is off."""
    n_cols = len(columns)
    row_labels = [[p.replace("{}", "[name]") if "{}" in p else p, f"seed {seed}"] for p, seed in rows]
    col_labels = [c.label for c in columns]
    if s.swap_axes:
        n = len(rows)
        images = [images[r * n_cols + c] for c in range(n_cols) for r in range(n)]
        n_cols, row_labels, col_labels = n, col_labels, row_labels
    if not s.legend:
        row_labels = col_labels = None
    return compose(images, n_cols, col_labels, row_labels, s.margin, s.cell_size)


def write_png(image, path: Path, parameters: str, extra: dict | None = None) -> Path:
    """Write a PIL image as a PNG with A1111's `parameters` text (and `extra` text chunks), atomically."""
    from PIL.PngImagePlugin import PngInfo

    from embedtrain.fileio import atomic_path
    info = PngInfo()
    info.add_text("parameters", parameters)
    for k, v in (extra or {}).items():
        info.add_text(k, v)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


_png = write_png   # its earlier name (tests/test_interop.py imports it)


def _write(result: GridResult, s: GridSettings, fields: dict, info) -> list[Path]:
    files = []
    for i, (cell, im) in enumerate(zip(result.cells, result.images)):
        col = result.columns[cell.col]
        name = f"{i:04d}-{safe_filename(col.title)}-seed{cell.seed}.png"
        text = infotext(cell.prompt, s.negative_prompt, dict(fields, Seed=cell.seed, Embedding=col.title))
        files.append(write_png(im, result.folder / name, text))
    spec = {
        "model": info.name, "model_hash": info.hash, "settings": asdict(s),
        "columns": [{"name": c.name, "title": c.title, "path": c.path, "details": c.details, "meta": c.meta}
                    for c in result.columns],
        "cells": [dict(asdict(c), file=f.name) for c, f in zip(result.cells, files)],
    }
    files.append(write_png(result.image, result.path, result.parameters, {"embedtrain": json.dumps(spec)}))
    return files


def default_out(outputs, stem: str = "grid") -> Path:
    """outputs/grids/STEM-DATE-TIME.png; a suffix -2, -3, ... when that second's name is taken."""
    base = Path(outputs) / "grids" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base.with_suffix(".png"), 1
    while path.exists() or path.with_suffix("").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}.png")
    return path


# ------------------------------------------------------------------ command line
def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid")
    g.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS),
                   help="prompts with a placeholder {} or [name] for the embedding (default: %(default)s)")
    g.add_argument("--seeds", nargs="+", default=["1", "2"], help="seeds or ranges, e.g. 1 2 3 or 1-4 (one row "
                                                                  "per prompt and seed)")
    g.add_argument("--sample-steps", type=int, default=20, help="sampler steps per image (default 20)")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: the "
                   f"model's, {model_cfg_scale('demo'):g} for the demo model, else {model_cfg_scale(''):g})")
    g.add_argument("--sampler", default="default", choices=list(SAMPLERS),
                   help="sampler (default: the model's own scheduler)")
    g.add_argument("--width", type=int, default=0, help="image width (default: the model's resolution)")
    g.add_argument("--height", type=int, default=0, help="image height (default: the model's resolution)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--swap-axes", action="store_true", help="embeddings as rows, prompts and seeds as columns")
    g.add_argument("--no-legend", action="store_true", help="no column headers and row labels")
    g.add_argument("--margin", type=int, default=0, help="pixels between cells")
    g.add_argument("--cell-size", type=int, default=0, help="cell width in the grid (default: native, small "
                                                            f"images enlarged to {MIN_CELL})")
    g.add_argument("--demo-scores", action="store_true", help="demo model: under each column, how many cells the "
                   "demo judge reads as the held-out purple star")
    g.add_argument("--render-batch", type=int, default=8, help="cells rendered together (default 8)")
    g.add_argument("--progress", choices=["text", "json"], default="text",
                   help="json: one JSON line per progress report on stdout (for the web UI)")


def settings_from_args(args, baseline, model: str) -> GridSettings:
    cfg_scale = model_cfg_scale(model) if args.cfg_scale is None else args.cfg_scale
    return GridSettings(prompts=args.prompts, seeds=parse_seeds(args.seeds), sample_steps=args.sample_steps,
                        cfg_scale=cfg_scale, sampler=args.sampler, width=args.width, height=args.height,
                        negative_prompt=args.negative_prompt, baseline=baseline, swap_axes=args.swap_axes,
                        legend=not args.no_legend, margin=args.margin, cell_size=args.cell_size,
                        batch_size=args.render_batch, device=getattr(args, "device", "auto"),
                        demo_scores=args.demo_scores).validate()


def progress_reporter(mode: str):
    last = {"t": 0.0}

    def report(done, total, message):
        if mode == "json":
            print(json.dumps({"event": "progress", "done": round(float(done), 3), "total": total,
                              "message": message}), flush=True)
        elif time.time() - last["t"] > 1.0 or done >= total:
            last["t"] = time.time()
            print(f"[{done:.0f}/{total}] {message}", file=sys.stderr, flush=True)
    return report


def print_done(mode: str, payload: dict, text: str) -> None:
    if mode == "json":
        print(json.dumps({"event": "done", **payload}), flush=True)
    else:
        print(text)


def print_error(mode: str, message: str) -> int:
    if mode == "json":
        print(json.dumps({"event": "error", "message": message}), flush=True)
    print(f"error: {message}", file=sys.stderr)
    return 2


def cli_grid(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedtrain grid", description="Seed-locked comparison grid: "
                                "rows = prompts x seeds, columns = embeddings, every column from the same noise.")
    p.add_argument("--model", default="demo", help="'demo', 'tiny', a diffusers folder or a checkpoint file")
    p.add_argument("--model-config", default="", help="local diffusers folder with a checkpoint's configs")
    p.add_argument("--embeddings", nargs="*", default=[], help="embedding files ("
                   + ", ".join(EMBEDDING_SUFFIXES[:-1]) + " or an A1111 embedding .png)")
    p.add_argument("--baseline", nargs="?", const="@init", default=None, metavar="TEXT",
                   help="add a baseline column: TEXT in place of the embedding; without TEXT the init text "
                        "from the embeddings' metadata (or no embedding); --baseline '' = no embedding")
    p.add_argument("--out", help="grid PNG (default outputs/grids/grid-TIME.png); cells go to a folder beside it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    add_grid_arguments(p)
    args = p.parse_args(argv)
    try:
        from embedtrain import models
        baseline = args.baseline
        settings = settings_from_args(args, "" if baseline == "@init" else baseline, args.model)
        if not args.embeddings and baseline is None:
            raise GridError("embeddings must list one or more embedding files (or add --baseline)")
        from embedtrain.embedding import load_embedding
        for f in args.embeddings:  # fail on a missing, damaged or hostile file before the slow model load
            if Path(f).is_dir():
                raise GridError(f"embedding {f} is a folder; give the embedding file inside it")
            if not Path(f).is_file():
                raise GridError(f"embedding file {f} does not exist")
            load_embedding(f)   # its errors name the file; a few ms for a real embedding
        report = progress_reporter(args.progress)
        report(0, 1, f"loading model {args.model}")
        pipe, info = models.load_pipeline(args.model, args.model_config)
        columns = load_columns(pipe, args.embeddings, f"model {info.name!r} ({info.architecture})")
        if baseline == "@init":
            settings.baseline = init_text_of(columns)
        out = Path(args.out) if args.out else default_out("outputs")
        result = render_grid(pipe, info, columns, settings, out, report)
    except EmbedtrainError as e:
        return print_error(args.progress, str(e))
    print_done(args.progress, {"grid": str(result.path), "folder": str(result.folder), "seconds": round(result.seconds, 2),
                            "cells": len(result.cells)},
            f"wrote {result.path} ({len(result.columns)} columns x {len(result.cells) // len(result.columns)} rows, "
            f"{result.seconds:.1f} s) and {len(result.cells)} images in {result.folder}")
    return 0


def parse_pair(text: str, name: str) -> tuple[int, int]:
    """A study setting 'BS,GA' (also 'BS x GA', 'BS/GA') -> (batch_size, grad_accum). Used by the study's
    command line and its web form (embedtrain.ui.grid_tab), which imports it from here."""
    m = re.fullmatch(r"\s*(\d+)\s*[,x:/ ]\s*(\d+)\s*", str(text))
    if not m:
        raise GridError(f"{name} must be BATCH_SIZE,GRAD_ACCUM, e.g. 13,2; got {text!r}")
    return int(m.group(1)), int(m.group(2))


cli = cli_grid
