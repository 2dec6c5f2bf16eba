"""Speed tries on the CPU: channels_last and torch.compile against embedtrain's plain update, side by side.

    python -m bench.bench_tries [--sizes demo,mid] [--batch-sizes 1,4] [--updates 20] [--repeats 3]
                                [--variants plain,channels_last,compile]

Each variant trains the same run (same model, data, seed, defaults) through `Trainer.run`; only the UNet
is changed: `channels_last` puts its weights in NHWC memory format, `compile` wraps it in
`torch.compile` (inductor). Variants are interleaved per repeat, so drift hits all alike. Printed per
variant: the median steady-state update time (the first two updates left out), its ratio to `plain`,
and for `compile` the extra time of the first update (the compilation), which a run pays once.
A try is worth keeping only where the ratio is clearly under 1 and the compile cost pays back within
a typical run (bench/README.md records the results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


KEEP_BELOW = 0.95   # a try is kept only where it saves at least 5% of the update time, everywhere measured


def apply(variant: str, trainer, pipe) -> None:
    import torch
    pipe.unet.to(memory_format=torch.channels_last if variant == "channels_last" else torch.contiguous_format)
    trainer.unet = torch.compile(pipe.unet) if variant == "compile" else pipe.unet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="demo,mid")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="plain,channels_last,compile")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - {"plain", "channels_last", "compile"}
    if unknown or "plain" not in variants:
        ap.error(f"--variants: plain plus any of channels_last, compile; got {args.variants!r}")

    import torch

    from bench.bench_step import build, make_data
    from embedtrain import models
    from embedtrain.config import TrainConfig
    from embedtrain.trainer import Trainer
    tmp = Path(tempfile.mkdtemp(prefix="bench-tries-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32; medians of {args.repeats} "
          f"repeats of {args.updates} updates (first 2 left out)")
    results: dict[str, list] = {}
    print(f"{'model':<6} {'BS':>3} {'variant':<14} {'ms/update':>10} {'/ plain':>8} {'first update +s':>16}")
    for size in args.sizes.split(","):
        pipe = build(size)
        info = models._info(pipe, size, size)
        res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        data = make_data(tmp / f"data-{size}", 8, res)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            cfg = TrainConfig(model=size, data=str(data), name="benchtok", init_text="circle", steps=args.updates + 2,
                              batch_size=bs, resolution=res, template="object", out=str(tmp), lr=1e-3)
            steady = {v: [] for v in variants}
            first = {v: [] for v in variants}
            for r in range(args.repeats):
                for v in variants:
                    trainer = Trainer(cfg.replace(name=f"t{bs}{v[:2]}{r}"), pipe=pipe, info=info, log=lambda *a: None)
                    apply(v, trainer, pipe)
                    stamps = []
                    t0 = time.perf_counter()
                    trainer.run(tmp / f"run-{size}-{bs}-{v}-{r}",
                                on_event=lambda ev: ev["event"] == "update" and stamps.append(time.perf_counter()))
                    times = [b - a for a, b in zip([t0] + stamps, stamps)]
                    steady[v].append(statistics.median(times[2:]))
                    first[v].append(times[0])
            pipe.unet.to(memory_format=torch.contiguous_format)
            base = statistics.median(steady["plain"])
            base_first = statistics.median(first["plain"])
            for v in variants:
                m = statistics.median(steady[v])
                extra = max(first[v]) - base_first if v == "compile" else statistics.median(first[v]) - base_first
                print(f"{size:<6} {bs:>3} {v:<14} {m * 1e3:>10.1f} {m / base:>8.3f} {extra:>16.1f}", flush=True)
                results.setdefault(v, []).append((f"{size} BS {bs}", m / base, extra, base - m))
    for v, rows in results.items():
        if v == "plain":
            continue
        helps = all(r <= KEEP_BELOW for _, r, _, _ in rows)
        pay = [f"{extra / gain:.0f}" if gain > 0 else "never" for _, _, extra, gain in rows]
        print(f"verdict {v}: time ratio to plain {', '.join(f'{w} {r:.2f}' for w, r, _, _ in rows)}; "
              f"{'helps (every ratio <= ' + str(KEEP_BELOW) + ')' if helps else 'no clear gain: not kept'}"
              + (f"; its one-off cost pays back after {', '.join(pay)} updates" if v == "compile" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
