"""Run every benchmark one after another and print each figure with its target and whether it is met.

    python -m bench.run_all [--quick] [--only step,startup,...] [--diffusers-example PATH]

Each benchmark runs in its own process (never two at once: they would time each other), its full
output is shown as it runs, and the lines that state a target are collected into a summary at the
end. Run it on an otherwise idle machine. `--quick` uses fewer repeats and shorter windows (for a
smoke check; quote the full run's numbers).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, full arguments, quick arguments)
BENCHES = {
    "step": ("bench_step.py", ["--updates", "12", "--repeats", "3"], ["--updates", "6", "--repeats", "1",
                                                                      "--sizes", "demo"]),
    "startup": ("bench_startup.py", ["--repeats", "3"], ["--repeats", "1"]),
    "polling": ("bench_polling.py", ["--sessions", "20", "--window", "30"], ["--sessions", "20", "--window", "10"]),
    "grid": ("bench_grid.py", ["--model", "demo"], ["--model", "tiny", "--repeats", "1"]),
    "sweep": ("bench_sweep.py", [], ["--repeats", "1"]),
    "diffusers": ("bench_vs_diffusers.py", ["--short", "4", "--long", "24", "--repeats", "3"],
                  ["--updates", "4", "--repeats", "1"]),
    "tries": ("bench_tries.py", ["--sizes", "mid", "--batch-sizes", "1,4", "--updates", "10", "--repeats", "2",
                                 "--variants", "plain,channels_last"],
              ["--sizes", "tiny", "--batch-sizes", "1", "--updates", "4", "--repeats", "1",
               "--variants", "plain,channels_last"]),
}
# a line of a benchmark's output that states a figure against its target
MARKERS = ("target", "met", "ratio", "skipped", "verdict", "measured here")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter windows")
    ap.add_argument("--only", default="", help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--diffusers-example", default="", help="path to a local copy of diffusers' "
                    "examples/textual_inversion/textual_inversion.py (never committed); without it that "
                    "comparison says it skipped")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    summary: list[tuple[str, str]] = []
    failed = []
    for name in names:
        script, full, quick = BENCHES[name]
        cmd = [sys.executable, "-m", f"bench.{Path(script).stem}", *(quick if args.quick else full)]
        if name == "diffusers" and args.diffusers_example:
            cmd += ["--example", args.diffusers_example]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(HERE.parent))
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip())
        rc = proc.wait()
        if rc != 0:
            failed.append(name)
            summary.append((name, f"FAILED (exit {rc}) after {time.time() - t0:.0f} s"))
            continue
        picked = [ln for ln in lines if any(m in ln.lower() for m in MARKERS)]
        summary += [(name, ln.strip()) for ln in picked] or [(name, "(no target line printed)")]
        summary.append((name, f"[{time.time() - t0:.0f} s]"))
    print("\n=== summary")
    for name, line in summary:
        print(f"{name:<10} {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
