"""Benchmark: a seed-locked grid of N embeddings x P prompts x S seeds against a loop that reloads the
pipeline for each embedding (what a hand-written script does: load the model, load one embedding,
render its P x S images one by one).

Both render the same N x P x S images with the same settings. The grid loads the model once and batches
cells (rows of one column); the loop pays N model loads and renders one image at a time. Also prints
the grid's cost in "single images + one model load" (measured separately), the issue's yardstick.

Prints medians over --repeats (CPU seconds by default; --clock wall) and the ratio loop / grid (above 1:
the grid is cheaper).

    python -m bench.bench_grid                      # tiny model, N=3, P=2, S=2, 4 sampler steps, 3 repeats, 1 thread
    python -m bench.bench_grid --model demo --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a shared CPU, OpenMP threads that spin while waiting turn other people's load into our CPU seconds.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=3, help="embeddings")
    p.add_argument("--p", type=int, default=2, help="prompts")
    p.add_argument("--s", type=int, default=2, help="seeds")
    p.add_argument("--steps", type=int, default=4, help="sampler steps per image")
    p.add_argument("--batch", type=int, default=8, help="grid cells rendered together")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: process CPU seconds (default); "
                   "wall: elapsed seconds")
    args = p.parse_args(argv)

    import torch

    from embedtrain.embedding import save_embedding
    from embedtrain.grid import GridSettings, fill, load_columns, render_grid
    from embedtrain.models import load_pipeline

    torch.set_num_threads(args.threads)
    # CPU seconds of this process by default: the dev machines are shared, and wall time there mostly
    # measures the neighbours. --clock wall for a machine of your own (or a GPU).
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    prompts = ["a photo of {}", "a {} on a green background", "a painting of {}", "a close up photo of {}"][:args.p]
    seeds = list(range(1, args.s + 1))
    settings = GridSettings(prompts=prompts, seeds=seeds, sample_steps=args.steps, batch_size=args.batch)

    tmp = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    pipe, info = load_pipeline(args.model)   # warm-up: imports, and the embedding width
    dim = pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    files = [save_embedding(tmp / f"e{i}.safetensors", torch.randn(1, dim, generator=g), f"e{i}") for i in
             range(args.n)]
    res = info.resolution

    def one_image(pipe_, text, seed):
        with torch.no_grad():
            return pipe_(text, generator=torch.Generator().manual_seed(seed), num_inference_steps=args.steps,
                         height=res, width=res).images[0]

    def grid_run():
        t = clock()
        pipe_, info_ = load_pipeline(args.model)
        render_grid(pipe_, info_, files, settings)
        return clock() - t

    def loop_run():
        t = clock()
        for f in files:
            pipe_, _ = load_pipeline(args.model)
            col, = load_columns(pipe_, [f])
            for prompt in prompts:
                for seed in seeds:
                    one_image(pipe_, fill(prompt, col.text), seed)
        return clock() - t

    def load_time():
        t = clock()
        load_pipeline(args.model)
        return clock() - t

    def image_time():
        t = clock()
        one_image(pipe, "a photo of star", 1)
        return clock() - t

    one_image(pipe, "a photo of star", 1)  # warm-up of the sampling path
    grid_t, loop_t, load_t, img_t = [], [], [], []
    for r in range(args.repeats):
        grid_t.append(grid_run())
        loop_t.append(loop_run())
        load_t.append(load_time())
        img_t.append(statistics.median(image_time() for _ in range(3)))
        print(f"repeat {r + 1}: grid {grid_t[-1]:.2f} s, loop {loop_t[-1]:.2f} s, load {load_t[-1]:.2f} s, "
              f"one image {img_t[-1]:.3f} s", flush=True)
    cells = args.n * args.p * args.s
    grid_m, loop_m = statistics.median(grid_t), statistics.median(loop_t)
    load_m, img_m = statistics.median(load_t), statistics.median(img_t)
    print(f"\nmodel {info.name} ({info.resolution} px), {args.n} embeddings x {args.p} prompts x {args.s} seeds = "
          f"{cells} images, {args.steps} sampler steps, grid batch {args.batch}, {args.threads} threads, "
          f"medians of {args.repeats}, {args.clock} seconds")
    print(f"grid (1 load + batched cells):        {grid_m:.2f} s")
    print(f"loop (reload per embedding, 1 by 1):  {loop_m:.2f} s")
    print(f"ratio loop / grid:                    {loop_m / grid_m:.2f}")
    yard = load_m + cells * img_m
    print(f"yardstick 1 load + {cells} single images:  {yard:.2f} s  ({load_m:.2f} + {cells} x {img_m:.3f}); "
          f"grid / yardstick = {grid_m / yard:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
