"""The demo model's card: README.md written from its pretraining stats and its measured scores.

A demo model folder holds `pretrain_stats.json` (CARD_STATS, written by demo.pretrain) and, once
measured, `scores.json` (SCORES, written by demo.score's --evaluate-model through write_scores). The
card says which model state (weights and sampler) the scores were measured on and marks them stale
when the folder has changed since.
"""

from __future__ import annotations

import json
from pathlib import Path

from embedtrain.demo.model import GUIDANCE, SAMPLE_STEPS, SIZES

CARD_STATS = "pretrain_stats.json"
SCORES = "scores.json"      # {"measured_on": model_state(...), "scores": {label: value}, "status": markdown}

LEGACY_DECODER_KEYS = ("decoder_command", "decoder_batch_size", "decoder_lr", "decoder_loss",
                       "vae_recon_judge_accuracy_encoder_phase", "minutes_decoder")


def decoder_phases(stats: dict) -> list[dict]:
    """The decoder-only phases run so far, oldest first. Stats saved before phases were recorded
    hold their one phase in flat keys (LEGACY_DECODER_KEYS); they are read as phase 1."""
    if "decoder_phase_log" in stats:
        return list(stats["decoder_phase_log"])
    if not stats.get("decoder_steps"):
        return []
    nan = float("nan")
    return [dict(command=stats.get("decoder_command", ""), steps=stats["decoder_steps"],
                 batch_size=stats.get("decoder_batch_size"), lr=stats.get("decoder_lr"),
                 loss=stats.get("decoder_loss", nan), recon_before=stats.get("vae_recon_judge_accuracy_encoder_phase", nan),
                 recon_after=stats.get("vae_recon_judge_accuracy", nan), minutes=stats.get("minutes_decoder", 0))]


def vae_recon_first(stats: dict) -> float:
    """The judge's reading of reconstructions after the VAE phase, before any decoder-only phase."""
    phases = decoder_phases(stats)
    return phases[0]["recon_before"] if phases else stats.get("vae_recon_judge_accuracy", float("nan"))


def decoder_minutes(stats: dict) -> str:
    """The card's words for the decoder-only phases' time, which minutes_total does not include."""
    m = sum(ph["minutes"] for ph in decoder_phases(stats))
    return f", plus {m:.1f} min of decoder-only phases" if m else ""


def saved_sampler(folder: Path) -> str:
    """The class of the scheduler saved in a pipeline folder ("?" when there is none)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text(encoding="utf-8"))["_class_name"] if path.is_file() else "?"


def model_state(stats: dict, folder: Path) -> str:
    """What the scores depend on: the weights' training and how they are sampled (the folder's scheduler
    at the demo's CFG scale). Scores measured on another state are stale."""
    return (f"{stats.get('unet_steps_done', 0)} UNet updates, {stats.get('decoder_steps', 0)} decoder-only "
            f"updates, sampled with {saved_sampler(folder)} at CFG {GUIDANCE:g}")


def scores_current(saved: dict, stats: dict, folder: Path) -> bool:
    """Whether scores read by read_scores were measured on the model state of `stats` and `folder`."""
    return saved.get("measured_on") == model_state(stats, folder)


def read_scores(folder: Path) -> dict:
    """The folder's scores.json as {"measured_on", "scores", "status"}; {} when not measured."""
    path = Path(folder) / SCORES
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    if "scores" not in saved:     # the first format: the scores alone, weights not recorded
        saved = {"measured_on": None, "scores": saved}
    return saved


def write_scores(folder: Path, stats: dict, scores: dict, status: str) -> None:
    """Save scores measured on the folder's model state (and the card's Status text), then rewrite the card.
    scores.json is written atomically: a kill mid-write must not cut the card's scores."""
    from embedtrain.fileio import atomic_write_text
    atomic_write_text(Path(folder) / SCORES, json.dumps({"measured_on": model_state(stats, folder), "scores": scores,
                                                         "status": status}, indent=2))
    write_card(folder, stats)


def write_card(folder: Path, stats: dict) -> None:
    """README.md model card from the pretraining stats and the folder's scores.json (if measured)."""
    s = SIZES["demo"]
    lines = [
        "# embedtrain demo model",
        "",
        "A tiny Stable Diffusion pipeline of the real architecture (diffusers UNet2DConditionModel,",
        "AutoencoderKL, transformers CLIPTextModel + CLIPTokenizer) pretrained from scratch on the",
        "embedtrain demo world (`embedtrain/demo/world.py`) on a 2-core CPU. It exists so textual",
        "inversion can be seen to learn on a laptop CPU. Not an image model for anything else.",
        f"Sampled by default with its saved scheduler ({saved_sampler(folder)}), {SAMPLE_STEPS} steps, CFG scale "
        f"{GUIDANCE:g}.",
        "",
        "## Architecture",
        "",
        f"- UNet: block channels {s['unet_channels']}, {s['layers']} layers per block, cross-attention dim "
        f"{s['cross_dim']}, {s['heads']}-dim heads, 16 x 16 x 4 latents; {stats.get('unet_params', 0) / 1e6:.2f}M parameters",
        f"- VAE: AutoencoderKL, block channels {s['vae_channels']}, 64 px <-> 16 x 16 x 4; "
        f"{stats.get('vae_params', 0) / 1e6:.2f}M parameters; scaling factor {stats.get('scaling_factor', 0):.4f}",
        f"- Text encoder: CLIPTextModel, {s['te_layers']} layers, hidden {s['cross_dim']}; "
        f"{stats.get('te_params', 0) / 1e6:.2f}M parameters; word-level vocabulary: each world word is one token",
        "",
        "## Training data",
        "",
        "64 x 64 renders: 6 shapes (circle, square, triangle, star, ring, cross) x 8 colours (red, orange,",
        "yellow, green, blue, purple, white, black) on a background of another palette colour, random",
        "position and size. Captions in many forms (\"a purple ring on a green background\", \"a photo of a",
        "star\", \"a small red circle\", \"a blue background with a cross\", the A1111 object templates...).",
        "**Held out:** the purple star never appears in images or captions (purple only on other shapes,",
        "stars only in other colours). The demo dataset (`assets/demo_dataset`) is made of it.",
        "",
        "## Pretraining",
        "",
        f"- command: `{stats.get('command', '')}`",
        f"- seed {stats.get('seed')}; VAE {stats.get('vae_steps')} updates of batch {stats.get('vae_batch_size')} "
        f"(final loss {stats.get('vae_loss', float('nan')):.4f}; the judge reads "
        f"{vae_recon_first(stats):.1%} of 200 reconstructed renders right)",
        *[f"- then the VAE decoder alone, phase {k + 1} (encoder frozen, so the UNet's latent space is unchanged): "
          f"{ph['steps']} updates of batch {ph['batch_size']}, lr {ph['lr']}, {ph['minutes']:.1f} min "
          f"(`{ph['command']}`); the judge reads {ph['recon_before']:.1%} -> {ph['recon_after']:.1%} of the "
          f"reconstructions right" for k, ph in enumerate(decoder_phases(stats))],
        f"- {stats.get('images')} fixed renders encoded once; UNet + text encoder "
        f"{stats.get('unet_steps_done')} updates of batch {stats.get('batch_size')} in all (phases below), "
        f"AdamW (warmup, cosine to 10% of each phase's peak lr), min-SNR-5 "
        f"weighted epsilon loss, 10% empty captions, EMA 0.999 (saved weights)",
        *[f"- UNet phase {k + 1}: {ph['done']} of {ph['planned'] or '?'} planned updates of batch {ph['batch_size']}, "
          f"peak lr {ph['lr']}, offset noise {ph['offset_noise']}, loss {ph.get('loss_first', float('nan')):.4f} -> "
          f"{ph.get('loss_last', float('nan')):.4f}" + ("" if ph.get("finished") else " (interrupted)")
          for k, ph in enumerate(stats.get("unet_phase_log", []))],
        *[f"- continued with `{c}`" for c in stats.get("continue_commands", [])],
        f"- loss (min-SNR weighted, mean of 100 updates): first {stats.get('loss_first', float('nan')):.4f}"
        f", last {(stats.get('unet_phase_log') or [stats])[-1].get('loss_last', float('nan')):.4f}",
        f"- wall time {stats.get('minutes_total', 0):.1f} min on 2 CPU cores (VAE {stats.get('minutes_vae', 0):.1f} "
        f"min){decoder_minutes(stats)}, {'finished' if stats.get('finished') else 'checkpoint of an unfinished run'}",
        "",
        "## Scores",
        "",
    ]
    saved = read_scores(folder)
    stale = not scores_current(saved, stats, folder)
    measure = "`python -m embedtrain.demo.score --evaluate-model <this folder>`"
    if not saved.get("scores"):
        lines += [f"Not measured yet: {measure}."]
    else:
        if stale:
            lines += [f"**Stale:** measured on another model state ({saved.get('measured_on') or 'not recorded'}); "
                      f"this one: {model_state(stats, folder)}. Measure again: {measure}.", ""]
        lines += [f"- {k}: {v}" for k, v in saved["scores"].items()]
    if saved.get("status"):
        lines += ["", "## Status", ""]
        if stale:
            lines += ["(Written about the model state the scores above were measured on.)", ""]
        lines += [saved["status"].strip()]
    (Path(folder) / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
