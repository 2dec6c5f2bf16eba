"""The demo pretraining script end to end at toy scale: a run, a continuation, a decoder fine-tune."""

import json

import pytest


@pytest.mark.slow
def test_pretrain_continue_and_decoder_only_write_a_loadable_pipeline(tmp_path):
    from embedtrain.demo import pretrain
    from embedtrain.demo.card import write_scores
    import torch
    from embedtrain.demo.score import load_demo_pipeline
    threads = torch.get_num_threads()
    out = tmp_path / "model"
    common = ["--out", str(out), "--images", "16", "--batch-size", "2", "--vae-batch-size", "2", "--threads", "1",
              "--minutes", "5"]
    assert pretrain.cli([*common, "--vae-steps", "2", "--unet-steps", "3", "--offset-noise", "0.3"]) == 0
    stats = json.loads((out / "pretrain_stats.json").read_text())
    assert stats["finished"] and stats["unet_steps_done"] == 3 and stats["offset_noise"] == 0.3
    scale = stats["scaling_factor"]
    write_scores(out, stats, {"seen": 0.5}, "Status of 3 updates.")
    text = (out / "README.md").read_text()
    assert "- seen: 0.5" in text and "Status of 3 updates." in text and "Stale" not in text
    unet_before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    assert pretrain.cli([*common, "--continue", "--unet-steps", "2", "--lr", "5e-4"]) == 0
    stats = json.loads((out / "pretrain_stats.json").read_text())
    assert stats["unet_steps_done"] == 5 and [p["done"] for p in stats["unet_phase_log"]] == [3, 2]
    assert stats["scaling_factor"] == scale          # a continuation keeps the latent space
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != unet_before
    card = (out / "README.md").read_text()   # the scores survive the folder's replacement, marked stale
    assert "**Stale:** measured on another model state (3 UNet updates, 0 decoder-only updates, sampled with " \
           "EulerAncestralDiscreteScheduler at CFG 5)" in card
    assert "- seen: 0.5" in card and "Status of 3 updates." in card
    encoder_before = _encoder(out)

    assert pretrain.cli([*common, "--decoder-only", "--decoder-steps", "2"]) == 0
    stats = json.loads((out / "pretrain_stats.json").read_text())
    assert stats["decoder_steps"] == 2 and [ph["steps"] for ph in stats["decoder_phase_log"]] == [2]
    assert pretrain.cli([*common, "--decoder-only", "--decoder-steps", "3", "--decoder-lr", "1e-4"]) == 0
    stats = json.loads((out / "pretrain_stats.json").read_text())     # a second phase adds to the first
    first, second = stats["decoder_phase_log"]
    assert stats["decoder_steps"] == 5 and (first["steps"], second["steps"], second["lr"]) == (2, 3, 1e-4)
    assert second["recon_before"] == first["recon_after"] and stats["vae_recon_judge_accuracy"] == second["recon_after"]
    after = _encoder(out)
    assert all((after[k] == v).all() for k, v in encoder_before.items())   # the encoder is untouched
    card = (out / "README.md").read_text()
    assert "UNet phase 2: 2 of 2 planned updates" in card
    assert "the VAE decoder alone, phase 1" in card and "the VAE decoder alone, phase 2" in card
    assert "--decoder-lr 1e-4" in card and "min of decoder-only phases" in card
    assert "this one: 5 UNet updates, 5 decoder-only updates" in card     # the scores of 3 updates: still stale
    pipe = load_demo_pipeline(str(out))
    assert pipe.vae.config.scaling_factor == scale
    # --threads 1 was for those runs only (it left later tests in this process on one thread)
    assert torch.get_num_threads() == threads


def _encoder(folder):
    from safetensors.torch import load_file
    weights = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    return {k: v.clone() for k, v in weights.items() if k.startswith(("encoder.", "quant_conv."))}


def test_card_marks_scores_of_other_weights_and_reads_the_first_format(tmp_path):
    from embedtrain.demo.card import read_scores, write_card, write_scores
    stats = {"unet_steps_done": 10, "decoder_steps": 0}
    write_card(tmp_path, stats)
    assert "Not measured yet" in (tmp_path / "README.md").read_text()
    (tmp_path / "scores.json").write_text(json.dumps({"judge": 1.0}))    # the first format: scores alone
    write_card(tmp_path, stats)
    card = (tmp_path / "README.md").read_text()
    assert "**Stale:** measured on another model state (not recorded)" in card and "- judge: 1.0" in card
    write_scores(tmp_path, stats, {"judge": 1.0}, "All good.")            # scores.json and the card
    assert read_scores(tmp_path)["scores"] == {"judge": 1.0}
    card = (tmp_path / "README.md").read_text()
    assert "Stale" not in card and card.rstrip().endswith("## Status\n\nAll good.")
    write_card(tmp_path, {**stats, "decoder_steps": 5})                  # a decoder phase changes the weights
    card = (tmp_path / "README.md").read_text()
    assert "this one: 10 UNet updates, 5 decoder-only updates" in card
    assert "(Written about the model state the scores above were measured on.)" in card
    write_card(tmp_path, stats)
    assert "Stale" not in (tmp_path / "README.md").read_text()
    sched = tmp_path / "scheduler"                                        # so does another sampler
    sched.mkdir()
    (sched / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    write_card(tmp_path, stats)
    card = (tmp_path / "README.md").read_text()
    assert "this one: 10 UNet updates, 0 decoder-only updates, sampled with DDIMScheduler at CFG 5" in card


def test_a_card_saved_before_decoder_phases_were_logged_reads_its_one_phase():
    from embedtrain.demo.card import decoder_minutes, decoder_phases, vae_recon_first
    flat = {"decoder_steps": 452, "decoder_command": "python -m embedtrain.demo.pretrain --decoder-only",
            "decoder_batch_size": 16, "decoder_lr": 5e-4, "decoder_loss": 0.037, "minutes_decoder": 9.2,
            "vae_recon_judge_accuracy_encoder_phase": 0.695, "vae_recon_judge_accuracy": 0.85}
    (phase,) = decoder_phases(flat)
    assert (phase["steps"], phase["recon_before"], phase["recon_after"], phase["minutes"]) == (452, 0.695, 0.85, 9.2)
    assert vae_recon_first(flat) == 0.695 and decoder_minutes(flat) == ", plus 9.2 min of decoder-only phases"
    assert decoder_phases({"vae_recon_judge_accuracy": 0.7}) == [] and vae_recon_first({"vae_recon_judge_accuracy": 0.7}) == 0.7
    assert decoder_minutes({}) == ""
