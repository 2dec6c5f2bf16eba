"""Pretrain the tiny demo Stable Diffusion model on the demo world, on a CPU.

    python -m embedtrain.demo.pretrain --out assets/demo_model [--minutes 70] [--seed 0]

1. VAE (AutoencoderKL): `--vae-steps` updates on fresh renders (MSE + L1, tiny KL), then frozen.
2. A fixed set of `--images` renders (never the held-out purple star) is encoded once; the latent
   scaling factor is set so latents have unit variance, as in SD.
3. UNet + CLIP text encoder from scratch with the DDPM noise-prediction loss, min-SNR-5 weighting
   (the prototype's loss plateaued without it), 10% empty captions for classifier-free guidance,
   AdamW with warmup + cosine decay, and an EMA of the weights, which is what is saved.
   Each step draws a fresh caption of each image (many templates: see world.caption).

With `--unet-steps 0` (default) the number of UNet updates is fitted to `--minutes` from the speed
of the first updates; it is written in the card, so `--unet-steps N` reproduces the run exactly.
The pipeline (EMA weights, fp32 safetensors, the demo's sampler `model.SCHEDULER`) is saved
every `--checkpoint-minutes`, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from embedtrain.demo.card import CARD_STATS, LEGACY_DECODER_KEYS, SCORES, decoder_phases, write_card
from embedtrain.demo.world import WORDS, caption, complete, pretraining_sample, render, Spec
from embedtrain.fileio import current_umask



def images_to_tensor(images, device="cpu"):
    import numpy as np
    import torch
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device)


def lr_at(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warmup, then cosine from base down to floor * base at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, steps: int, batch_size: int, seed: int, lr: float, log, device="cpu",
              decoder_only: bool = False, deadline: float | None = None) -> list[float]:
    """Train the VAE on fresh renders: MSE + L1, tiny KL; then freeze it.

    `decoder_only`: train only the decoder (and post_quant_conv) with the encoder frozen. The latent
    space is then the encoder's, so a UNet trained on it stays valid: this sharpens what the decoder
    makes of the same latents (colours and small shapes are what an undertrained decoder gets wrong).
    Its inputs are posterior samples, so the decoder also tolerates latents slightly off the means."""
    import torch
    rng = random.Random(seed)
    if decoder_only:
        vae.requires_grad_(False)
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        for q in params:
            q.requires_grad_(True)
        vae.eval()
        vae.decoder.train()
    else:
        params = list(vae.parameters())
        vae.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    what = "decoder" if decoder_only else "vae"
    losses = []
    for step in range(steps):
        if deadline is not None and time.time() > deadline:
            log(f"{what}: time budget reached after {step} updates")
            break
        batch = images_to_tensor([render(complete(Spec(), rng)) for _ in range(batch_size)], device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=20 if decoder_only else 50, floor=0.05)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(batch).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, batch) + 0.5 * (rec - batch).abs().mean()
        if not decoder_only:
            loss = loss + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"{what} step {step:5d}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    vae.eval()
    vae.requires_grad_(False)
    return losses


def decoder_only(args, log=print) -> dict:
    """`--decoder-only`: fine-tune the decoder of the pipeline saved in --out, in place."""
    import torch
    from diffusers import AutoencoderKL
    t0 = time.time()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    stats = json.loads((out / CARD_STATS).read_text(encoding="utf-8"))
    dev = torch.device(args.device)
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).to(dev)
    before = vae_recon_accuracy(vae, args.seed + 15, device=dev)
    log(f"before: the judge reads {before:.1%} of 200 reconstructed renders right")
    torch.manual_seed(args.seed + 50)
    losses = train_vae(vae, args.decoder_steps, args.vae_batch_size, args.seed + 50, args.decoder_lr, log, dev,
                       decoder_only=True, deadline=t0 + args.minutes * 60)
    after = vae_recon_accuracy(vae, args.seed + 15, device=dev)
    log(f"after {len(losses)} decoder updates: the judge reads {after:.1%}")
    phases = decoder_phases(stats) + [dict(
        command=args.command, steps=len(losses),
        batch_size=args.vae_batch_size, lr=args.decoder_lr, loss=sum(losses[-50:]) / max(1, len(losses[-50:])),
        recon_before=before, recon_after=after, minutes=(time.time() - t0) / 60)]
    for key in LEGACY_DECODER_KEYS:
        stats.pop(key, None)
    stats.update(decoder_phase_log=phases, decoder_steps=sum(ph["steps"] for ph in phases),
                 vae_recon_judge_accuracy=after)
    tmp = Path(tempfile.mkdtemp(prefix="vae.tmp-", dir=out))
    os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp's 0700 would follow the rename
    try:
        vae.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
        old = out / "vae.old"
        shutil.rmtree(old, ignore_errors=True)
        (out / "vae").rename(old)
        tmp.rename(out / "vae")
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    (out / CARD_STATS).write_text(json.dumps(stats, indent=2), encoding="utf-8")
    write_card(out, stats)
    return stats


def vae_recon_accuracy(vae, seed: int, n: int = 200, device="cpu") -> float:
    """Fraction of reconstructed renders whose shape, colour and background the judge reads right."""
    import torch
    from PIL import Image
    from embedtrain.demo.judge import agrees, judge
    rng = random.Random(seed)
    specs = [complete(Spec(), rng) for _ in range(n)]
    with torch.no_grad():
        x = images_to_tensor([render(s) for s in specs], device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return sum(agrees(judge(Image.fromarray(a)), s) for a, s in zip(arr, specs)) / n


def sampling_scheduler(config):
    """The demo's sampler (`model.SCHEDULER`) with the noise schedule of `config`; only its own keys are
    kept, so the saved scheduler_config.json lists no settings of another scheduler."""
    import inspect
    import diffusers
    from embedtrain.demo.model import SCHEDULER
    cls = getattr(diffusers, SCHEDULER)
    own = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in config.items() if k in own})


def save_pipeline(pipe, ema, out: Path, stats: dict, log) -> None:
    """Save the pipeline with EMA weights to `out`, replacing the folder only once it is complete."""
    import torch
    backup = [p.detach().clone() for p in ema.params]
    for p, e in zip(ema.params, ema.shadow):
        p.data.copy_(e)
    sched = pipe.scheduler
    pipe.scheduler = sampling_scheduler(sched.config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp's 0700 would follow the rename
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / CARD_STATS).write_text(json.dumps(stats, indent=2), encoding="utf-8")
        if (out / SCORES).is_file():    # scores of earlier weights stay, shown as such by the card
            shutil.copy2(out / SCORES, tmp / SCORES)
        write_card(tmp, stats)
        old = None
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        pipe.scheduler = sched
        with torch.no_grad():
            for p, b in zip(ema.params, backup):
                p.data.copy_(b)
    log(f"saved {out} (step {stats.get('unet_steps_done')})")


class EMA:
    """Exponential moving average of parameters, with the usual warmup of the decay.

    Not diffusers' EMAModel: its decay after update n is min(decay, n / (9 + n)) with 0 at the first update
    (get_decay counts from optimization_step - 1), ours min(decay, (1 + n) / (10 + n)), and it updates the
    average as s - (1 - d)(s - p), ours as d s + (1 - d) p, which rounds differently. Either would change
    every EMA weight of a rerun, and the card promises that `--unet-steps N` reproduces the committed model."""

    def __init__(self, params, decay: float = 0.999):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    def update(self):
        import torch
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        with torch.no_grad():   # one fused call per op, not one kernel per tensor
            torch._foreach_mul_(self.shadow, d)
            torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1 - d)


def pretrain(args, log=print) -> dict:
    import torch
    from embedtrain.demo.model import build_pipeline

    t0 = time.time()
    deadline = t0 + args.minutes * 60
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok_dir = Path(tempfile.mkdtemp(prefix="embedtrain-demo-tok-"))
    pipe = build_pipeline("demo", words=WORDS, seed=args.seed, folder=tok_dir)
    dev = torch.device(args.device)
    if dev.type == "cuda":   # same maths as on the CPU; TF32 off so the run does not depend on the GPU kind
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    pipe.to(dev)
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    count = lambda m: sum(p.numel() for p in m.parameters())
    stats = dict(command=args.command, seed=args.seed,
                 unet_params=count(unet), vae_params=count(vae), te_params=count(te),
                 vae_steps=args.vae_steps, vae_batch_size=args.vae_batch_size, images=args.images,
                 batch_size=args.batch_size, lr=args.lr, unet_steps=args.unet_steps, finished=False,
                 device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 threads=args.threads)
    log(f"parameters: unet {stats['unet_params']:,} vae {stats['vae_params']:,} text encoder {stats['te_params']:,}")

    # 1. VAE
    torch.manual_seed(args.seed + 10)
    vae_losses = train_vae(vae, args.vae_steps, args.vae_batch_size, args.seed + 10, args.vae_lr, log, dev)
    stats["vae_loss"] = sum(vae_losses[-50:]) / max(1, len(vae_losses[-50:]))
    stats["minutes_vae"] = (time.time() - t0) / 60
    stats["vae_recon_judge_accuracy"] = vae_recon_accuracy(vae, args.seed + 15, device=dev)
    log(f"VAE done in {stats['minutes_vae']:.1f} min; the judge reads {stats['vae_recon_judge_accuracy']:.1%} "
        "of 200 reconstructed renders right")

    samples, latents = encode_image_set(vae, args, stats, dev, log)
    unet_phase(pipe, samples, latents, args, stats, t0, deadline, log, dev)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return stats


def encode_image_set(vae, args, stats, dev, log):
    """2. The fixed image set (never the held-out purple star), encoded once with the VAE encoder.

    Posterior means (the KL weight is tiny, so the std is small). The first time, the latent scaling
    factor is set so latents have unit variance, as in SD; a continuation keeps the saved one."""
    import torch
    t_encode = time.time()
    rng = random.Random(args.seed + 20)
    samples = [pretraining_sample(rng)[0] for _ in range(args.images)]
    latents = []
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            batch = images_to_tensor([render(s) for s in samples[i:i + 64]], dev)
            latents.append(vae.encode(batch).latent_dist.mean)
    latents = torch.cat(latents)
    if "scaling_factor" not in stats:
        vae.register_to_config(scaling_factor=1.0 / latents.std().item())
        stats["scaling_factor"] = vae.config.scaling_factor
    latents = latents * vae.config.scaling_factor
    log(f"encoded {len(samples)} images in {(time.time() - t_encode) / 60:.1f} min; "
        f"scaling factor {vae.config.scaling_factor:.4f}")
    return samples, latents


def unet_phase(pipe, samples, latents, args, stats, t0, deadline, log, dev) -> None:
    """3. UNet + text encoder: DDPM noise prediction with min-SNR-5 weighting and offset noise.

    Offset noise (a per-image, per-channel constant added to the noise, scale --offset-noise): on
    16 x 16 latents the SD noise schedule leaves an image's mean colour readable even at the last
    timestep, so without it the model takes background and shape colours from the starting noise
    and ignores the colour words (measured: backgrounds right in 8% of samples, shapes in 71%)."""
    import torch
    from diffusers import DDPMScheduler
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_sched.alphas_cumprod.to(dev)
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    params = list(unet.parameters()) + list(te.parameters())
    for q in params:
        q.requires_grad_(True)
    unet.train(), te.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMA(params, 0.999)
    phase = stats.get("unet_phases", 0)
    gen = torch.Generator().manual_seed(args.seed + 30 + 1000 * phase)
    cap_rng = random.Random(args.seed + 40 + 1000 * phase)
    token_cache: dict[str, list[int]] = {}
    done_before = stats.get("unet_steps_done", 0) if phase else 0

    def encode_text(texts):
        missing = list(dict.fromkeys(t for t in texts if t not in token_cache))
        if missing:   # one batched tokenizer call for the captions not seen before
            ids = tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            token_cache.update(zip(missing, ids))
        return te(torch.tensor([token_cache[t] for t in texts], device=dev))[0]

    total = args.unet_steps or 10 ** 9
    warmup = 100 if not phase else 20
    losses, step, last_save = [], 0, time.time()
    t_unet = time.time()
    while step < total:
        if not args.unet_steps and step == 20:
            per_step = (time.time() - t_unet) / 20
            save_cost = 15.0 * (args.minutes / max(args.checkpoint_minutes, 1e-9))
            total = max(21, int((deadline - time.time() - save_cost - 30) / per_step * 0.9) + 20)
            log(f"{per_step:.2f} s per update -> {total} updates to fit {args.minutes} minutes")
        if time.time() > deadline + 60:
            log("past the time budget: stopping early")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total if args.unet_steps or step >= 20 else 10 ** 9, args.lr, warmup=warmup)
        idx = torch.randint(0, len(samples), (args.batch_size,), generator=gen)
        x0 = latents[idx.to(dev)]
        texts = [caption(samples[i], cap_rng) if cap_rng.random() >= 0.1 else "" for i in idx.tolist()]
        noise = torch.randn(x0.shape, generator=gen)     # drawn on the CPU: the same on any device
        if args.offset_noise:
            noise = noise + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        noise = noise.to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen).to(dev)
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=encode_text(texts)).sample
        snr = snr_all[t]
        weight = torch.clamp(snr, max=5.0) / snr     # min-SNR-5 for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            el = time.time() - t_unet
            log(f"step {step:5d}/{total if total < 10 ** 9 else '?'} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {el / step:.2f} s/update, {(time.time() - t0) / 60:.1f} min")
        if time.time() - last_save > args.checkpoint_minutes * 60 and step < total:
            _phase_stats(stats, phase, args, total, step, done_before, losses, t0)
            unet.eval(), te.eval()
            save_pipeline(pipe, ema, args.out, stats, log)
            unet.train(), te.train()
            last_save = time.time()
    unet.eval(), te.eval()
    _phase_stats(stats, phase, args, total, step, done_before, losses, t0, finished=True)
    save_pipeline(pipe, ema, args.out, stats, log)


def _phase_stats(stats, phase, args, total, step, done_before, losses, t0, finished=False):
    """Record a UNet phase in the stats (phase 0: the first run; 1, 2, ...: continuations)."""
    loss = _loss_stats(losses)
    entry = dict(planned=total if total < 10 ** 9 else None, done=step, batch_size=args.batch_size, lr=args.lr,
                 offset_noise=args.offset_noise, minutes=round((time.time() - t0) / 60, 2), finished=finished, **loss)
    if phase == 0:
        stats.update(unet_steps=entry["planned"], offset_noise=args.offset_noise, **loss)
    phases = stats.setdefault("unet_phase_log", [])
    phases[phase:] = [entry]
    stats.update(unet_steps_done=done_before + step, finished=finished, unet_phases=phase + (1 if finished else 0),
                 minutes_total=stats.get("minutes_before", 0) + (time.time() - t0) / 60)


def continue_unet(args, log=print) -> dict:
    """`--continue`: more UNet + text encoder training on the pipeline saved in --out (EMA weights)."""
    import torch
    from diffusers import StableDiffusionPipeline
    t0 = time.time()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    stats = json.loads((out / CARD_STATS).read_text(encoding="utf-8"))
    stats.setdefault("unet_phases", 1)
    if not stats.get("unet_phase_log"):   # saved before phases were recorded: the first run is phase 1
        stats["unet_phase_log"] = [dict(planned=stats.get("unet_steps"), done=stats.get("unet_steps_done"),
                                        batch_size=stats.get("batch_size"), lr=stats.get("lr"),
                                        offset_noise=stats.get("offset_noise", 0.0), finished=stats.get("finished"),
                                        loss_first=stats.get("loss_first"), loss_last=stats.get("loss_last"))]
    stats["minutes_before"] = stats.get("minutes_total", 0)
    stats.setdefault("continue_commands", []).append(args.command)
    dev = torch.device(args.device)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    pipe.to(dev)
    pipe.vae.requires_grad_(False)
    samples, latents = encode_image_set(pipe.vae, args, stats, dev, log)
    unet_phase(pipe, samples, latents, args, stats, t0, t0 + args.minutes * 60, log, dev)
    return stats


def _loss_stats(losses):
    first = losses[:100] or [float("nan")]
    last = losses[-100:] or [float("nan")]
    return dict(loss_first=sum(first) / len(first), loss_last=sum(last) / len(last))


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedtrain.demo.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline (replaced when saving)")
    p.add_argument("--minutes", type=float, default=70.0, help="wall-time budget of the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=800, help="VAE updates")
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--images", type=int, default=12000, help="fixed renders encoded for the UNet phase")
    p.add_argument("--batch-size", type=int, default=32, help="UNet batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="UNet + text encoder peak learning rate")
    p.add_argument("--unet-steps", type=int, default=0, help="UNet updates; 0 = fit to --minutes")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="save the pipeline this often")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the committed model was trained on a 2-core CPU: see its card)")
    p.add_argument("--offset-noise", type=float, default=0.2,
                   help="scale of the per-channel constant added to the UNet's training noise (0 = off)")
    p.add_argument("--continue", dest="cont", action="store_true",
                   help="continue UNet + text encoder training of the pipeline already in --out for --minutes")
    p.add_argument("--decoder-only", action="store_true",
                   help="fine-tune only the VAE decoder of the pipeline already in --out (encoder frozen, so its "
                        "UNet stays valid) for --decoder-steps updates of --vae-batch-size, within --minutes")
    p.add_argument("--decoder-steps", type=int, default=600)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    args = p.parse_args(argv)
    # the command as typed (argv when called from Python), recorded in the card
    args.command = f"{p.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    for name in ("minutes", "batch_size", "images", "vae_batch_size", "decoder_steps"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    log = lambda m: print(m, flush=True)   # noqa: E731
    if (args.cont or args.decoder_only) and not (Path(args.out) / CARD_STATS).is_file():
        flag = "--continue" if args.cont else "--decoder-only"
        raise SystemExit(f"{flag}: {args.out} holds no pipeline saved by this script")
    import torch
    threads = torch.get_num_threads()   # --threads is for this run: a caller's process gets its own back
    try:
        if args.cont:
            stats = continue_unet(args, log=log)
        elif args.decoder_only:
            stats = decoder_only(args, log=log)
        else:
            stats = pretrain(args, log=log)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
