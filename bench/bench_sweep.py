"""Benchmark: a sweep of K candidate LRs against K separate `train` runs of the same length.

The sweep loads the model once, encodes the latent cache once and resets the embedding between
candidates; K separate runs pay the model load and the cache K times. Both do the same training work:
the same updates, the same validation measurements. The separate runs are either in-process `train()`
calls (`--separate inprocess`, the default and the conservative comparison: no interpreter or torch
import per run) or `python -m embedtrain train` processes (`--separate cli`, what a user does by hand).

Prints the median wall time of each over --repeats and the ratio sweep / separate (below 1: the sweep
is cheaper).

    python -m bench.bench_sweep                  # demo model, K = 3, 2 epochs each, 3 repeats
    python -m bench.bench_sweep --model tiny --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default=str(ROOT / "assets" / "demo_dataset"))
    p.add_argument("--name", default="pstar")
    p.add_argument("--init-text", default="star")
    p.add_argument("--k", type=int, default=3, help="candidates")
    p.add_argument("--epochs", type=float, default=2, help="epochs per candidate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--separate", choices=("inprocess", "cli"), default="inprocess")
    args = p.parse_args(argv)

    from embedtrain.calculator import derive, split_counts
    from embedtrain.config import TrainConfig, apply_preset
    from embedtrain.data import scan_folder
    from embedtrain.lr_finder import default_candidates, finder_config, sweep
    from embedtrain.trainer import train

    quiet = lambda *a, **k: None  # noqa: E731
    cfg = apply_preset(TrainConfig(model=args.model, data=args.data, name=args.name, init_text=args.init_text),
                       explicit={"model", "data", "name", "init_text"})
    cfg, _ = finder_config(cfg, typed=set())
    candidates = default_candidates(cfg.lr, args.k)
    n_train, n_val = split_counts(len(scan_folder(args.data, cfg.resolution)[0]), cfg.val_split)
    upe = derive(n_train, cfg.batch_size, cfg.grad_accum, 1, "update").updates_per_epoch
    import math
    updates = max(2, math.ceil(args.epochs * upe - 1e-9))
    val_every = max(1, min(math.floor(upe + 0.5), updates // 8))
    print(f"model {args.model}: {n_train} training + {n_val} validation images, BS {cfg.batch_size}; "
          f"{args.k} candidates {candidates} x {updates} updates, validation every {val_every}")

    # untimed warm-up: the first model load in a process also pays the diffusers/transformers imports
    from embedtrain.models import load_pipeline
    load_pipeline(cfg.model)

    sweep_t, separate_t = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            sweep(cfg, Path(tmp) / "sweep", candidates=candidates, epochs=args.epochs, val_every=val_every, log=quiet)
            sweep_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            for i, lr in enumerate(candidates):
                run_cfg = cfg.replace(lr=lr, lr_schedule="constant", steps=updates, step_unit="update",
                                      val_every=val_every, out=tmp, run_name=f"sep{i}")
                if args.separate == "inprocess":
                    train(run_cfg.validate(), Path(tmp) / f"sep{i}", log=quiet)
                else:
                    flags = [f"--{k.replace('_', '-')}={v}" for k, v in run_cfg.to_dict().items()
                             if not isinstance(v, bool)]
                    subprocess.run([sys.executable, "-m", "embedtrain", "train", *flags], cwd=str(ROOT), check=True,
                                   stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            separate_t.append(time.perf_counter() - t)
        print(f"repeat {r + 1}: sweep {sweep_t[-1]:.1f} s, {args.k} separate runs ({args.separate}) "
              f"{separate_t[-1]:.1f} s")
    s, k = statistics.median(sweep_t), statistics.median(separate_t)
    print(f"median: sweep of {args.k} candidates {s:.1f} s, {args.k} separate train runs {k:.1f} s; "
          f"ratio sweep / separate = {s / k:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
