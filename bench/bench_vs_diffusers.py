"""embedtrain vs the public diffusers textual-inversion example, side by side in one run.

Both train the same embedding on the same local model folder (a mid-size SD-architecture model built
from config and saved in diffusers format), the same images, resolution, batch size, gradient
accumulation and learning rate, fp32 on the CPU, each as its own process started the same way.

    python -m bench.bench_vs_diffusers --example PATH/textual_inversion.py [--size mid] [--batch-size 1]

PATH is a local copy of diffusers' `examples/textual_inversion/textual_inversion.py` (never commit
it); without `--example` the benchmark says it skipped. Both run under one small runner that stamps
every optimizer step (torch's global step hook): the time per update is the median interval between
consecutive weight updates inside the long runs (the first two left out), so imports, model loading
and embedtrain's one-off latent caching stay out. The older estimate from two run lengths,
(time(long) - time(short)) / (long - short), is printed as a cross-check; it read 1.18x and 0.99x
in two sessions, process start-up varying by seconds. Peak memory is each process's
maximum RSS (wait4). Medians of `--repeats`. Targets: >= 1.5x the example's updates/s, no more peak memory.

torchvision: the example imports it for one thing, `transforms.RandomHorizontalFlip` on a PIL image.
Where torchvision is not installed (on this machine its wheels are CUDA builds that fail against the
CPU torch), the runner also provides that one class to the example (a PIL flip with
probability p) and says so; the work timed is unchanged.
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

# Both tools run under this one runner, started the same way. It stamps the time of every optimizer
# step (torch's global step hook, one line per weight update to $BENCH_STEP_STAMPS), so the time per
# update is the median interval between steps inside the run: loading, caching and process start-up
# stay out of it. For the example where torchvision is not installed, it also provides a stand-in
# `torchvision.transforms.RandomHorizontalFlip` (a PIL flip with probability p), put in sys.modules
# only after transformers and diffusers were imported, so their own torchvision checks still see none.
RUNNER = '''import os, random, runpy, sys, time, types
from torch.optim.optimizer import register_optimizer_step_post_hook
_stamps = open(os.environ["BENCH_STEP_STAMPS"], "w", buffering=1)
register_optimizer_step_post_hook(
    lambda opt, args, kwargs: _stamps.write(repr(time.perf_counter()) + "\\n"))
if os.environ.get("BENCH_TORCHVISION_STAND_IN") == "1":
    import diffusers, transformers  # noqa: F401  (their torchvision checks run now, with none installed)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    from PIL import Image

    class RandomHorizontalFlip:
        def __init__(self, p=0.5):
            self.p = p

        def __call__(self, img):
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else img

    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tr.RandomHorizontalFlip, tv.transforms = RandomHorizontalFlip, tr
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.startswith("module:"):
    runpy.run_module(target[len("module:"):], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
'''

DIFFERENCES = """What differs in the work done per update (same model, data, BS, GA, LR, fp32, CPU):
- latents: embedtrain encodes each image once before training (posterior mean, cached); the example runs
  the VAE encoder on every image of every batch (latent_dist.sample()).
- optimized parameters: embedtrain's optimizer holds only the new vectors (vectors x dim); the example
  optimizes the whole token-embedding table and copies the original rows back after every step.
- data: the example decodes, resizes and flips each image from disk in a DataLoader on every step;
  embedtrain flips cached latents (flip off here) and caches tokenised prompts.
- bookkeeping: embedtrain writes a log row and an event per update (its defaults); neither validates,
  previews or saves snapshots inside the timed updates."""


def torchvision_loads(env: dict) -> bool:
    probe = subprocess.run([sys.executable, "-c", "from torchvision import transforms"], env=env,
                           capture_output=True, text=True)
    return probe.returncode == 0


def vae_unet_flops(unet, vae, resolution: int) -> tuple[float, float]:
    """FLOPs of one UNet forward (BS 1, 77 tokens) and of one VAE encode of a resolution x resolution image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    device = next(unet.parameters()).device
    lat = unet.config.sample_size
    x = torch.zeros(1, 4, lat, lat, device=device)
    hidden = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device)
    image = torch.zeros(1, 3, resolution, resolution, device=device)
    return (count(lambda: unet(x, torch.tensor([10], device=device), hidden)),
            count(lambda: vae.encode(image)))


def part_times(pipe, batch_size: int, resolution: int, repeats: int = 5) -> dict:
    """Median seconds, on this machine, of the two parts that decide the ceiling: the work both tools do
    (UNet forward + backward into the text embedding) and the one the example adds (a VAE encode)."""
    import torch
    unet, vae = pipe.unet, pipe.vae
    lat = unet.config.sample_size
    x = torch.randn(batch_size, 4, lat, lat)
    t = torch.full((batch_size,), 500)
    image = torch.randn(batch_size, 3, resolution, resolution)
    hidden0 = torch.randn(batch_size, 77, unet.config.cross_attention_dim)

    def unet_update():
        hidden = hidden0.clone().requires_grad_(True)
        unet(x, t, hidden).sample.pow(2).mean().backward()

    def vae_encode():
        with torch.no_grad():
            vae.encode(image).latent_dist.sample()

    out = {}
    for name, fn in (("unet", unet_update), ("vae", vae_encode)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def sd15_vae_unet_ratio() -> float:
    """VAE encode / UNet forward FLOPs of SD 1.5 (its published sizes) at 512 px, counted on the meta device."""
    import torch
    from bench.bench_step import SD15
    from embedtrain.demo.model import build_pipeline
    with torch.device("meta"):
        pipe = build_pipeline(SD15)
        unet_flops, vae_flops = vae_unet_flops(pipe.unet, pipe.vae, SD15["resolution"])
    return vae_flops / unet_flops


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, median seconds between weight updates) of one process."""
    stamps = log.parent / "step_stamps.txt"
    env = dict(env, BENCH_STEP_STAMPS=str(stamps))
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed (exit {proc.returncode}); its output is in {log}:\n"
                         + log.read_text()[-3000:])
    t = [float(x) for x in stamps.read_text().split()]
    gaps = [b - a for a, b in zip(t[2:], t[3:])]   # the first updates warm up allocators and caches
    return wall, usage.ru_maxrss / 1024, statistics.median(gaps) if gaps else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", default="", help="local copy of diffusers' textual_inversion.py")
    ap.add_argument("--size", choices=("mid", "demo"), default="mid")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--short", type=int, default=4, help="updates of the short runs")
    ap.add_argument("--long", type=int, default=16, help="updates of the long runs")
    ap.add_argument("--updates", type=int, default=0, help="shorthand: --long N, --short N // 4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args(argv)
    if args.updates:
        args.long, args.short = args.updates, max(1, args.updates // 4)
    if not args.example:
        print("skipped: no --example PATH (a local copy of diffusers' examples/textual_inversion/"
              "textual_inversion.py); target >= 1.5x updates/s and <= 1.0x peak memory not measured")
        return 0
    example = Path(args.example).resolve()
    if not example.is_file():
        ap.error(f"--example: {example} is not a file")

    from bench.bench_step import MID, make_data
    from embedtrain.demo.model import build_pipeline
    work = Path(tempfile.mkdtemp(prefix="embedtrain-vs-diffusers-"))
    pipe = build_pipeline(MID if args.size == "mid" else "demo")
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet_flops, vae_flops = vae_unet_flops(pipe.unet, pipe.vae, res)
    proportions = (f"VAE encode / UNet forward FLOPs: this model {vae_flops / unet_flops:.2f} "
                   f"({unet_flops / 1e9:.2f} GFLOP UNet forward), SD 1.5 at 512 px {sd15_vae_unet_ratio():.2f}")
    pipe.unet.requires_grad_(False)   # frozen, as in both tools (not saved with the weights)
    pipe.vae.requires_grad_(False)
    parts = part_times(pipe, args.batch_size, res)
    proportions += (f"\nmeasured here (BS {args.batch_size}): UNet forward + backward into the text embedding "
                    f"{parts['unet'] * 1e3:.0f} ms, VAE encode {parts['vae'] * 1e3:.0f} ms: the most that latent caching "
                    f"alone can buy on this machine is about {(parts['unet'] + parts['vae']) / parts['unet']:.2f}x")
    print(proportions, flush=True)
    model_dir = work / "model"
    pipe.save_pretrained(model_dir)
    del pipe
    data = make_data(work / "data", args.images, res)
    for txt in data.glob("*.txt"):   # the example reads every file in the folder as an image
        txt.unlink()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    ex_env = dict(env)
    runner = str(work / "runner.py")
    (work / "runner.py").write_text(RUNNER)
    stand_in = ""
    if not torchvision_loads(ex_env):
        ex_env["BENCH_TORCHVISION_STAND_IN"] = "1"
        stand_in = " (torchvision does not load here: the example ran with the RandomHorizontalFlip stand-in)"

    def embedtrain_cmd(n: int, out: Path) -> list[str]:
        return [sys.executable, runner, "module:embedtrain", "train", "--model", str(model_dir), "--data", str(data),
                "--name", "zorb", "--init-text", "circle", "--template", "object", "--resolution", str(res),
                "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--steps", str(n),
                "--step-unit", "update", "--lr", str(args.lr), "--out", str(out), "--device", "cpu",
                "--mixed-precision", "no", "--seed", "0"]

    def example_cmd(n: int, out: Path) -> list[str]:
        return [sys.executable, runner, str(example), "--pretrained_model_name_or_path", str(model_dir),
                "--train_data_dir", str(data), "--placeholder_token", "<zorb>", "--initializer_token", "circle",
                "--learnable_property", "object", "--resolution", str(res),
                "--train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", str(args.grad_accum),
                "--max_train_steps", str(n), "--learning_rate", str(args.lr), "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--output_dir", str(out), "--report_to", "all", "--seed", "0",
                "--checkpointing_steps", "1000000", "--save_steps", "1000000", "--mixed_precision", "no",
                "--dataloader_num_workers", "0"]

    runs = {("embedtrain", n): [] for n in (args.short, args.long)}
    runs.update({("example", n): [] for n in (args.short, args.long)})
    for r in range(args.repeats):
        for n in (args.short, args.long):
            for tool in ("embedtrain", "example"):   # interleaved, so drift hits both alike
                out = work / f"{tool}-{n}-{r}"
                out.mkdir()
                cmd = embedtrain_cmd(n, out) if tool == "embedtrain" else example_cmd(n, out)
                wall, rss, gap = timed(cmd, env if tool == "embedtrain" else ex_env, out / "output.log")
                runs[(tool, n)].append((wall, rss, gap))
                print(f"repeat {r + 1}: {tool:<10} {n:>3} updates: {wall:6.1f} s, peak RSS {rss:7.1f} MiB, "
                      f"median {gap * 1e3:6.1f} ms between updates", flush=True)

    def med(tool, n, i):
        return statistics.median(x[i] for x in runs[(tool, n)])

    per = {t: med(t, args.long, 2) for t in ("embedtrain", "example")}   # in-run step intervals, long runs
    by_length = {t: (med(t, args.long, 0) - med(t, args.short, 0)) / (args.long - args.short)
                 for t in ("embedtrain", "example")}
    peak = {t: max(med(t, args.long, 1), med(t, args.short, 1)) for t in ("embedtrain", "example")}
    print(f"\n{args.size}-size model ({res} px), {args.images} images, BS {args.batch_size}, GA {args.grad_accum}, "
          f"fp32 CPU, {args.threads} threads; medians of {args.repeats}{stand_in}")
    print(proportions)
    print(f"{'':<11} {'s/update':>9} {'updates/s':>10} {'whole run ' + str(args.long) + ' upd':>17} {'peak MiB':>9}")
    for t in ("embedtrain", "example"):
        print(f"{t:<11} {per[t]:>9.3f} {1 / per[t]:>10.3f} {med(t, args.long, 0):>15.1f} s {peak[t]:>9.1f}")
    speed = per["example"] / per["embedtrain"]
    mem = peak["embedtrain"] / peak["example"]
    print(f"updates/s embedtrain / example: {speed:.2f} (target >= 1.5: {'met' if speed >= 1.5 else 'NOT met'})")
    print(f"cross-check from whole-process times, (t({args.long}) - t({args.short})) / {args.long - args.short}: "
          f"embedtrain {by_length['embedtrain']:.3f} s, example {by_length['example']:.3f} s per update, ratio "
          f"{by_length['example'] / by_length['embedtrain']:.2f} (noisier: process start-up varies by seconds)")
    print(f"peak memory embedtrain / example: {mem:.2f} (target <= 1.0: {'met' if mem <= 1.0 else 'NOT met'})")
    print(DIFFERENCES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
