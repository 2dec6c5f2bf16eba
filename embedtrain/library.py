"""The models and embeddings in an AUTOMATIC1111 or ComfyUI install (the web UI's `--models-dir`).

A folder given is one of:

- an A1111 install: checkpoints in `DIR/models/Stable-diffusion/`, embeddings in `DIR/embeddings/`;
- a ComfyUI install: checkpoints in `DIR/models/checkpoints/` (diffusers folders in `DIR/models/diffusers/`),
  embeddings in `DIR/models/embeddings/`;
- either install's `models` folder itself (`DIR/Stable-diffusion/`, `DIR/checkpoints/`, `DIR/embeddings/`);
- or, when none of those folders exists, a folder of checkpoints.

Only these places are looked at, to a bounded depth (MAX_DEPTH subfolders) and count (MAX_ENTRIES per folder):
never a walk of the disk. A model is a `.safetensors`/`.ckpt` file, labelled from its header alone
(checkpoints.detect: keys and shapes, no weights), or a diffusers folder (a subfolder with model_index.json),
labelled from its configs (preflight.model_kind). A file that is not a model (a LoRA, an embedding, a VAE, a
refiner) is listed as skipped with the one-line reason detect gives.

A `.ckpt` has no header: detect opens it through torch (memory-mapped, weights stay on disk), which the web
server must not import before its page is served. `scan(..., read_ckpt=False)` lists such a file without its
architecture unless an earlier scan read it (results are cached by path, size and modification time).

Pure: no gradio, no torch at import.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 2        # subfolders below a models or embeddings folder that are looked into
MAX_ENTRIES = 2000   # directory entries looked at per models or embeddings folder
MODEL_SUFFIXES = (".safetensors", ".ckpt")

# (models folders, embeddings folders) relative to a --models-dir, for each layout it may be
LAYOUTS = {
    "A1111": (["models/Stable-diffusion"], ["embeddings"]),
    "ComfyUI": (["models/checkpoints", "models/diffusers"], ["models/embeddings"]),
    "models folder": (["Stable-diffusion", "checkpoints", "diffusers"], ["embeddings"]),
}


@dataclass(frozen=True)
class ModelEntry:
    path: str          # the value the model box gets: a checkpoint file or a diffusers folder
    name: str          # the file's stem or the folder's name
    arch: str          # "SD 1.x", "SD 2.x", "SDXL", "tiny SD", ..., or "" when not read (a .ckpt not yet read)
    kind: str          # "checkpoint" or "diffusers"
    prediction: str = ""

    @property
    def label(self) -> str:
        """What the dropdown shows: "sd_xl_base_1.0 · SDXL", "v2-1_768 · SD 2.x v-prediction",
        "mymodel · SD 1.x · diffusers", "old.ckpt · architecture not read yet (reload the page)"."""
        if not self.arch:
            return f"{self.name}{Path(self.path).suffix} · architecture not read yet (reload the page)"
        arch = self.arch + (" v-prediction" if self.prediction == "v_prediction" else "")
        return f"{self.name} · {arch}" + (" · diffusers" if self.kind == "diffusers" else "")


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Library:
    models: list[ModelEntry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    embedding_dirs: list[Path] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)
    truncated: list[Path] = field(default_factory=list)   # folders with more than MAX_ENTRIES entries

    def choices(self) -> list[tuple[str, str]]:
        """(label, path) for each model, for a dropdown."""
        return [(m.label, m.path) for m in self.models]

    def summary(self) -> str:
        """One line: how many models were found, and what was skipped (first few, with reasons)."""
        text = f"{len(self.models)} model{'s' if len(self.models) != 1 else ''} found"
        if self.embeddings:
            text += f", {len(self.embeddings)} embedding file{'s' if len(self.embeddings) != 1 else ''}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(
                f"{Path(s.path).name} ({s.reason})" for s in self.skipped[:3]) + ("; ..." if len(self.skipped) > 3 else "")
        if self.truncated:
            text += f"; only the first {MAX_ENTRIES} entries of " + ", ".join(str(p) for p in self.truncated) + " read"
        return text


def places(folder) -> tuple[list[Path], list[Path]]:
    """(models folders, embeddings folders) that exist under a --models-dir, by the layouts above; the folder
    itself is the models folder when no conventional one exists."""
    root = Path(os.path.abspath(Path(folder).expanduser()))
    models, embeddings = [], []
    for model_dirs, emb_dirs in LAYOUTS.values():
        models += [root / d for d in model_dirs if (root / d).is_dir() and root / d not in models]
        embeddings += [root / d for d in emb_dirs if (root / d).is_dir() and root / d not in embeddings]
    if not models and root.is_dir() and not embeddings:
        models = [root]
    return models, embeddings


def _entries(folder: Path, depth: int, budget: list, truncated: list, root: Path):
    """(path, is_dir) of the entries under `folder`, sorted, to MAX_DEPTH levels and at most MAX_ENTRIES in all;
    hidden names skipped; a diffusers folder is yielded and not entered; symlinked folders are not followed."""
    try:
        items = sorted(os.scandir(folder), key=lambda e: e.name.lower())
    except OSError:
        return
    for e in items:
        if e.name.startswith("."):
            continue
        if budget[0] <= 0:
            if root not in truncated:
                truncated.append(root)
            return
        budget[0] -= 1
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            continue
        path = Path(e.path)
        if is_dir and (path / "model_index.json").is_file():
            yield path, True
        elif is_dir and depth < MAX_DEPTH:
            yield from _entries(path, depth + 1, budget, truncated, root)
        elif not is_dir:
            yield path, False


_cache: dict = {}   # (path, size, mtime_ns) -> ModelEntry | Skipped
_cache_lock = threading.Lock()


def _checkpoint(path: Path, read_ckpt: bool):
    """A checkpoint file as a ModelEntry (or Skipped, with detect's one-line reason), cached."""
    from embedtrain import EmbedtrainError
    from embedtrain.checkpoints import detect
    try:
        st = path.stat()
    except OSError as e:
        return Skipped(str(path), f"cannot be read: {e.strerror or e}")
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    if path.suffix.lower() == ".ckpt" and not read_ckpt:
        return ModelEntry(str(path), path.stem, "", "checkpoint")
    try:
        info = detect(path)
        found = ModelEntry(str(path), path.stem, info["arch"], "checkpoint", info.get("prediction", ""))
    except (EmbedtrainError, OSError, ValueError) as e:
        found = Skipped(str(path), _reason(str(e), path))
    with _cache_lock:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = found
    return found


def _reason(message: str, path: Path) -> str:
    """detect's message without the path it starts with ("/x/y.safetensors is a LoRA, not a model: ..." ->
    "a LoRA, not a model")."""
    text = message.replace(f"checkpoint {path} ", "").replace(f"{path} ", "").replace(str(path), path.name)
    text = text.split(":")[0] if text.startswith(("is ", "a ", "an ")) else text
    return text[3:] if text.startswith("is ") else text


def _diffusers(path: Path):
    from embedtrain.preflight import model_kind
    try:
        kind = model_kind(str(path))
    except (OSError, ValueError):
        kind = None
    if kind is None:
        return Skipped(str(path), "not a Stable Diffusion diffusers folder (its model_index.json names another "
                                  "pipeline, or its configs cannot be read)")
    return ModelEntry(str(path), path.name, kind.label, "diffusers")


def scan(dirs, read_ckpt: bool = True) -> Library:
    """The models, skipped files, embeddings folders and embedding files of each --models-dir in `dirs`
    (in order; a path found twice is listed once)."""
    from embedtrain.fileio import is_embedding_file
    lib, seen = Library(), set()
    for folder in dirs or []:
        if not str(folder).strip():
            continue
        model_dirs, emb_dirs = places(folder)
        for d in model_dirs:
            for path, is_dir in _entries(d, 0, [MAX_ENTRIES], lib.truncated, d):
                real = os.path.realpath(path)
                if real in seen or not (is_dir or path.suffix.lower() in MODEL_SUFFIXES):
                    continue
                seen.add(real)
                found = _diffusers(path) if is_dir else _checkpoint(path, read_ckpt)
                (lib.models if isinstance(found, ModelEntry) else lib.skipped).append(found)
        for d in emb_dirs:
            if d in lib.embedding_dirs:
                continue
            lib.embedding_dirs.append(d)
            for path, is_dir in _entries(d, 0, [MAX_ENTRIES], lib.truncated, d):
                real = os.path.realpath(path)
                if not is_dir and real not in seen and is_embedding_file(path):
                    seen.add(real)
                    lib.embeddings.append(path)
    return lib


def inside(path, folders) -> bool:
    """`path` lies inside one of `folders`, both as written and once symlinks are followed."""
    p = os.path.abspath(Path(str(path)).expanduser())
    real = os.path.realpath(p)

    def under(x: str, root: str) -> bool:
        return x == root or x.startswith(root.rstrip(os.sep) + os.sep)
    return any(under(p, os.path.abspath(f)) for f in folders) and \
        any(under(real, os.path.realpath(f)) for f in folders)
