"""Limit ratio: embedtrain's median weight-update time / the bare work of one update.

The bare work of a textual-inversion update is: text encoder forward, UNet forward, MSE, backward into
the new vectors (the UNet and text encoder weights are frozen). The bare loop here does exactly that
on pre-made tensors (ids tokenized once, noisy latents made once) with the same modules, so the ratio
is what embedtrain's loop adds: data order, noise and timesteps, tokenisation, optimizer, logging,
validation at its default interval, bookkeeping. Target <= 1.10 at BS 1 and BS 4.

    python -m bench.bench_step [--updates 30] [--repeats 3] [--sizes demo,mid]

Prints medians over repeats, measured side by side in this one process. CPU fp32 here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# SD 1.5's published sizes (its text encoder is CLIP ViT-L: 768 wide, 12 layers). Too big to run here;
# bench_vs_diffusers.py counts its FLOPs on the meta device.
SD15 = dict(unet_channels=(320, 640, 1280, 1280), layers=2, cross_dim=768, heads=8, te_layers=12,
            vae_channels=(128, 256, 512, 512), vae_layers=2, resolution=512, norm_groups=32, layout="sd")
# The mid-size model: SD 1.5 at a quarter of its width and resolution. SD 1.5's block layout and layer
# counts, UNet channels 320/640/1280/1280 -> 80/160/320/320, VAE 128/256/512/512 -> 32/64/128/128
# (8x down-sampling, 2 layers per block), text encoder 768 wide x 12 layers -> 256 x 4, 512 px -> 128 px.
# The proportion that decides what latent caching buys is kept: a VAE encode costs 1.47 UNet forwards in
# FLOPs here, 1.39 in SD 1.5 at 512 px (bench_vs_diffusers.py prints both). ~55M UNet parameters: the
# UNet dominates an update, and it still runs on a 2-core CPU.
MID = dict(unet_channels=(80, 160, 320, 320), layers=2, cross_dim=256, heads=8, te_layers=4,
           vae_channels=(32, 64, 128, 128), vae_layers=2, resolution=128, norm_groups=16, layout="sd")


def make_data(folder: Path, n: int, size: int) -> Path:
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (30 * i % 255, 90, 160))
        ImageDraw.Draw(img).ellipse((size // 5, size // 5, size - size // 4, size - size // 3), fill=(200, 60, 90))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a circle")
    return folder


def build(size: str):
    from embedtrain.demo import model
    return model.build_pipeline(MID if size == "mid" else size)


def bare_update_times(trainer, n: int) -> list[float]:
    """The minimum work of an update, timed per update."""
    import torch
    import torch.nn.functional as F
    latents, noise, timesteps, prompts = trainer.batch_inputs(0)
    ids = trainer.tokenizer([trainer.token.expand(p) for p in prompts], padding="max_length", truncation=True,
                            max_length=trainer.tokenizer.model_max_length, return_tensors="pt").input_ids
    noisy = trainer.noise_scheduler.add_noise(latents, noise, timesteps)
    vec = trainer.token.vectors
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        hidden = trainer.text_encoder(ids)[0]
        pred = trainer.unet(noisy, timesteps, hidden).sample
        F.mse_loss(pred, noise).backward()
        with torch.no_grad():
            vec.grad = None
        times.append(time.perf_counter() - t0)
    return times[2:]


def embedtrain_update_times(trainer, n: int, run_dir: Path) -> list[float]:
    stamps = []

    def on_event(ev):
        if ev["event"] == "update":
            stamps.append(time.perf_counter())

    trainer.run(run_dir, on_event=on_event)
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="demo,mid")
    ap.add_argument("--batch-sizes", default="1,4")
    args = ap.parse_args(argv)

    import torch
    from embedtrain import models
    from embedtrain.config import TrainConfig
    from embedtrain.trainer import Trainer
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32; medians of {args.repeats} "
          f"repeats of {args.updates} updates")
    print(f"{'model':<6} {'BS':>3} {'bare ms':>9} {'embedtrain ms':>14} {'ratio':>7}  target <= 1.10")
    results = []
    for size in args.sizes.split(","):
        pipe = build(size)
        info = models._info(pipe, size, size)
        res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the model's own
        data = make_data(tmp / f"data-{size}", 8, res)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            cfg = TrainConfig(model=size, data=str(data), name="benchtok", init_text="circle",
                              steps=args.updates + 2, batch_size=bs, resolution=res, template="object", out=str(tmp), val_split=0.25,
                              val_every=0, log_every=1, lr=1e-3)
            bare, ours = [], []
            for r in range(args.repeats):  # interleaved, so drift hits both alike
                # a new token per repeat on the same loaded pipeline (a token can be added only once)
                trainer = Trainer(cfg.replace(name=f"bt{bs}r{r}"), pipe=pipe, info=info, log=lambda *a: None)
                bare.append(statistics.median(bare_update_times(trainer, args.updates)))
                ours.append(statistics.median(embedtrain_update_times(trainer, args.updates, tmp / f"run-{size}-{bs}-{r}")))
            b, o = statistics.median(bare), statistics.median(ours)
            ratio = o / b
            results.append(ratio)
            print(f"{size:<6} {bs:>3} {b * 1e3:>9.1f} {o * 1e3:>14.1f} {ratio:>7.3f}  {'met' if ratio <= 1.10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
