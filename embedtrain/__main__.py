"""Command line: `python -m embedtrain <command> [options]`.

Each command lives in the module that does the work and exposes `cli(argv) -> int`;
this file only dispatches, so `calc` never imports torch.
"""

import importlib
import importlib.abc
import os
import sys
import warnings

COMMANDS = {
    "train": ("embedtrain.trainer", "train a textual-inversion embedding"),
    "calc": ("embedtrain.calculator", "steps, epochs and weight updates; full-cycle settings"),
    "lr-find": ("embedtrain.lr_finder", "learning-rate range test"),
    "sweep": ("embedtrain.lr_finder", "short constant-LR runs to pick a learning rate"),
    "grid": ("embedtrain.grid", "seed-locked comparison grid of several embeddings"),
    "study": ("embedtrain.study", "the steps-vs-gradient-accumulation study: four runs and their grids"),
    "score": ("embedtrain.demo.score", "fidelity and editability of an embedding on the demo model"),
    "prepare": ("embedtrain.prepare", "resize, crop, flip and split a folder of images into a new folder"),
}

GUIDE = "docs/guide.md"

# Library notices that say nothing about the user's run: matched by message, so every other warning
# (ours included) still shows.
LIBRARY_WARNINGS = (
    (FutureWarning, r"`torch_dtype` is deprecated"),        # diffusers 0.3x+, on every pipeline load
)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` right after `name` is first imported, so quieting a library never imports it
    (and torch with it) for commands that do not need it: `calc` and every `--help` stay instant."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run, then = spec.loader.exec_module, self.then

                def exec_module(module):
                    run(module)
                    try:
                        then(module)
                    except Exception:   # quieting is a nicety; it must never break a command
                        pass
                spec.loader.exec_module = exec_module
                return spec
            if spec is not None:
                return spec
        return None


def quiet_libraries() -> None:
    """Keep the libraries' start-up noise out of the command line's output: transformers' and diffusers'
    log messages below errors (such as transformers' "requires torchvision" notice), their model-loading
    progress bars, and the deprecation warnings in LIBRARY_WARNINGS. Our own messages and warnings are
    untouched; a TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY already set by the user wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        # "Loading pipeline components..." / "Loading weights": local files load in a second or two.
        sys.meta_path.insert(0, _AfterImport("diffusers.utils.logging", lambda m: m.disable_progress_bar()))
        sys.meta_path.insert(0, _AfterImport("transformers.utils.logging", _no_transformers_bars))


def _no_transformers_bars(module) -> None:
    # transformers' disable_progress_bar() also turns off huggingface_hub's download bars, which a user
    # fetching a model does want to see; only transformers' own flag is cleared.
    if hasattr(module, "_tqdm_active"):
        module._tqdm_active = False


def usage() -> str:
    lines = ["usage: python -m embedtrain <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m embedtrain <command> --help` lists a command's options.",
              f"How to pick a learning rate, steps and GA: {GUIDE}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    quiet_libraries()
    module = importlib.import_module(COMMANDS[name][0])
    cli = getattr(module, "cli_" + name.replace("-", "_"), None) or module.cli
    return int(cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
