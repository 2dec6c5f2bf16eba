"""Full-size architectures: SD 1.5 and SDXL at their published sizes, random weights, through Trainer.run.

What an SD 1.5 or SDXL textual-inversion run costs in time and memory, measured on the real
architectures without downloading them: each model is built from its published hyper-parameters with
random weights (same layer counts, widths and attention layout as the released checkpoints; the numbers
of the weights do not change the cost), given a small generated dataset (non-square images, so SDXL's
micro-conditioning sees real sizes and crops) and trained for a few weight updates by the real
Trainer, with and without gradient checkpointing.

    python -m bench.bench_full_size [--models sd15,sdxl] [--resolution 512] [--updates 2] [--device cpu]
    python -m bench.bench_full_size --device cuda --resolution 1024 --precision bf16   # on a GPU

CPU: each (model, checkpointing) runs in its own process, so its peak RSS is its own; prints s/update
(median over the updates after the first) and peak RSS. CUDA: one process per model; prints s/update,
peak GPU memory allocated / reserved during caching and during training (torch.cuda.max_memory_*,
reset between phases), with the frozen weights in the autocast dtype as the trainer stores them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Published hyper-parameters. SD 1.5: UNet 320/640/1280/1280 with cross-attention in the first three
# levels, 8 heads, CLIP ViT-L/14 text encoder (768 wide, 12 layers, quick_gelu). SDXL base: UNet
# 320/640/1280 with 0/2/10 transformer layers per level, heads of 64 channels, cross-attention 2048
# (768 + 1280), "text_time" added conditioning (pooled 1280 + 6 x 256); text encoders CLIP ViT-L/14 and
# OpenCLIP ViT-bigG/14 (1280 wide, 32 layers, gelu, projection 1280). Both VAEs: 128/256/512/512.
ARCHS = {
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        encoders=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       hidden_act="quick_gelu", projection_dim=768)],
        vae=dict(sample_size=512, scaling_factor=0.18215), resolution=512),
    "sdxl": dict(
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        encoders=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       hidden_act="quick_gelu", projection_dim=768),
                  dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", projection_dim=1280)],
        vae=dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True), resolution=1024),
}


def build(arch: str, device: str = "cpu"):
    """The pipeline with random weights; modules are created on `device` (a GPU initialises them in seconds)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from embedtrain.demo.model import write_tokenizer
    a = ARCHS[arch]
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(Path(tempfile.mkdtemp(prefix="bench-tok-")))))
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **a["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, **a["vae"])
        encoders = []
        for k, e in enumerate(a["encoders"]):
            config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **e)
            encoders.append((CLIPTextModelWithProjection if k == 1 else CLIPTextModel)(config))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_data(folder: Path, n: int, resolution: int) -> Path:
    """n non-square images (landscape and portrait, 1.25:1) with captions."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (resolution * 5 // 4, resolution) if i % 2 else (resolution, resolution * 5 // 4)
        img = Image.new("RGB", (w, h), (40 * i % 255, 90, 160))
        ImageDraw.Draw(img).ellipse((w // 5, h // 5, w - w // 4, h - h // 3), fill=(200, 60, 90))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a circle")
    return folder


def measure(arch: str, gc: bool, args, pipe=None) -> dict:
    """One run of args.updates weight updates through Trainer.run; times every update from its events."""
    import torch

    from embedtrain.config import TrainConfig
    from embedtrain.models import _info
    from embedtrain.trainer import Trainer
    if pipe is None:
        t0 = time.perf_counter()
        pipe = build(arch, "cuda" if args.device == "cuda" else "cpu")
        print(f"  built {arch} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-full-"))
    data = make_data(work / "data", 4, args.resolution)
    name = f"benchtok{'gc' if gc else 'plain'}"
    cfg = TrainConfig(model=arch, data=str(data), name=name, init_text="circle", resolution=args.resolution,
                      batch_size=args.batch_size, steps=args.updates, device=args.device,
                      mixed_precision=args.precision, gradient_checkpointing=gc, val_split=0.0, preview_every=0,
                      save_every=0, template="object")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, pipe=pipe, info=_info(pipe, arch, arch), log=lambda *a: None)
    setup_s = time.perf_counter() - t0
    out = {"model": arch, "gc": gc, "resolution": args.resolution, "device": args.device,
           "precision": args.precision, "setup_s": round(setup_s, 1)}
    if cuda:
        torch.cuda.synchronize()
        out["weights_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        out["cache_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    stamps = []

    def on_event(e):
        if e["event"] == "update":
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    t_run = time.perf_counter()
    result = trainer.run(work / "run", on_event=on_event)
    gaps = [b - a for a, b in zip([t_run] + stamps, stamps)]
    out.update(status=result.status, updates=result.updates,
               s_per_update=round(statistics.median(gaps[1:] or gaps), 3), first_update_s=round(gaps[0], 3))
    if cuda:
        out["train_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["train_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    else:
        import resource
        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="no", help="no | fp16 | bf16 (GPU)")
    p.add_argument("--gc", default="off,on", help="gradient checkpointing settings to run: off,on")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: MODEL:GC
    args = p.parse_args(argv)
    if args.one:
        arch, gc = args.one.split(":")
        print("RESULT " + json.dumps(measure(arch, gc == "on", args)), flush=True)
        return 0
    rows = []
    for arch in args.models.split(","):
        if args.device == "cuda":   # GPU memory is measured per phase in one process; the model is built once
            import torch
            pipe = build(arch, "cuda")
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
            for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                if m is not None and dtype is not None:
                    m.to(dtype=dtype)   # as the trainer stores frozen weights under mixed precision
            torch.cuda.empty_cache()
            for gc in args.gc.split(","):
                rows.append(measure(arch, gc == "on", args, pipe))
                print(json.dumps(rows[-1]), flush=True)
            del pipe
            torch.cuda.empty_cache()
            continue
        for gc in args.gc.split(","):   # CPU: a process each, so each peak RSS is its own
            cmd = [sys.executable, "-m", "bench.bench_full_size", "--one", f"{arch}:{gc}", "--resolution", str(args.resolution),
                   "--updates", str(args.updates), "--batch-size", str(args.batch_size), "--device", args.device,
                   "--precision", args.precision]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{arch} gc={gc}: failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}", flush=True)
                continue
            rows.append(json.loads(line[0][7:]))
            print(json.dumps(rows[-1]), flush=True)
    print("\nmodel | px | GC | s/update | first update s | setup s | memory")
    for r in rows:
        mem = (f"peak RSS {r['peak_rss_gb']} GB" if "peak_rss_gb" in r else
               f"weights {r['weights_gb']} GB, caching peak {r['cache_peak_gb']} GB, training peak "
               f"{r['train_peak_gb']} GB (reserved {r['train_reserved_gb']} GB)")
        print(f"{r['model']} | {r['resolution']} | {'on' if r['gc'] else 'off'} | {r['s_per_update']} | "
              f"{r['first_update_s']} | {r['setup_s']} | {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
