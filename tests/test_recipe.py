"""Recipe options: caption tag shuffling / keep / dropout, caption dropout, noise offset, min-SNR weighting."""

import random

import pytest
import torch

from conftest import make_images
from embedtrain.config import ConfigError, TrainConfig, apply_preset
from embedtrain.data import vary_caption
from embedtrain.trainer import Trainer, _seed_for

TAGS = "purple star, white background, centered, flat colour, small, sharp edges"


def test_shuffle_keeps_the_first_tags_and_every_tag():
    tags = [t.strip() for t in TAGS.split(",")]
    seen = set()
    for pos in range(60):
        out = vary_caption(TAGS, random.Random(pos), shuffle=True, keep=2).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 20   # really shuffled: 24 orders of the 4 free tags, most of them met


def test_tag_dropout_drops_free_tags_at_its_rate_and_never_a_kept_one():
    kept, dropped, total = 0, 0, 0
    for pos in range(2000):
        out = vary_caption(TAGS, random.Random(pos), keep=1, tag_dropout=0.3).split(", ")
        assert out[0] == "purple star"
        dropped += 6 - len(out)
        total += 5
        kept += out == [t.strip() for t in TAGS.split(",")]
    assert abs(dropped / total - 0.3) < 0.02
    assert kept > 0   # sometimes nothing is dropped (0.7^5 = 17%)


def test_the_same_slot_gets_the_same_caption_and_options_off_change_nothing():
    a = vary_caption(TAGS, random.Random(7), shuffle=True, tag_dropout=0.2, caption_dropout=0.1)
    b = vary_caption(TAGS, random.Random(7), shuffle=True, tag_dropout=0.2, caption_dropout=0.1)
    assert a == b
    rng = random.Random(3)
    state = rng.getstate()
    assert vary_caption(TAGS, rng) == TAGS and rng.getstate() == state   # off: no draw at all


@pytest.fixture
def tag_cfg(tmp_path):
    data = make_images(tmp_path / "data", 4, size=40)
    for txt in data.glob("*.txt"):
        txt.write_text(TAGS)
    template = tmp_path / "template.txt"
    template.write_text("a photo of [name], [filewords]\n")
    cfg = TrainConfig(model="tiny", data=str(data), name="zorblat", init_text="circle", steps=2, batch_size=4,
                      template=str(template), out=str(tmp_path / "out"))
    return apply_preset(cfg, explicit={"steps", "batch_size", "init_text", "template"})


def test_the_trainer_builds_each_slots_caption_from_its_own_seed(tag_cfg):
    cfg = tag_cfg.replace(shuffle_tags=True, keep_tokens=1, tag_dropout=0.25)
    t = Trainer(cfg)
    prompts = t.batch_inputs(0)[3]
    expected = [vary_caption(TAGS, random.Random(_seed_for("caption", cfg.seed, pos)), True, 1, 0.25, 0.0)
                for pos in range(4)]
    assert all(p.endswith(e) for p, e in zip(prompts, expected)), (prompts, expected)
    assert len(set(prompts)) > 1
    assert Trainer(cfg).batch_inputs(0)[3] == prompts   # reproducible (and so resumable)
    plain = Trainer(tag_cfg).batch_inputs(0)
    assert all(p.endswith(TAGS) for p in plain[3])
    # the caption options draw from their own stream: images, noise and timesteps are the same as without
    with_opts = t.batch_inputs(0)
    assert torch.equal(with_opts[1], plain[1]) and torch.equal(with_opts[2], plain[2])


def test_caption_dropout_leaves_the_template_alone(tag_cfg):
    t = Trainer(tag_cfg.replace(caption_dropout=1.0, template="object_filewords"))
    for prompt in t.batch_inputs(0)[3]:
        assert "purple star" not in prompt and "zorblat" in prompt


def test_noise_offset_adds_one_constant_per_channel(tag_cfg):
    plain = Trainer(tag_cfg).batch_inputs(0)[1]
    shifted = Trainer(tag_cfg.replace(noise_offset=0.1)).batch_inputs(0)[1]
    diff = shifted - plain                                   # [B, C, h, w]
    per_channel = diff.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(diff, per_channel.expand_as(diff))   # constant over each channel
    assert 0.02 < float(per_channel.std()) < 0.3             # of scale ~0.1 (16 draws of N(0, 0.1^2))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_the_loss_as_computed_by_hand(tag_cfg, prediction):
    t = Trainer(tag_cfg.replace(min_snr_gamma=5.0))
    t.noise_scheduler.register_to_config(prediction_type=prediction)
    latents, noise, timesteps, prompts, time_ids = t.batch_inputs(0)
    timesteps = torch.tensor([5, 200, 600, 990])   # SNR from high (> 5) to low (< 1)
    with torch.no_grad():
        per_image = t._loss(latents, noise, timesteps, prompts, reduce=False)
        weighted = t._loss(latents, noise, timesteps, prompts, weighted=True)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2   # scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    w = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1 if prediction == "v_prediction" else snr)
    assert w[0] < 1 and w[-1] == pytest.approx(1.0 if prediction == "epsilon" else float(snr[-1] / (snr[-1] + 1)))
    assert float(weighted) == pytest.approx(float((per_image.double() * w).mean()), rel=1e-5)
    t0 = Trainer(tag_cfg)
    t0.noise_scheduler.register_to_config(prediction_type=prediction)
    with torch.no_grad():
        plain = t0._loss(latents, noise, timesteps, prompts, weighted=True)
    assert float(plain) == pytest.approx(float(per_image.mean()), rel=1e-5)   # gamma 0: plain MSE


def test_recipe_options_are_checked_and_recorded(tag_cfg, tmp_path):
    for field, bad in (("tag_dropout", 1.5), ("caption_dropout", -0.1), ("noise_offset", 2.0),
                       ("min_snr_gamma", -1.0), ("keep_tokens", -1)):
        with pytest.raises(ConfigError, match=field):
            tag_cfg.replace(**{field: bad}).validate()
    t = Trainer(tag_cfg.replace(shuffle_tags=True, noise_offset=0.05, min_snr_gamma=5.0))
    meta = t.metadata(1, 1, 0.1, None)
    assert (meta["shuffle_tags"], meta["noise_offset"], meta["min_snr_gamma"]) == (True, 0.05, 5.0)
    assert "tag_dropout" not in meta   # off: not recorded


def test_report_to_tensorboard_writes_what_the_log_holds(tag_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from embedtrain.fileio import read_log_rows
    run = tmp_path / "run"
    cfg = tag_cfg.replace(steps=4, batch_size=1, val_split=0.25, val_every=2, preview_every=2, report_to="tensorboard")
    assert Trainer(cfg).run(run).status == "finished"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    rows = read_log_rows(run / "log.csv")
    assert [e.step for e in acc.Scalars("loss")] == [int(r["update"]) for r in rows] == [1, 2, 3, 4]
    assert [round(e.value, 5) for e in acc.Scalars("loss")] == [round(float(r["loss"]), 5) for r in rows]
    assert [e.step for e in acc.Scalars("val_loss")] == [2, 4]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([float(r["lr"]) for r in rows])
    previews = acc.Images("preview")
    assert [p.step for p in previews] == [2, 4] and previews[0].width == 32
    with pytest.raises(ConfigError, match="report_to"):
        tag_cfg.replace(report_to="wandb").validate()


def test_save_format_png_writes_an_a1111_embedding_card_of_the_last_preview(tag_cfg, tmp_path):
    import numpy as np
    from PIL import Image

    from embedtrain.embedding import load_embedding
    run = tmp_path / "run"
    result = Trainer(tag_cfg.replace(steps=2, preview_every=1, save_formats="safetensors,png")).run(run)
    card = run / "zorblat.png"
    assert card in result.files
    emb, ref = load_embedding(card), load_embedding(run / "zorblat.safetensors")
    assert emb.format == "a1111-png" and emb.name == "zorblat"
    torch.testing.assert_close(emb.vectors, ref.vectors)
    with Image.open(card) as a, Image.open(run / "previews" / "zorblat-2.png") as b:
        assert "sd-ti-embedding" in a.text and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_an_sdxl_card_holds_both_halves(tmp_path):
    from embedtrain.embedding import load_embedding, save_embedding
    halves = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}
    path = save_embedding(tmp_path / "xl.png", halves, "xl", {"updates": 3}, fmt="png")
    emb = load_embedding(path)
    torch.testing.assert_close(emb.vectors, halves["clip_l"])
    torch.testing.assert_close(emb.vectors_g, halves["clip_g"])
