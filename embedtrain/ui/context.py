"""What every tab of the web UI shares: the outputs folder, the job manager, the server's defaults,
the folders the web UI may read, and the Train tab's input components (so other tabs can send
settings to it).

What the web UI may read is decided here and only here: `allowed_folder` for every folder or file path
typed into the page (a dataset, a study's data), `servable` for every list of files a page is handed to
download. The CLI has no such limits.

No torch here: the page must be served before any heavy import (bench/README.md, startup).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from embedtrain import ASSETS, EmbedtrainError
from embedtrain.ui.jobs import JobManager

DEMO_DATASET = ASSETS / "demo_dataset"
ALLOW_FLAG = "--allow-dir"


class NotAllowed(EmbedtrainError):
    """A path typed into the web UI lies outside the folders it may read. The message is the same whether
    or not the path exists."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def servable_files(paths, root) -> list[str]:
    """The paths (in order) that are regular files, and lie inside `root` once every symlink is followed.

    For any list of files the web UI hands to a page: Gradio copies each into its cache and serves it,
    so a run folder's `x.json -> /etc/passwd` would be served; here it is dropped. A symlink whose target
    lies inside `root` is kept (it can only reach what the root already serves)."""
    root_real = os.path.realpath(root)
    out = []
    for p in paths or []:
        if p is None:
            continue
        real = os.path.realpath(p)
        try:
            regular = stat.S_ISREG(os.stat(real).st_mode)
        except OSError:
            continue
        if regular and _inside(real, root_real):
            out.append(str(p))
    return out


@dataclass
class UIContext:
    outputs: Path                  # every file the UI writes goes under here; the only folder it serves
    model: str = "demo"            # default model source of the Train tab
    data: str = str(DEMO_DATASET)  # default dataset folder of the Train tab (the web UI may read it)
    jobs: JobManager | None = None
    allow: list = field(default_factory=list)   # more folders the web UI may read (app.py --allow-dir)
    models_dirs: list = field(default_factory=list)   # A1111 / ComfyUI installs or checkpoint folders (--models-dir):
    # their models fill the model dropdowns, their embeddings the Grid tab; the web UI may read them
    # The Train tab's inputs, keyed by TrainConfig field name (batch_size, grad_accum, steps, step_unit,
    # lr, lr_schedule, lr_min, lr_step_size, ...). Tabs built after it use these as outputs of their
    # "Use these settings" buttons. Filled by embedtrain.ui.train_tab.build.
    train: dict = field(default_factory=dict)
    train_message: object = None   # the Train tab's message line (other tabs say there what they changed)
    tabs: object = None            # the gr.Tabs, so a button can switch to the Train tab (selected="train")
    on_load: list = field(default_factory=list)  # (fn, inputs, outputs) run when a page opens or reloads

    def __post_init__(self):
        self.outputs = Path(self.outputs).resolve()
        if self.jobs is None:
            self.jobs = JobManager(self.outputs)
        if hasattr(self.jobs, "allowed_folder"):   # a JobManager that checks the job's data folder: this rule
            self.jobs.allowed_folder = self.allowed_folder

    # ------------------------------------------------------------ what the web UI may read
    def allowed_roots(self) -> list[Path]:
        """The folders (and everything under them) the web UI may read: the outputs folder, the bundled
        assets, the default dataset folder (app.py --data), every --allow-dir and every --models-dir."""
        roots = [self.outputs, ASSETS] + ([Path(self.data)] if str(self.data or "").strip() else []) \
            + [Path(a) for a in [*self.allow, *self.models_dirs] if str(a).strip()]
        out: list[Path] = []
        for r in (Path(os.path.abspath(Path(r).expanduser())) for r in roots):
            if r not in out:
                out.append(r)
        return out

    def allowed_folder(self, path, what: str = "data folder", field: str | None = "data") -> Path:
        """A folder (or file) path typed into the web UI, made absolute; NotAllowed unless it lies in one
        of allowed_roots() both as written and once symlinks are followed. The refusal is the same whether
        or not the path exists, and names the allowed folders and the flag that adds one."""
        raw = str(path if path is not None else "").strip()
        roots = self.allowed_roots()
        if raw:
            p = Path(os.path.abspath(Path(raw).expanduser()))
            real = os.path.realpath(p)
            written = any(_inside(str(p), str(r)) or _inside(str(p), os.path.realpath(r)) for r in roots)
            if written and any(_inside(real, os.path.realpath(r)) for r in roots):
                return p
        from embedtrain.data import display_name
        shown = ", ".join(f"`{display_name(r)}`" for r in roots   # a folder inside another listed one: not named
                          if not any(o != r and _inside(str(r), str(o)) for o in roots))
        raise NotAllowed(f"{what} {display_name(raw)!r} is not one the web UI may read: it reads only inside "
                         f"{shown}. To allow another folder, start the app with {ALLOW_FLAG} FOLDER", field)

    def model_library(self):
        """library.scan of the --models-dir folders (None without any). A .ckpt is not opened here (that needs
        torch, which the server does not import to serve a page): it is read on a background thread, and the
        next call (a page load) gets its architecture from the library's cache."""
        if not self.models_dirs:
            return None
        from embedtrain import library
        lib = library.scan(self.models_dirs, read_ckpt=False)
        if any(not m.arch for m in lib.models) and not getattr(self, "_reading_ckpt", False):
            import threading
            self._reading_ckpt = True

            def read():
                try:
                    library.scan(self.models_dirs, read_ckpt=True)
                finally:
                    self._reading_ckpt = False
            threading.Thread(target=read, daemon=True, name="models-dir-ckpt").start()
        return lib

    def model_choices(self, lib=None) -> list:
        """The model dropdowns' choices: 'demo', the default model (when it is another), and each model found in
        the --models-dir folders as (label, path)."""
        lib = lib if lib is not None else self.model_library()
        found = lib.choices() if lib is not None else []
        first = ["demo"] + ([self.model] if self.model not in ("demo", *(v for _, v in found)) else [])
        return [(c, c) for c in first] + found

    def servable(self, paths) -> list[str]:
        """servable_files inside the outputs folder: for every list of files the UI returns to a page."""
        return servable_files(paths, self.outputs)

    def inside_outputs(self, path) -> Path:
        """A path typed into the UI, resolved; refused unless it lies inside the outputs folder."""
        p = Path(path).expanduser().resolve()
        if p != self.outputs and self.outputs not in p.parents:
            raise ValueError(f"{path} is outside the outputs folder {self.outputs}; the web UI only reads "
                             "and writes there")
        return p


def readable_folder(folder, ctx: UIContext | None = None, what: str = "data folder") -> Path:
    """`folder` as the web UI may read it (ctx.allowed_folder; every handler of the page passes its ctx);
    a plain Path without a context (a library call, a test)."""
    return ctx.allowed_folder(folder, what) if ctx is not None else Path(folder)


def api_parameters(fn, fields: list[str]) -> None:
    """Name the parameters of a handler that takes *args, so API callers see `model, data, ...` instead of
    param_0, param_1, ...; a keyword-only parameter it has (gr.Progress) stays last."""
    import inspect
    params = [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD) for f in fields]
    extra = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    fn.__signature__ = inspect.Signature(params + extra)
