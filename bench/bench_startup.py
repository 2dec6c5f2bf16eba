"""Startup: time from `python app.py` to the first served page, against a bare Gradio hello-world started
the same way in the same run; and time from `python -m embedtrain train` to its first weight update.

    python -m bench.bench_startup [--repeats 3]

Targets: app page <= hello-world + 1.5 s; first update <= 15 s after start on the demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HELLO = """
import sys, gradio as gr
with gr.Blocks() as demo:
    gr.Markdown("hello")
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_page(cmd: list[str], port: int, timeout: float = 120.0) -> float:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{cmd} served nothing within {timeout} s")
    finally:
        proc.terminate()
        proc.wait(10)


def time_to_first_update(tmp: Path) -> float:
    data = ROOT / "assets" / "demo_dataset"
    out = tmp / f"runs-{time.time_ns()}"  # a fresh folder per repeat: never read an earlier run's events
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "embedtrain", "train", "--model", "demo", "--data", str(data),
                             "--name", "benchstar", "--steps", "3", "--preview-every", "0", "--out", str(out),
                             "--run-name", f"r{time.time_ns()}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        while time.perf_counter() - t0 < 300:
            for ev_file in out.glob("*/events.jsonl"):
                for line in ev_file.read_text().splitlines():
                    if json.loads(line).get("event") == "update":
                        return time.perf_counter() - t0
            if proc.poll() is not None and not list(out.glob("*/events.jsonl")):
                raise RuntimeError("train exited before its first update")
            time.sleep(0.05)
        raise RuntimeError("no weight update within 300 s")
    finally:
        proc.wait(120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    hello = tmp / "hello.py"
    hello.write_text(HELLO)
    h, a, u = [], [], []
    for _ in range(args.repeats):  # interleaved, so disk-cache warmth and drift hit both alike
        port = free_port()
        h.append(time_to_page([sys.executable, str(hello), str(port)], port))
        port = free_port()
        a.append(time_to_page([sys.executable, "app.py", "--port", str(port), "--outputs", str(tmp / "outputs")],
                              port))
        u.append(time_to_first_update(tmp))
    mh, ma, mu = statistics.median(h), statistics.median(a), statistics.median(u)
    print(f"medians of {args.repeats} (seconds): hello-world page {mh:.2f}, app page {ma:.2f}, "
          f"difference {ma - mh:+.2f} (target <= +1.50: {'met' if ma - mh <= 1.5 else 'NOT met'})")
    print(f"train start -> first weight update on the demo model: {mu:.2f} s (target <= 15: "
          f"{'met' if mu <= 15 else 'NOT met'})")
    print(f"all: hello {[round(x, 2) for x in h]}, app {[round(x, 2) for x in a]}, update {[round(x, 2) for x in u]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
