"""Does a crowd of open pages slow a training job? The job's update rate with no page open, with N
sessions polling the app's status endpoint once a second (what each open page's timer does), and with
none again; measured side by side in one run. Target: the rate drops by at most 10%.

    python -m bench.bench_polling [--sessions 20] [--window 30] [--model demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def updates_between(run: Path, t0: float, t1: float) -> int:
    n = 0
    for line in (run / "events.jsonl").read_text().splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "update" and t0 <= ev["t"] < t1:
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    ap.add_argument("--model", default="demo")
    args = ap.parse_args(argv)

    import httpx

    from embedtrain.config import TrainConfig, apply_preset
    from embedtrain.ui.jobs import JobManager
    from tests.uihelp import app_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-polling-"))
    outputs = tmp / "outputs"
    outputs.mkdir()
    with app_server(outputs) as url:
        jobs = JobManager(outputs)
        cfg = apply_preset(TrainConfig(model=args.model, data=str(ROOT / "assets" / "demo_dataset"),
                                       name="pollstar", steps=1_000_000, preview_every=0, val_every=0),
                           explicit={"steps", "preview_every", "val_every"})
        run = jobs.start(cfg)
        try:
            while jobs.status().update < 3:  # past start-up
                time.sleep(0.5)
            stop = threading.Event()
            calls = [0]

            def session():
                # What an open page's 1 s timer costs the server: one queued /status event (join, then its
                # SSE stream to completion), over plain HTTP. gradio_client costs ~0.1 CPU-s per call on
                # the client side, so 20 of them in this process would measure the clients, not the app.
                # Each call gets the full view (plots included), as each open page's poll does: the pages
                # share one view per state of the run, rebuilt at most every PLOT_REFRESH_S.
                with httpx.Client(base_url=url, timeout=60) as http:
                    while not stop.is_set():
                        t = time.time()
                        event = http.post("/gradio_api/call/status", json={"data": []}).json()["event_id"]
                        with http.stream("GET", f"/gradio_api/call/status/{event}") as r:
                            for line in r.iter_lines():
                                if line.startswith("event: complete") or line.startswith("event: error"):
                                    break
                        calls[0] += 1
                        stop.wait(max(0.0, 1.0 - (time.time() - t)))

            def window():
                t0 = time.time()
                time.sleep(args.window)
                t1 = time.time()
                time.sleep(2)  # let the last events land
                return updates_between(run, t0, t1) / (t1 - t0)

            before = window()
            threads = [threading.Thread(target=session, daemon=True) for _ in range(args.sessions)]
            for th in threads:
                th.start()
            time.sleep(5)  # clients connected
            calls[0] = 0
            loaded = window()
            n_calls = calls[0]
            stop.set()
            for th in threads:
                th.join(10)
            after = window()
        finally:
            jobs.stop()
            jobs.wait(60)
    base = (before + after) / 2
    drop = 1 - loaded / base if base else float("nan")
    print(f"model {args.model}; windows of {args.window:.0f} s; {args.sessions} sessions polling /status every 1 s "
          f"({n_calls / (args.window + 2):.1f} calls/s served)")
    print(f"updates/s: no page {before:.3f}, {args.sessions} pages {loaded:.3f}, no page again {after:.3f}")
    print(f"drop {drop:+.1%} (target <= 10%: {'met' if drop <= 0.10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
