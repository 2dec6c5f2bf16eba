"""The one training loop.

`Trainer(cfg)` loads the model and data once (so the LR sweep can reuse them); `Trainer.run(run_dir)`
is the loop: for each weight update, GA micro-batches of cached latents -> noise -> UNet -> MSE,
loss / GA, backward into the new vectors only, all-reduce across processes, clip, optimizer step.
Every random choice of batch b (timesteps, noise, templates, flips) comes from a generator seeded by
(seed, b, process), and the data order from the seeded stream, so a resumed run replays exactly.

Events go out through one callback; the run folder gets config.json, log.csv, events.jsonl,
snapshots, previews, the final embedding and, on stop, resume.pt.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtrain import EmbedtrainError, __version__, shown
from embedtrain.calculator import derive
from embedtrain.config import ConfigError, TrainConfig, add_arguments, config_from_args

LOG_COLUMNS = ["update", "batch", "epoch", "images_seen", "loss", "val_loss", "val_train_loss", "lr",
               "effective_lr", "time_s"]
# Recipe options recorded in an embedding's metadata when they are on.
RECIPE_FIELDS = ("shuffle_tags", "keep_tokens", "tag_dropout", "caption_dropout", "noise_offset", "min_snr_gamma")
MAX_FP16_OVERFLOWS = 30  # fp16 loss scaling: overflowing retries of one update before it counts as a failure
VAL_TIMESTEPS = 4  # fixed timesteps per validation image: a lower-variance estimate, still cheap


class TrainingStopped(EmbedtrainError):
    """The run ended early (non-finite loss, a failed save); its last good embedding was kept."""


@dataclass
class RunResult:
    run_dir: Path
    status: str                      # finished | stopped | failed
    updates: int
    final_loss: float | None
    val_loss: float | None
    files: list[Path] = field(default_factory=list)
    message: str = ""
    warnings: list[str] = field(default_factory=list)   # the sentences shown before the run started


@dataclass
class _RunState:
    """What one run changes, in one place: Trainer._prepare_run makes it, each step of the loop reads and
    updates it, Trainer._finish turns it into the RunResult."""
    run_dir: Path
    main: bool                       # rank 0: the process that writes files and logs
    schedule: Any                    # u -> LR of weight update u + 1
    optimizer: Any
    events: _EventSink
    log: _CsvLog
    stop: Any                        # () -> True asks for a graceful stop, or None
    update: int                      # weight updates made (and kept)
    batch: int                       # global batches consumed, fp16 retries included
    u_start: int                     # the update this run started (or resumed) from
    good: Any                        # the last vectors known to give a finite loss
    t_start: float
    scaler: Any = None               # fp16's loss scaler, else None
    bar: Any = None                  # the progress bar, else None
    loss: float | None = None        # the last update's loss (logged, and the NaN check)
    val_loss: float | None = None    # the last update's validation loss, None when not measured at it
    overflows: int = 0               # fp16 retries in this run
    overflows_at_update: int = 0     # ... before the current update
    status: str = "finished"         # finished | stopped | failed
    message: str = ""
    files: list[Path] = field(default_factory=list)


def _seed_for(*parts) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(62)


class Trainer:
    """Model, data, latent caches and the embedding, prepared once for one or more runs."""

    def __init__(self, cfg: TrainConfig, pipe=None, info=None, log=print):
        import torch

        from embedtrain import data, embedding, models

        self.cfg = cfg.validate()
        self.log = log
        # The last run's schedule in words and the sentences shown before it (Trainer._prepare_run sets them;
        # summary() prints them, the LR finder reads the warnings).
        self.schedule_description = ""
        self.warnings: list[str] = []
        self._ids: dict = {}   # token ids per prompt (token_ids)
        self.state = _dist_state(cfg.device)
        self.rank, self.world = self.state["rank"], self.state["world"]
        self.device = self.state["device"] or models.resolve_device(cfg.device)
        self.autocast_dtype = models.resolve_precision(cfg.mixed_precision, self.device)

        # Data first: a bad folder should fail before a slow model load. resolution 0 is the model's own,
        # read from its configs; a source whose configs cannot be read alone is loaded first.
        if not cfg.resolution:
            native = models.native_resolution(cfg.model) if pipe is None else pipe_resolution(pipe)
            if native is None:
                pipe, info = models.load_pipeline(cfg.model, cfg.model_config)
                native = info.resolution
            cfg = self.cfg = cfg.replace(resolution=native).validate()
        samples, self.skipped = data.scan_folder(cfg.data, cfg.resolution)
        if cfg.val_data:
            self.val_samples, val_skipped = data.scan_folder(cfg.val_data, cfg.resolution)
            self.skipped += val_skipped
            self.train_samples = samples
        else:
            self.train_samples, self.val_samples = data.split(samples, cfg.val_split, cfg.seed)
        self.images = len(self.train_samples) * cfg.repeats  # images after the split, with repeats
        from embedtrain.config import MAX_EPOCH_IMAGES
        if self.images > MAX_EPOCH_IMAGES:
            raise ConfigError(f"repeats: {len(self.train_samples)} images x {cfg.repeats} repeats = {self.images} "
                              f"images per epoch, over the {MAX_EPOCH_IMAGES} the data order can hold; lower "
                              "repeats")
        self.plan = self._plan()
        self.templates = data.load_templates(cfg.template)
        self.stream = data.Stream(self.images, cfg.seed)

        if pipe is None:
            pipe, info = models.load_pipeline(cfg.model, cfg.model_config)
        self.pipe, self.info = pipe, info
        from embedtrain.textside import text_side
        self.text = text_side(pipe)   # SD or SDXL: tokenizers, encoders, conditioning (textside.py)
        self.tokenizer = self.text.tokenizer
        self.unet, self.vae = pipe.unet, pipe.vae
        self._place_weights()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text.encoders:
                encoder.gradient_checkpointing_enable()
                encoder.train()  # transformers only checkpoints in train mode; CLIP has no dropout
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)

        from diffusers import DDPMScheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_timesteps = self.noise_scheduler.config.num_train_timesteps

        if self.text.family == "SDXL" and "a1111" in cfg.formats():
            raise ConfigError("save_formats: a1111 (.pt) holds one text encoder's vectors; for SDXL use safetensors "
                              "(clip_l + clip_g, what AUTOMATIC1111, ComfyUI and kohya read) and/or diffusers")
        if cfg.init_embedding:   # start from a file's vectors (their count is the file's)
            start = embedding.load_embedding(cfg.init_embedding)
            self.token = self.text.add_loaded(start, cfg.name, f"init_embedding {cfg.init_embedding}", self.info.name,
                                              trainable=True, check_vocab=True, train=cfg.train_encoders)
        else:
            self.token = self.text.add(cfg.name, init_text=cfg.init_text, num_vectors=cfg.vectors, trainable=True,
                                       train=cfg.train_encoders)
        self.init_vectors = self.token.vectors.detach().clone()
        from embedtrain.preflight import unreached_name
        reason = unreached_name(cfg, self.templates, (s.caption for s in self.train_samples))
        if reason:
            raise ConfigError(reason)

        t0 = time.perf_counter()
        self.cache = self._latent_cache(self.train_samples, cfg.latent_sampling, cfg.flip, cfg.seed)
        self.val_cache = self._latent_cache(self.val_samples) if self.val_samples else None
        self.cache_seconds = time.perf_counter() - t0
        self._val_fixed = {}

    # ------------------------------------------------------------------ helpers
    def _place_weights(self) -> None:
        """Every module onto the device. With mixed precision on a GPU the frozen UNet and text encoders are
        stored in the autocast dtype (half the memory: SDXL's UNet is 10 GB in fp32, 5 GB in bf16); the
        trained vectors stay fp32 (ExtraTokenEmbedding keeps them so) and the VAE stays fp32 (SDXL's VAE
        overflows in fp16; it only encodes the latent cache and decodes previews)."""
        from diffusers.utils import logging as diffusers_logging
        weights = self.autocast_dtype if self.device.type == "cuda" else None
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()   # its "modules to keep in float32: []" note on every cast
        try:
            for m in (self.unet, *self.text.encoders):
                m.to(self.device, dtype=weights) if weights is not None else m.to(self.device)
        finally:
            diffusers_logging.set_verbosity(level)
        self.vae.to(self.device)

    def _memory_warnings(self) -> list[str]:
        """SDXL at 1024 px without gradient checkpointing peaked at 13.1 GB of GPU memory (bf16, BS 1; with
        it 9.8 GB, the latent caching's peak: bench/README.md): on a smaller card, say so before it fails."""
        import torch
        cfg = self.cfg
        if self.text.family != "SDXL" or self.device.type != "cuda" or cfg.gradient_checkpointing:
            return []
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        if total >= 16 or cfg.resolution < 1024:
            return []
        return [f"SDXL at {cfg.resolution} px without gradient checkpointing needs about 13 GB of GPU memory at "
                f"BS 1; this GPU has {total:.0f} GB: turn on gradient_checkpointing (about 10 GB, 2.3x slower "
                "per update)"]

    # What a loaded Trainer was built from: the model, the data, its split and order, the token.
    _LOADED = ("model", "model_config", "data", "val_data", "name", "init_text", "vectors", "template", "repeats",
               "resolution", "flip", "latent_sampling", "batch_size", "seed", "val_split", "device",
               "mixed_precision", "gradient_checkpointing")

    def set_run(self, **changes) -> None:
        """Point this loaded Trainer at another run (LR, schedule, length, intervals) on the same data.

        Used by the LR finder and the sweep, which load the model and data once and train several
        short runs. The plan is re-derived as __init__ derives it; a change to anything the Trainer
        was built from (model, data, batch size, seed, ...) is refused, as it needs a new Trainer."""
        loaded = sorted(set(changes) & set(self._LOADED))
        if loaded:
            raise ValueError(f"set_run cannot change {', '.join(loaded)}: build a new Trainer for that")
        self.cfg = self.cfg.replace(**changes).validate()
        self.plan = self._plan()

    def _plan(self):
        """The run's counts (calculator.derive's formulas) for the loaded data and the current config."""
        cfg = self.cfg
        return derive(len(self.train_samples), cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.step_unit,
                      repeats=cfg.repeats, processes=self.world)

    def reset_embedding(self) -> None:
        """Back to the init-text vectors (a fresh embedding for the next sweep candidate)."""
        import torch
        with torch.no_grad():
            self.token.vectors.copy_(self.init_vectors)

    def token_ids(self, prompts: list[str]) -> list:
        """Token ids of the prompts in each tokenizer (padded to the model's length), cached per prompt:
        one [B, 77] tensor per text encoder.

        A run's prompts come from a few templates x the captions, so after the first epoch the
        tokenizer (pure Python, ~0.1-1 ms per prompt) is not called again."""
        import torch
        cache = self._ids
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        if missing:
            if len(cache) + len(missing) > 20000:   # unbounded captions (e.g. random ones): keep memory flat
                cache.clear()
                missing = list(dict.fromkeys(prompts))
            cache.update(zip(missing, self.text.token_ids([self.token.expand(p) for p in missing])))
        rows = [cache[p] for p in prompts]
        return [torch.tensor([r[k] for r in rows], dtype=torch.long) for k in range(len(rows[0]))]

    def encode_prompts(self, prompts: list[str], time_ids=None):
        """(encoder_hidden_states, added_cond_kwargs) of the prompts: the UNet's text conditioning."""
        return self.text.encode([ids.to(self.device) for ids in self.token_ids(prompts)], time_ids)

    def grad_scaler(self):
        """A loss scaler for fp16 autocast (its narrow range underflows small gradients), else None:
        fp32 and bf16 (fp32's range) need none."""
        import torch
        if self.autocast_dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

    def _autocast(self):
        import contextlib

        import torch
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, latents, noise, timesteps, prompts, reduce=True, time_ids=None, weighted=False):
        """The denoising MSE per image (or its mean); `weighted`: the training loss, with min-SNR weights
        when min_snr_gamma is set (validation stays plain MSE, comparable across settings)."""
        import torch.nn.functional as F
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        v_pred = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
        with self._autocast():
            hidden, added = self.encode_prompts(prompts, time_ids)
            pred = self.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if weighted and self.cfg.min_snr_gamma:
            loss = loss * min_snr_weights(self.noise_scheduler, timesteps, self.cfg.min_snr_gamma, v_pred)
        return loss.mean() if reduce else loss

    def batch_inputs(self, batch_index: int):
        """The inputs of global batch `batch_index` on this process.

        Every random choice belongs to a stream position (an image slot), not to a batch: position p
        gets its template, flip, timestep and noise from its own seed. So BS 4 x GA 1 and BS 2 x GA 2
        (or 2 processes x BS 2) see the same images with the same noise and make the same update, and a
        resumed run replays exactly.
        """
        import torch

        from embedtrain.data import make_prompt, vary_caption
        cfg, bs = self.cfg, self.cfg.batch_size
        start = (batch_index * self.world + self.rank) * bs
        n_train = len(self.train_samples)
        picks, prompts, flips, noise, timesteps = [], [], [], [], []
        for pos in range(start, start + bs):
            i = self.stream[pos] % n_train  # repeats: a stream slot -> its image
            rng = random.Random(_seed_for("slot", cfg.seed, pos))
            g = torch.Generator().manual_seed(_seed_for("noise", cfg.seed, pos))
            picks.append(i)
            # the caption options draw from their own stream: turning them on changes nothing else
            caption = vary_caption(self.train_samples[i].caption, random.Random(_seed_for("caption", cfg.seed, pos)),
                                   cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_dropout, cfg.caption_dropout)
            prompts.append(make_prompt(rng.choice(self.templates), cfg.name, caption))
            flips.append(cfg.flip and rng.random() < 0.5)
            timesteps.append(int(torch.randint(0, self.num_timesteps, (1,), generator=g)))
            noise.append(self._slot_noise(g, pos))
            if self.cache.std is not None:  # latent_sampling=random: a fresh posterior sample per slot
                noise.append(torch.randn(self.cache.mean.shape[2:], generator=g))
        if self.cache.std is not None:
            noise, post = noise[0::2], noise[1::2]
            latents = self.cache.get(picks, flips, noise=self._to_device(torch.stack(post)))
        else:
            latents = self.cache.get(picks, flips)
        time_ids = self._time_ids([self.train_samples[i] for i in picks], flips)
        return (latents, self._to_device(torch.stack(noise)),
                torch.tensor(timesteps, device=self.device), prompts, time_ids)

    def _slot_noise(self, g, pos: int):
        """The diffusion noise of stream slot `pos`; with noise_offset, plus a per-channel constant of that
        scale (drawn from the slot's own offset stream, so the rest of the noise is unchanged)."""
        import torch
        shape = self.cache.mean.shape[2:]
        noise = torch.randn(shape, generator=g)
        if self.cfg.noise_offset:
            offset = torch.Generator().manual_seed(_seed_for("offset", self.cfg.seed, pos))
            noise = noise + self.cfg.noise_offset * torch.randn(shape[0], 1, 1, generator=offset)
        return noise

    def _time_ids(self, samples, flips=None):
        """SDXL's micro-conditioning of these images ([B, 6] on the device), None for SD."""
        import torch

        from embedtrain.textside import micro_conditioning
        if self.text.family != "SDXL":
            return None
        flips = flips or [False] * len(samples)
        rows = [micro_conditioning(s, self.cfg.resolution, f) for s, f in zip(samples, flips)]
        return torch.tensor(rows, device=self.device)

    def _latent_cache(self, samples, *args):
        """The samples' VAE latents, encoded cfg.batch_size images at a time: caching is then never the run's
        memory peak (a batch of 8 was, on small UNets: bench_vs_diffusers' peak RSS)."""
        from embedtrain.data import LatentCache
        return LatentCache(self.vae, [s.image for s in samples], self.device, *args, batch=self.cfg.batch_size)

    def _to_device(self, t):
        """A host tensor (noise drawn on the CPU, for the same numbers on any device) onto the device:
        on CUDA through pinned memory, so the copy does not wait for the GPU's queue."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def fixed_loss(self, which: str = "val"):
        """Validation loss with fixed timesteps and fixed noise per image: two evaluations
        differ only because the embedding changed. `which="train"` is the stabilized training loss."""
        import torch
        from embedtrain.data import make_prompt
        if which == "val":
            samples, cache = self.val_samples, self.val_cache
        else:
            k = min(self.cfg.val_train_subset, len(self.train_samples))
            samples = self.train_samples[:k]
            if "train_cache" not in self._val_fixed:
                self._val_fixed["train_cache"] = self._latent_cache(samples)
            cache = self._val_fixed["train_cache"]
        if not samples:
            return None
        if which not in self._val_fixed:
            n = len(samples)
            g = torch.Generator().manual_seed(_seed_for("val", self.cfg.seed, which))
            lat = cache.mean[0].repeat_interleave(VAL_TIMESTEPS, 0)
            # stratified timesteps: one in each quarter of the schedule, offset per image
            u = (torch.arange(VAL_TIMESTEPS).repeat(n) + torch.rand(n * VAL_TIMESTEPS, generator=g)) / VAL_TIMESTEPS
            t = (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
            noise = torch.randn(lat.shape, generator=g)
            prompts = [make_prompt(self.templates[0], self.cfg.name, s.caption) for s in samples]
            prompts = [p for p in prompts for _ in range(VAL_TIMESTEPS)]
            time_ids = self._time_ids([s for s in samples for _ in range(VAL_TIMESTEPS)])
            self._val_fixed[which] = (lat, noise.to(self.device), t.to(self.device), prompts, time_ids)
        lat, noise, t, prompts, time_ids = self._val_fixed[which]
        total, chunk = 0.0, 16
        with torch.no_grad():
            for k in range(0, len(prompts), chunk):
                losses = self._loss(lat[k:k + chunk], noise[k:k + chunk], t[k:k + chunk], prompts[k:k + chunk],
                                    reduce=False, time_ids=None if time_ids is None else time_ids[k:k + chunk])
                total += float(losses.sum())
        return total / len(prompts)

    def preview(self, path: Path, update: int):
        import torch
        cfg = self.cfg
        seed = cfg.seed if cfg.preview_seed < 0 else cfg.preview_seed
        prompt = self.token.expand(cfg.preview_prompt.replace("[name]", cfg.name))
        with torch.no_grad(), self._autocast():
            image = self.pipe(prompt, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_cfg,
                              height=cfg.resolution, width=cfg.resolution,
                              generator=torch.Generator().manual_seed(seed)).images[0]
        from PIL.PngImagePlugin import PngInfo

        from embedtrain.fileio import atomic_path
        info = PngInfo()
        info.add_text("parameters", f"{cfg.preview_prompt}\nSteps: {cfg.preview_steps}, CFG scale: "
                                    f"{cfg.preview_cfg}, Seed: {seed}, Size: {cfg.resolution}x{cfg.resolution}, "
                                    f"Model: {self.info.name}, Embedding: {cfg.name}, Update: {update}")
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        return path

    def metadata(self, update: int, batches: int, loss, val_loss) -> dict:
        cfg = self.cfg
        images_seen = batches * cfg.batch_size * self.world
        return {
            "name": cfg.name, "trainer": f"embedtrain {__version__}", "step": update if cfg.step_unit == "update"
            else batches, "step_unit": cfg.step_unit, "updates": update, "batches": batches,
            "epochs": f"{images_seen / self.images:.4f}", "images": self.images, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "processes": self.world, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule
            if cfg.lr_schedule != "piecewise" else cfg.lr_piecewise, "optimizer": cfg.optimizer,
            "init_text": cfg.init_text, "vectors": self.token.vectors.shape[0], "seed": cfg.seed,
            "resolution": cfg.resolution, "model_family": self.text.family,
            "base_model": self.info.name, "base_model_hash": self.info.hash, "loss": "" if loss is None else
            f"{loss:.6f}", "val_loss": "" if val_loss is None else f"{val_loss:.6f}",
            **({"init_embedding": Path(cfg.init_embedding).name} if cfg.init_embedding else {}),
            **{k: getattr(cfg, k) for k in RECIPE_FIELDS if getattr(cfg, k)},
            **({"train_encoders": cfg.train_encoders} if self.text.family == "SDXL" else {}),
        }

    def summary(self) -> str:
        p, cfg = self.plan, self.cfg
        lines = [
            "***** Running training *****",
            f"  Model = {self.info.describe()}",
            f"  Device = {self.device} ({'fp32' if self.autocast_dtype is None else self.autocast_dtype}), "
            f"processes = {self.world}",
            f"  Images = {len(self.train_samples)} x {cfg.repeats} repeats = {self.images} "
            f"(validation: {len(self.val_samples)}; skipped: {len(self.skipped)})",
            f"  Batch size = {cfg.batch_size}, gradient accumulation = {cfg.grad_accum}"
            f" -> {cfg.batch_size * cfg.grad_accum * self.world} images per weight update",
            f"  Steps = {cfg.steps} {'batches' if cfg.step_unit == 'batch' else 'updates'} -> weight updates = "
            f"{p.weight_updates}, batches = {p.batches}",
            f"  Epochs = {p.epochs:.2f} (full-cycle: {'yes' if p.full_cycle else 'no'})",
            f"  LR = {self.schedule_description}, optimizer = {cfg.optimizer}",
        ]
        if p.incomplete_batches:
            lines.append(f"  Note: the last {p.incomplete_batches} batches end without a weight update "
                         f"({p.batches} is not a multiple of GA {cfg.grad_accum}); they are not run")
        lines += [f"  Warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    # ------------------------------------------------------------------ the loop
    def run(self, run_dir, on_event=None, schedule=None, resume: bool = False, stop=None) -> RunResult:
        """Train into `run_dir`. `schedule(u) -> lr` overrides the config's (used by the LR finder).
        `stop()` -> True asks for a graceful stop (the CLI sets it on SIGINT; the UI via a STOP file).

        One weight update after another: the update itself (its GA micro-batches, the fp16 retry, the
        rollback on a non-finite value, the optimizer step), then what follows it (validation, the log row,
        snapshots, previews, the stop check); at the end the final files. What a run changes lives in one
        _RunState."""
        st = self._prepare_run(Path(run_dir), on_event, schedule, resume, stop)
        while st.update < self.plan.weight_updates:
            done = self._weight_update(st)
            if done == "retry":      # fp16: the scaled gradient overflowed; the same update again
                continue
            if done == "failed":     # st.status and st.message say why; the last good vectors are back
                break
            if self._after_update(st):
                break                # stopped on request
        return self._finish(st)

    def _prepare_run(self, run_dir: Path, on_event, schedule, resume: bool, stop) -> _RunState:
        """The schedule and its warnings, the optimizer (and on resume its state), the run folder's first
        files, the start event and the log: the state of a run about to make its first update."""
        from embedtrain import data, optimizers
        from embedtrain.schedules import describe_schedule, from_config

        cfg, plan, main = self.cfg, self.plan, self.rank == 0
        if schedule is None:
            schedule = from_config(cfg, plan)
            self.schedule_description = describe_schedule(schedule)
        else:
            self.schedule_description = getattr(schedule, "description", "custom")
        self.warnings = list(getattr(schedule, "warnings", [])) + self._memory_warnings()
        if self.val_samples and (len(self.val_samples) < 4 or len(self.val_samples) <= cfg.batch_size):
            self.warnings.append(f"only {len(self.val_samples)} validation images: validation loss can mislead "
                                 "on a set this small (docs/guide.md#validation-loss)")

        if main and cfg.report_to == "tensorboard":
            on_event = _tensorboard(run_dir, on_event)
        events = _EventSink(run_dir, on_event, enabled=main, resume=resume)
        vectors = self.token.vectors
        vectors.grad = None  # an earlier run on this Trainer (a sweep candidate) may have ended mid-update
        optimizer = optimizers.make_optimizer(cfg.optimizer, [vectors], cfg)
        update, batch = self._load_resume(run_dir, optimizer) if resume else (0, 0)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume:   # a killed save leaves its temp file behind; the good files beside it are intact
                from embedtrain.fileio import remove_stale_temps
                for tmp in remove_stale_temps(run_dir):
                    self.log(f"  removed {tmp.name}, left by an interrupted save")
            cfg.save(run_dir / "config.json")
            self.log(self.summary())
            for s in self.skipped:
                self.log(f"  skipped {data.display_name(s.path)}: {s.reason}")   # non-UTF-8 names print
                events.emit("skipped", file=data.display_name(s.path), reason=s.reason)
        events.emit("start", summary=self.summary(), weight_updates=plan.weight_updates, batches=plan.batches,
                    resume_from=update, images=self.images, warnings=self.warnings)
        log = _CsvLog(run_dir / "log.csv", enabled=main, keep_until=update if resume else None)
        st = _RunState(run_dir=run_dir, main=main, schedule=schedule, optimizer=optimizer, events=events, log=log,
                       stop=stop, update=update, batch=batch, u_start=update, good=vectors.detach().clone(),
                       t_start=time.perf_counter())
        optimizers.set_mode(optimizer, True)
        st.scaler = self.grad_scaler()
        st.bar = _progress_bar(plan.weight_updates, update, main)
        return st

    def _weight_update(self, st: _RunState) -> str:
        """Weight update st.update + 1: "done" (st.update counts it), "retry" (fp16 overflow: the scale
        was lowered and the update is made again on the next batches) or "failed" (st.status says why)."""
        for group in st.optimizer.param_groups:   # the learning rate is a pure function of the update index
            group["lr"] = st.schedule(st.update)
        self._accumulate(st)
        if self._fp16_overflowed(st):
            return "retry"
        if self._reject_non_finite(st):
            return "failed"
        st.good.copy_(self.token.vectors.detach())
        if not self._step(st):
            return "failed"
        st.update += 1
        return "done"

    def _accumulate(self, st: _RunState) -> None:
        """GA micro-batches, each loss / GA, gradients summed into the new vectors only, then averaged
        across processes; sets st.loss (the one host sync per update: logging and the NaN check need it)."""
        import torch
        cfg, vectors, scaler = self.cfg, self.token.vectors, st.scaler
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(cfg.grad_accum):
            latents, noise, timesteps, prompts, time_ids = self.batch_inputs(st.batch)
            loss = self._loss(latents, noise, timesteps, prompts, time_ids=time_ids, weighted=True) / cfg.grad_accum
            (loss if scaler is None else scaler.scale(loss)).backward()
            loss_sum += loss.detach()
            st.batch += 1
        if self.world > 1:  # no DDP wrapper: the only parameter is this tiny tensor
            torch.distributed.all_reduce(vectors.grad)
            vectors.grad /= self.world
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.world
        if scaler is not None:
            scaler.unscale_(st.optimizer)
        st.loss = float(loss_sum)

    def _fp16_overflowed(self, st: _RunState) -> bool:
        """fp16: the scaled gradient overflowed. Not a failure: the scaler halves its scale and the update is
        made again on the next batch (the LR stays that of this update index). Past MAX_FP16_OVERFLOWS
        retries of one update the scale has collapsed: False, and the gradient counts as not finite."""
        import torch
        if st.scaler is None or not math.isfinite(st.loss) or torch.isfinite(self.token.vectors.grad).all():
            return False
        st.overflows += 1
        if st.overflows - st.overflows_at_update > MAX_FP16_OVERFLOWS:
            return False
        st.scaler.update()
        st.optimizer.zero_grad(set_to_none=True)
        return True

    def _reject_non_finite(self, st: _RunState) -> bool:
        """A non-finite loss or gradient ends the run: True, with the vectors, update and batch counts back
        at the last good ones (so the saved metadata matches the kept vectors)."""
        import torch
        vectors, update = self.token.vectors, st.update
        if math.isfinite(st.loss) and torch.isfinite(vectors.grad).all():
            return False
        if math.isfinite(st.loss):  # these vectors gave a finite loss; only their gradient is bad
            kept, what = update, "the gradient became NaN or infinite"
        else:  # these vectors gave a non-finite loss: back to the last ones that did not
            with torch.no_grad():
                vectors.copy_(st.good)
            kept, what = (update if update == st.u_start else update - 1), f"loss became {st.loss}"
        st.status, st.message = "failed", (f"{what} at update {update + 1}; stopped and kept the last good "
                                           f"embedding (from update {kept}). Lower the LR or enable gradient "
                                           "clipping.")
        st.batch -= (update + 1 - kept) * self.cfg.grad_accum
        st.update = kept
        return True

    def _step(self, st: _RunState) -> bool:
        """Clip, step, clear. False when the step failed or made the vectors non-finite: the vectors are
        then back at the last good ones, and st.status and st.message say why."""
        import torch
        cfg, vectors, optimizer, scaler, update = self.cfg, self.token.vectors, st.optimizer, st.scaler, st.update
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([vectors], cfg.max_grad_norm)
        if cfg.clip_grad_value > 0:
            torch.nn.utils.clip_grad_value_([vectors], cfg.clip_grad_value)
        try:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
        except (RuntimeError, OverflowError, ValueError) as e:
            # e.g. AdamW at LR >= ~3.4e38: "value cannot be converted to type float without overflow".
            # The step may have half-run: the vectors go back to the last good ones, as for a NaN.
            why = (f"weight update {update + 1} failed in the optimizer step at LR {st.schedule(update):.3g} "
                   f"({_step_error(e)}); stopped and kept the last good embedding (from update {update}). "
                   "Lower the LR.")
            optimizer.zero_grad(set_to_none=True)
            return self._roll_back(st, why)
        optimizer.zero_grad(set_to_none=True)
        st.overflows_at_update = st.overflows
        if not torch.isfinite(vectors).all():  # a step can overflow even from a finite gradient
            return self._roll_back(st, f"weight update {update + 1} made the vectors NaN or infinite; stopped and "
                                       f"kept the last good embedding (from update {update}). Lower the LR or "
                                       "enable gradient clipping.")
        return True

    def _roll_back(self, st: _RunState, message: str) -> bool:
        """The update st.update + 1 failed in or after its step: its vectors and batches are undone."""
        import torch
        with torch.no_grad():
            self.token.vectors.copy_(st.good)
        st.status, st.message = "failed", message
        st.batch -= self.cfg.grad_accum  # so the saved metadata matches the kept vectors
        return False

    def _after_update(self, st: _RunState) -> bool:
        """Bookkeeping after update st.update: validation, the log row, the event, snapshots, previews.
        True when a stop was asked (and this was not the last update)."""
        from embedtrain import optimizers
        cfg, plan, update = self.cfg, self.plan, st.update
        is_last = update == plan.weight_updates
        st.val_loss = val_train = None
        if st.main and (self.val_samples or cfg.val_train_subset) and (
                (cfg.val_every and update % cfg.val_every == 0) or is_last):
            optimizers.set_mode(st.optimizer, False)   # schedule-free: evaluate at the averaged point
            st.val_loss = self.fixed_loss("val")
            val_train = self.fixed_loss("train") if cfg.val_train_subset else None
            optimizers.set_mode(st.optimizer, True)
        elapsed = time.perf_counter() - st.t_start
        row = self._log_row(st, val_train, elapsed)
        if update % cfg.log_every == 0 or is_last or st.val_loss is not None:
            st.log.write(row)
        rate = (update - st.u_start) / elapsed if elapsed > 0 else 0.0
        st.events.emit("update", **row, weight_updates=plan.weight_updates,
                       eta_s=round((plan.weight_updates - update) / rate, 1) if rate else None)
        if st.bar is not None:
            st.bar.update(1)
            st.bar.set_postfix(loss=f"{st.loss:.4f}", lr=f"{row['lr']:.2e}")
        if st.main and not is_last and cfg.save_every and update % cfg.save_every == 0:
            self._snapshot(st)
        if st.main and cfg.preview_every and (update % cfg.preview_every == 0 or is_last):
            path = self.preview(st.run_dir / "previews" / f"{cfg.name}-{update}.png", update)
            st.events.emit("preview", update=update, path=str(path))
        if st.stop is not None and _agree(st.stop(), self.world) and not is_last:
            st.status, st.message = "stopped", (f"stopped at update {update} of {plan.weight_updates}; resume "
                                                f"with --resume {st.run_dir}")
            return True
        return False

    def _log_row(self, st: _RunState, val_train, elapsed: float) -> dict:
        """The log.csv row (LOG_COLUMNS) of update st.update; also the fields of its "update" event."""
        from embedtrain import optimizers
        images_seen = st.batch * self.cfg.batch_size * self.world
        return dict(update=st.update, batch=st.batch, epoch=round(images_seen / self.images, 4),
                    images_seen=images_seen, loss=round(st.loss, 6), val_loss=_r(st.val_loss),
                    val_train_loss=_r(val_train), lr=st.schedule(st.update - 1),
                    effective_lr=optimizers.effective_lr(st.optimizer), time_s=round(elapsed, 3))

    def _snapshot(self, st: _RunState) -> None:
        """NAME-<update>.safetensors and resume.pt, written at the schedule-free evaluation point."""
        from embedtrain import embedding, optimizers
        optimizers.set_mode(st.optimizer, False)
        snap = st.run_dir / f"{self.cfg.name}-{st.update}.safetensors"
        embedding.save_embedding(snap, self.token.saved(), self.cfg.name,
                                 self.metadata(st.update, st.batch, st.loss, st.val_loss))
        self._save_resume(st.run_dir, st.optimizer, st.update, st.batch)
        optimizers.set_mode(st.optimizer, True)
        st.events.emit("save", update=st.update, path=str(snap))

    def _finish(self, st: _RunState) -> RunResult:
        """The end of a run, whatever ended it: the processes' agreement check, the final files from the
        last good vectors (atomically), resume.pt kept on a stop and removed when finished, the last event."""
        from embedtrain import embedding, optimizers
        cfg, run_dir = self.cfg, st.run_dir
        if st.bar is not None:
            st.bar.close()
        if st.overflows and st.main:
            self.log(f"  fp16 loss scaling: {st.overflows} update(s) redone after the scaled gradient overflowed "
                     f"(final scale {st.scaler.get_scale():g})")
        if self.world > 1:
            self._check_processes_agree(st)
        if st.main:
            optimizers.set_mode(st.optimizer, False)
            meta = self.metadata(st.update, st.batch, st.loss, st.val_loss)
            meta["status"] = st.status
            previews = sorted((run_dir / "previews").glob(f"{cfg.name}-*.png"), key=lambda p: p.stat().st_mtime)
            for fmt in cfg.formats():   # png: the card shows the last preview
                st.files += embedding.save_files(run_dir, cfg.name, self.token.saved(), meta, fmt,
                                                 card=previews[-1] if previews else None)
            if st.status == "stopped":
                self._save_resume(run_dir, st.optimizer, st.update, st.batch)
            elif (run_dir / "resume.pt").exists() and st.status == "finished":
                (run_dir / "resume.pt").unlink()
        st.log.close()
        result = RunResult(run_dir, st.status, st.update, st.loss, st.val_loss, st.files, st.message,
                           list(self.warnings))
        st.events.emit("done" if st.status == "finished" else st.status, status=st.status, updates=st.update,
                       message=st.message, files=[str(f) for f in st.files], final_loss=st.loss,
                       val_loss=st.val_loss)
        st.events.close()
        return result

    def _check_processes_agree(self, st: _RunState) -> None:
        """Prove the processes agree: every one must hold the same vectors, else the run failed."""
        import torch
        vectors = self.token.vectors
        gathered = [torch.zeros_like(vectors) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, vectors.detach().contiguous())
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        st.events.emit("processes", world=self.world, identical=diff == 0.0, max_diff=diff)
        if diff != 0.0:
            st.status, st.message = "failed", f"the {self.world} processes hold different vectors (max diff {diff})"

    # ------------------------------------------------------------------ resume state
    def _save_resume(self, run_dir: Path, optimizer, update: int, batch: int) -> None:
        import torch

        from embedtrain.fileio import atomic_path
        state = {"version": 1, "update": update, "batch": batch, "vectors": self.token.vectors.detach().cpu(),
                 "optimizer": optimizer.state_dict()}
        with atomic_path(run_dir / "resume.pt") as tmp:
            torch.save(state, tmp)

    def _load_resume(self, run_dir: Path, optimizer) -> tuple[int, int]:
        """Vectors and optimizer state from resume.pt. The file is checked before it is read (size, zip
        directory: no deflate bombs) and its contents before they are used (types, shapes, finite values,
        counts), so a damaged or crafted state is one ConfigError naming it, never a traceback."""
        import torch

        from embedtrain.embedding import MAX_FILE, EmbeddingError, check_torch_zip
        path = run_dir / "resume.pt"
        if not path.is_file():
            raise ConfigError(f"resume: {run_dir} has no resume.pt (the run finished, or never saved a state)")
        bad = f"resume: {path} is damaged or not an embedtrain resume state"
        again = "resume from an earlier copy or start a new run"
        try:
            size = path.stat().st_size
            if size > MAX_FILE:
                raise ConfigError(f"{bad} ({size / 2**20:.0f} MB; a resume state is at most a few MB); {again}")
            check_torch_zip(path, size)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except ConfigError:
            raise
        except EmbeddingError as e:
            raise ConfigError(f"{bad} ({str(e).removeprefix(f'{path}: ')}); {again}") from None
        except Exception as e:  # noqa: BLE001  (weights_only: nothing but tensors was unpickled)
            raise ConfigError(f"{bad} ({type(e).__name__}); {again}") from None
        update, batch, vectors, opt_state = self._check_resume_state(state, bad, again)
        with torch.no_grad():
            self.token.vectors.copy_(vectors.to(self.device))
        try:
            optimizer.load_state_dict(opt_state)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise ConfigError(f"{bad} (its optimizer state does not fit the {self.cfg.optimizer} optimizer: "
                              f"{_step_error(e)[:100]}); {again}") from None
        if update > self.plan.weight_updates:
            raise ConfigError(f"resume: the run already made {update} updates, more than steps allows "
                              f"({self.plan.weight_updates}); raise --steps")
        return update, batch

    def _check_resume_state(self, state, bad: str, again: str):
        """(update, batch, vectors, optimizer state) of a loaded resume.pt, each checked."""
        import torch

        def need(ok, what):
            if not ok:
                raise ConfigError(f"{bad} ({what}); {again}")

        need(isinstance(state, dict), f"it holds a {type(state).__name__}, not a dict")
        missing = [k for k in ("update", "batch", "vectors", "optimizer") if k not in state]
        need(not missing, f"missing {', '.join(missing)}")
        update, batch, vectors, opt = state["update"], state["batch"], state["vectors"], state["optimizer"]
        whole = all(isinstance(x, int) and not isinstance(x, bool) for x in (update, batch))
        # every update took GA batches (fp16 overflow retries take more)
        need(whole and 0 <= update and update * self.cfg.grad_accum <= batch < 2 ** 62,
             f"update {str(update)[:20]} and batch {str(batch)[:20]} are not the counts of a run with GA "
             f"{self.cfg.grad_accum}")
        want = tuple(self.token.vectors.shape)
        need(isinstance(vectors, torch.Tensor) and vectors.is_floating_point(),
             f"vectors is a {type(vectors).__name__}, not a floating-point tensor")
        need(tuple(vectors.shape) == want, f"vectors have shape {tuple(vectors.shape)}, this run's have {want}")
        need(bool(torch.isfinite(vectors).all()), "vectors hold NaN or infinite values")
        need(isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
             and len(opt["param_groups"]) == 1 and isinstance(opt["param_groups"][0], dict),
             "its optimizer state lacks 'state' and one entry of 'param_groups'")
        for key, entry in opt["state"].items():
            need(isinstance(entry, dict), f"optimizer state {str(key)[:20]!r} is not a dict")
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    need(tuple(value.shape) == want, f"optimizer state {str(name)[:20]!r} has shape "
                                                     f"{tuple(value.shape)}, the vectors' is {want}")
                    need(not value.is_floating_point() or bool(torch.isfinite(value).all()),
                         f"optimizer state {str(name)[:20]!r} holds NaN or infinite values")
        return update, batch, vectors, opt


def min_snr_weights(noise_scheduler, timesteps, gamma: float, v_prediction: bool):
    """Min-SNR loss weights (Hang et al. 2023) of these timesteps: min(SNR, gamma) / SNR for an epsilon
    target, min(SNR, gamma) / (SNR + 1) for v-prediction, SNR = alpha_bar / (1 - alpha_bar)."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)


def pipe_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _r(x):
    return "" if x is None else round(x, 6)


def _step_error(e: BaseException) -> str:
    """The first line of an optimizer's error, in words a user can act on."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "overflow" in text:
        return "the step overflowed float32: " + text[:120]
    return text[:160]


def _agree(flag: bool, world: int) -> bool:
    """All processes stop at the same update: any one asking is enough."""
    if world == 1:
        return bool(flag)
    import torch
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def _dist_state(device: str = "auto") -> dict:
    """Rank, world size and device under torchrun / accelerate launch; single process otherwise.

    accelerate only sets up a multi-process CPU (gloo) run when told `cpu=True`; without it, on a machine
    with no GPU, every process silently trains alone (seen with accelerate 1.15)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        if state.num_processes != int(os.environ["WORLD_SIZE"]):
            raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up "
                               f"{state.num_processes} ({state.distributed_type}); refusing to train them apart")
        return {"rank": state.process_index, "world": state.num_processes, "device": state.device}
    return {"rank": 0, "world": 1, "device": None}


def _progress_bar(total: int, start: int, enabled: bool):
    if not enabled or not sys.stderr.isatty() and os.environ.get("EMBEDTRAIN_PROGRESS") != "1":
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, unit="update", dynamic_ncols=True)


class _CsvLog:
    """log.csv, one row per logged update. On resume, rows after the resume point are dropped.

    That rewrite is atomic (a temp file, then a rename), so a kill or a full disk in the middle of it
    leaves the old log whole; rows are streamed, never all held in memory. Rows a kill cut short (a last
    line with missing fields) are dropped with the rest of what comes after the resume point."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.fh = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and path.exists():
            from embedtrain.fileio import atomic_path, iter_log_rows
            with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as new:
                writer = csv.DictWriter(new, fieldnames=LOG_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                last = 0
                for row in iter_log_rows(path):
                    update = _row_update(row)
                    if update is None or update <= last or update > keep_until:
                        continue
                    writer.writerow(row)
                    last = update
            self.fh = open(path, "a", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.fh, fieldnames=LOG_COLUMNS)
        else:
            self.fh = open(path, "w", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.fh, fieldnames=LOG_COLUMNS)
            self.writer.writeheader()
        self.fh.flush()

    def write(self, row: dict) -> None:
        if self.fh:
            self.writer.writerow(row)
            self.fh.flush()

    def close(self) -> None:
        if self.fh:
            self.fh.close()


def _row_update(row: dict) -> int | None:
    """A log row's update, or None for a row that is not whole (cut by a kill, or damaged)."""
    if None in row or any(v is None for v in row.values()):  # too many fields, or too few (cut short)
        return None
    try:
        return int(row["update"])
    except (TypeError, ValueError):
        return None


def _tensorboard(run_dir: Path, then):
    """An event callback that also writes TensorBoard scalars (loss, val_loss, val_train_loss, lr, effective_lr,
    by weight update) and previews to RUN/tensorboard, then calls `then`; the writer closes with the run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("report_to: tensorboard needs the tensorboard package: pip install tensorboard") from None
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)

    def on_event(ev: dict) -> None:
        kind = ev["event"]
        if kind == "update":
            for key in ("loss", "val_loss", "val_train_loss", "lr", "effective_lr"):
                if isinstance(ev.get(key), (int, float)):
                    writer.add_scalar(key, ev[key], ev["update"])
        elif kind == "preview":
            import numpy as np
            from PIL import Image
            with Image.open(ev["path"]) as im:
                writer.add_image("preview", np.asarray(im.convert("RGB")), ev["update"], dataformats="HWC")
        elif kind in ("done", "stopped", "failed"):
            writer.close()
        else:
            writer.flush()
        if then:
            then(ev)
    return on_event


class _EventSink:
    """Events to the callback and, for the web UI that follows the run folder, to events.jsonl."""

    def __init__(self, run_dir: Path, callback, enabled: bool, resume: bool):
        self.callback, self.fh = callback, None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.fh = open(run_dir / "events.jsonl", "a" if resume else "w", encoding="utf-8")

    def emit(self, kind: str, **fields) -> None:
        event = {"event": kind, "t": round(time.time(), 3), **fields}
        if self.fh:
            self.fh.write(json.dumps(event, default=str) + "\n")
            self.fh.flush()
        if self.callback:
            self.callback(event)

    def close(self) -> None:
        if self.fh:
            self.fh.close()


# ---------------------------------------------------------------------- entry points
def new_run_dir(cfg: TrainConfig) -> Path:
    """The folder a new run writes: out/run_name, or out/NAME-YYYYmmdd-HHMMSS (the name part shortened to
    fit the name limits when no run_name is given)."""
    from embedtrain.config import check_safe_name, default_run_name
    name = cfg.run_name or default_run_name(cfg.name)
    return Path(cfg.out) / check_safe_name(name, "run_name")  # as safe as an embedding name


# What the web UI puts into a run folder before it starts the process that trains into it.
LAUNCH_FILES = ("job.json", "job.log", "STOP")


def refuse_existing_run(run_dir: Path, flag: str = "--run-name", resumable: bool = True, field: str = "run_name",
                        what: str = "run folder") -> None:
    """A new run never writes into a folder that already holds files of its own (an earlier run's embedding,
    log, config or snapshots would be overwritten or mixed with the new ones): one ConfigError saying what
    to do instead. An empty folder, or one holding only what the web UI writes before launching, is fine."""
    try:
        held = sorted(p.name for p in run_dir.iterdir() if p.name not in LAUNCH_FILES)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError:
        return   # unreadable: _check_writable says so
    if not held:
        return
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    way_back = ""
    if resumable:
        way_back = (f", or continue that run with --resume {run_dir}" if (run_dir / "resume.pt").is_file() else
                    f"; --resume {run_dir} continues a stopped run, but this one has no resume.pt (it finished)")
    raise ConfigError(f"{field}: the {what} {run_dir} already exists and holds {shown}; a new run would "
                      f"overwrite or mix with its files: choose another {flag}{way_back}")


def _same_on_every_rank(run_dir: Path, device: str) -> Path:
    """Rank 0's timestamped run folder, for every process of a torchrun / accelerate launch run."""
    import torch.distributed as dist
    _dist_state(device)
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def train(cfg: TrainConfig, run_dir=None, on_event=None, resume: bool = False, stop=None, log=print) -> RunResult:
    """Train one embedding from a config; the programmatic twin of `python -m embedtrain train`."""
    if run_dir is None:
        run_dir = new_run_dir(cfg.validate())
        if not resume:
            refuse_existing_run(run_dir)   # two runs of one name started in the same second
    trainer = Trainer(cfg, log=log)
    return trainer.run(run_dir, on_event=on_event, resume=resume, stop=stop)


def _check_writable(folder: Path) -> None:
    """Fail before the model loads, not after the training, when the run folder cannot be written."""
    import tempfile
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if created:
            folder.rmdir()
    except OSError as e:
        raise ConfigError(f"out: cannot write the run folder {folder} ({e.strerror or e}); choose a writable "
                          "outputs folder") from None


def _leave_process_group() -> None:
    """End a multi-process run together: every rank waits for the others, then the process group is torn
    down before the interpreter exits (left to exit, gloo's threads sometimes aborted a rank with
    "terminate called without an active exception", failing a finished torchrun run)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedtrain train",
                                     description="Train a textual-inversion embedding.")
    parser.add_argument("--config", help="JSON file of settings (flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its folder")
    add_arguments(parser)
    args = parser.parse_args(argv)
    stop_requested = {"n": 0}
    main = int(os.environ.get("RANK", "0")) == 0   # under torchrun only rank 0 writes and reports

    def on_sigint(signum, frame):
        stop_requested["n"] += 1
        if stop_requested["n"] > 1:
            raise KeyboardInterrupt
        print("\nstop requested: finishing the current update and saving (Ctrl-C again to abort)",
              file=sys.stderr)

    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not run_dir.is_dir():
                raise ConfigError(f"resume: {run_dir} is not a run folder; give the folder of a stopped run (it "
                                  "holds config.json and resume.pt)")
            cfg = config_from_args(args, str(run_dir / "config.json"))
        else:
            cfg = config_from_args(args, args.config)
            run_dir = new_run_dir(cfg.validate())
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.run_name:
                run_dir = _same_on_every_rank(run_dir, cfg.device)  # ranks may start in different seconds
            if main:
                refuse_existing_run(run_dir)
        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, on_sigint)
        stop_file = run_dir / "STOP"
        if main:
            _check_writable(run_dir)
        # A STOP file is consumed when it stops the run, never deleted at start: the web UI may write it while
        # this process is still importing, and that stop must not be lost (the JobManager clears stale ones).
        result = train(cfg, run_dir, resume=bool(args.resume),
                       stop=lambda: stop_requested["n"] > 0 or stop_file.exists())
        _leave_process_group()
        # Saved and done: a Ctrl-C arriving now has nothing left to abort (it would only break the report),
        # and torchrun's SIGTERM to the other ranks must not break their teardown. This is the process's
        # entry point: a caller that runs cli() in-process and goes on must restore its own handlers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if result.status == "stopped" and main:
            stop_file.unlink(missing_ok=True)
    except EmbedtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only or vanished folder, a path the OS refuses (too long)
        import errno
        verb = "" if e.errno in (errno.ENAMETOOLONG, errno.ENOENT) else "cannot write "   # a path, not a write
        print(f"error: {verb}{shown(str(e.filename or run_dir))}: {e.strerror or e}. Files written before are "
              "intact (every write is atomic).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted (stop asked twice): the embedding files and resume state written before are intact",
              file=sys.stderr)
        return 130
    if not main:
        return 1 if result.status == "failed" else 0
    if result.status == "failed":
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    # 4 significant digits; a missing number is said in words, never printed as None.
    loss = "no loss measured" if result.final_loss is None else f"loss {result.final_loss:.4g}"
    val = (f"validation loss {result.val_loss:.4g}" if result.val_loss is not None
           else "no validation set" if not (cfg.val_split or cfg.val_data)
           else "no validation loss at the last update")
    print(f"{result.status}: {result.updates} updates, {loss}, {val}")
    if result.message:
        print(result.message)
    for f in result.files:
        print(f"wrote {f}")
    return 0
