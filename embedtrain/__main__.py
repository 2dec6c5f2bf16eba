"""Command line: `python -m embedtrain <command> [options]`.

Each command lives in the module that does the work and exposes `cli(argv) -> int`;
this file only dispatches, so `calc` never imports torch.
"""

import importlib
import sys

COMMANDS = {
    "train": ("embedtrain.trainer", "train a textual-inversion embedding"),
    "calc": ("embedtrain.calculator", "steps, epochs and weight updates; full-cycle settings"),
    "lr-find": ("embedtrain.lr_finder", "learning-rate range test"),
    "sweep": ("embedtrain.lr_finder", "short constant-LR runs to pick a learning rate"),
    "grid": ("embedtrain.grid", "seed-locked comparison grid of several embeddings"),
    "study": ("embedtrain.grid", "the steps-vs-gradient-accumulation study: four runs and their grids"),
    "score": ("embedtrain.demo.score", "fidelity and editability of an embedding on the demo model"),
}


def usage() -> str:
    lines = ["usage: python -m embedtrain <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m embedtrain <command> --help` lists a command's options."]
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
    module = importlib.import_module(COMMANDS[name][0])
    cli = getattr(module, "cli_" + name.replace("-", "_"), None) or module.cli
    return int(cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
