"""What every tab of the web UI shares: the outputs folder, the job manager, the server's defaults,
and the Train tab's input components (so other tabs can send settings to it).

No torch here: the page must be served before any heavy import (bench/README.md, startup).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from embedtrain.ui.jobs import JobManager

ROOT = Path(__file__).resolve().parent.parent.parent
ASSETS = ROOT / "assets"
DEMO_DATASET = ASSETS / "demo_dataset"


@dataclass
class UIContext:
    outputs: Path                  # every file the UI writes goes under here; the only folder it serves
    model: str = "demo"            # default model source of the Train tab
    data: str = str(DEMO_DATASET)  # default dataset folder of the Train tab
    jobs: JobManager | None = None
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

    def inside_outputs(self, path) -> Path:
        """A path typed into the UI, resolved; refused unless it lies inside the outputs folder."""
        p = Path(path).expanduser().resolve()
        if p != self.outputs and self.outputs not in p.parents:
            raise ValueError(f"{path} is outside the outputs folder {self.outputs}; the web UI only reads "
                             "and writes there")
        return p


def api_parameters(fn, fields: list[str]) -> None:
    """Name the parameters of a handler that takes *args, so API callers see `model, data, ...` instead of
    param_0, param_1, ...; a keyword-only parameter it has (gr.Progress) stays last."""
    import inspect
    params = [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD) for f in fields]
    extra = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    fn.__signature__ = inspect.Signature(params + extra)
