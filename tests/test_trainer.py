"""The training loop on the tiny model: what changes, what learns, how it counts, stop/resume."""

import csv
import math

import pytest
import torch

from embedtrain.calculator import derive
from embedtrain.config import ConfigError
from embedtrain.trainer import Trainer


def read_log(run_dir):
    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_only_new_vectors_change_and_other_rows_are_bit_identical(tiny_cfg, tmp_path):
    t = Trainer(tiny_cfg.replace(steps=4))
    from embedtrain.embedding import text_transformer
    table = text_transformer(t.text.encoders[0]).embeddings.token_embedding
    before = table.base.weight.detach().clone()
    frozen = {n: p.detach().clone() for n, p in t.unet.named_parameters()}
    start = t.token.vectors.detach().clone()
    result = t.run(tmp_path / "run")
    assert result.status == "finished" and result.updates == 4
    assert torch.equal(table.base.weight, before)
    assert all(torch.equal(p, frozen[n]) for n, p in t.unet.named_parameters())
    assert not torch.allclose(t.token.vectors, start)
    # the optimizer only ever saw the new vectors
    trainable = [p for m in (t.unet, t.vae, *t.text.encoders) for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is t.token.vectors


def test_loss_on_a_fixed_batch_falls_over_30_updates(tiny_cfg, tmp_path):
    # Overfit one image with fixed noise: the loss the vectors can move must go down.
    t = Trainer(tiny_cfg.replace(batch_size=1, lr=2e-2))
    latents, noise, timesteps, prompts, _ = t.batch_inputs(0)
    opt = torch.optim.AdamW([t.token.vectors], lr=2e-2)
    losses = []
    for _ in range(30):
        loss = t._loss(latents, noise, timesteps, prompts)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # A random tiny UNet barely listens to the text, so the fall is small but it must be steady:
    # zero gradients would give a flat line, a wrong sign a rising one.
    falls = sum(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] and falls >= 25, losses


@pytest.mark.parametrize("bs,ga,steps,unit", [(2, 1, 5, "update"), (3, 2, 4, "update"), (3, 1, 7, "batch"),
                                              (5, 2, 8, "batch"), (8, 1, 3, "update")])
def test_logged_epochs_and_updates_match_the_calculator(tiny_cfg, tmp_path, bs, ga, steps, unit):
    cfg = tiny_cfg.replace(batch_size=bs, grad_accum=ga, steps=steps, step_unit=unit)
    result = Trainer(cfg).run(tmp_path / "run")
    rows = read_log(tmp_path / "run")
    plan = derive(8, bs, ga, steps, unit)
    assert result.updates == plan.weight_updates == int(rows[-1]["update"])
    assert [int(r["update"]) for r in rows] == list(range(1, plan.weight_updates + 1))
    last = rows[-1]
    batches = plan.weight_updates * ga  # batches that complete a weight update are the ones run
    assert int(last["batch"]) == batches
    assert int(last["images_seen"]) == batches * bs
    assert float(last["epoch"]) == pytest.approx(batches * bs / 8, abs=1e-4)
    assert batches == plan.batches   # these settings leave no incomplete accumulation group ...
    assert math.floor(float(last["epoch"]) + 1e-9) == plan.epochs_floor   # ... so the calculator's epochs exactly


def test_grad_accum_equals_one_big_batch(tiny_cfg, tmp_path):
    a = Trainer(tiny_cfg.replace(batch_size=4, grad_accum=1, steps=3, lr=1e-2, optimizer="sgd", adam_beta1=0.0))
    a.run(tmp_path / "a")
    b = Trainer(tiny_cfg.replace(batch_size=2, grad_accum=2, steps=3, lr=1e-2, optimizer="sgd", adam_beta1=0.0))
    b.run(tmp_path / "b")
    assert not torch.allclose(a.token.vectors, a.init_vectors)
    torch.testing.assert_close(a.token.vectors, b.token.vectors, rtol=1e-4, atol=1e-6)


def test_stop_then_resume_reproduces_the_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(steps=8, val_split=0.25, val_every=2, batch_size=2)
    full = Trainer(cfg)
    full.run(tmp_path / "full")
    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] >= 3

    first = Trainer(cfg).run(tmp_path / "part", stop=stop_after_3)
    assert first.status == "stopped" and first.updates == 3
    assert (tmp_path / "part" / "resume.pt").exists()
    assert (tmp_path / "part" / "zorblat.safetensors").exists()
    second = Trainer(cfg)
    result = second.run(tmp_path / "part", resume=True)
    assert result.status == "finished" and result.updates == 8
    torch.testing.assert_close(second.token.vectors, full.token.vectors, rtol=1e-5, atol=1e-7)
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["update"] for r in a] == [r["update"] for r in b]
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4)
        assert (ra["val_loss"] == "") == (rb["val_loss"] == "")
    assert not (tmp_path / "part" / "resume.pt").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_embedding(tiny_cfg, tmp_path):
    from embedtrain.embedding import load_embedding
    t = Trainer(tiny_cfg.replace(steps=6))
    real_loss = t._loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real_loss(*a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    t._loss = poisoned
    result = t.run(tmp_path / "run")
    assert result.status == "failed" and result.updates == 2  # the vectors that gave NaN (after update 3) are dropped
    assert "nan" in result.message.lower() and "last good" in result.message
    saved = load_embedding(tmp_path / "run" / "zorblat.safetensors")
    assert torch.isfinite(saved.vectors).all()
    torch.testing.assert_close(saved.vectors, t.token.vectors.detach())


def _fp16_trainer(cfg, init_scale):
    """A Trainer under fp16 autocast with loss scaling, on the CPU (fp16 autocast and GradScaler run there
    too; the app offers fp16 on CUDA only): the CUDA fp16 path without a GPU."""
    t = Trainer(cfg)
    assert t.grad_scaler() is None   # fp32: no scaler
    t.autocast_dtype = torch.float16
    t.grad_scaler = lambda: torch.amp.GradScaler("cpu", init_scale=init_scale)
    return t


def test_fp16_loss_scaling_redoes_overflowing_updates_and_still_learns(tiny_cfg, tmp_path):
    logged = []
    t = _fp16_trainer(tiny_cfg.replace(steps=5), init_scale=2.0 ** 40)   # overflows until the scale falls
    t.log = logged.append
    before = t.token.vectors.detach().clone()
    result = t.run(tmp_path / "run")
    assert result.status == "finished" and result.updates == 5
    redone = [line for line in logged if "fp16 loss scaling" in line]
    assert redone and int(redone[0].split(":")[1].split()[0]) >= 10   # 2^40 -> below 2^30 takes >= 10 halvings
    rows = read_log(tmp_path / "run")
    assert [int(r["update"]) for r in rows] == [1, 2, 3, 4, 5] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert torch.isfinite(t.token.vectors).all() and not torch.equal(t.token.vectors.detach(), before)


def test_fp16_scale_collapse_fails_and_keeps_the_last_good_embedding(tiny_cfg, tmp_path, monkeypatch):
    import embedtrain.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "MAX_FP16_OVERFLOWS", 3)
    t = _fp16_trainer(tiny_cfg.replace(steps=5), init_scale=2.0 ** 60)   # needs far more than 3 halvings
    before = t.token.vectors.detach().clone()
    result = t.run(tmp_path / "run")
    assert result.status == "failed" and result.updates == 0
    assert "gradient became NaN or infinite" in result.message
    torch.testing.assert_close(t.token.vectors.detach(), before)


def test_validation_loss_is_fixed_noise(tiny_cfg):
    t = Trainer(tiny_cfg.replace(val_split=0.25))
    assert len(t.val_samples) == 2
    v1 = t.fixed_loss("val")
    assert t.fixed_loss("val") == v1  # same embedding, same number: noise and timesteps are fixed
    with torch.no_grad():  # (not a constant shift: CLIP's LayerNorm would remove it)
        t.token.vectors.add_(torch.randn(t.token.vectors.shape, generator=torch.Generator().manual_seed(1)))
    assert t.fixed_loss("val") != v1  # only the embedding changed


def test_run_folder_has_log_snapshots_previews_and_final_files(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(steps=4, save_every=2, preview_every=2, save_formats="safetensors,a1111,diffusers",
                           val_split=0.25, val_every=2)
    result = Trainer(cfg).run(tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.json", "log.csv", "events.jsonl", "zorblat-2.safetensors", "zorblat.safetensors",
                 "zorblat.pt", "diffusers/zorblat.safetensors", "previews/zorblat-2.png",
                 "previews/zorblat-4.png"):
        assert (run / name).exists(), name
    assert len(result.files) == 3
    rows = read_log(run)
    assert set(rows[0]) >= {"update", "batch", "epoch", "images_seen", "loss", "val_loss", "lr"}
    assert rows[1]["val_loss"] != "" and rows[0]["val_loss"] == ""


@pytest.mark.parametrize("change,field", [
    (dict(data="/nonexistent/folder"), "does not exist"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(lr=-1.0), "lr"),
    (dict(batch_size=9), "batch_size"),
    (dict(name="circle"), "vocabulary"),
    (dict(lr_schedule="piecewise", lr_piecewise="0.005:abc"), "piecewise"),
    (dict(lr_schedule="piecewise", lr_piecewise="0.005:2"), "ends"),
    (dict(steps=0), "steps"),
    (dict(name="../evil"), "name"),
])
def test_bad_input_gives_a_clear_error(tiny_cfg, tmp_path, change, field):
    from embedtrain import EmbedtrainError
    with pytest.raises(EmbedtrainError, match=field):
        Trainer(tiny_cfg.replace(**change)).run(tmp_path / "run")


def test_empty_folder_and_corrupt_image(tiny_cfg, tmp_path):
    from embedtrain import EmbedtrainError
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmbedtrainError, match="no usable image"):
        Trainer(tiny_cfg.replace(data=str(empty)))
    data = tmp_path / "data"
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    t = Trainer(tiny_cfg.replace(steps=1))
    assert [s.path.name for s in t.skipped] == ["broken.jpg"]
    t.run(tmp_path / "run")
    assert "broken.jpg" in (tmp_path / "run" / "events.jsonl").read_text()


def test_config_json_round_trip_and_unknown_keys(tiny_cfg, tmp_path):
    from embedtrain.config import TrainConfig
    tiny_cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == tiny_cfg
    (tmp_path / "bad.json").write_text('{"batch_sise": 4}')
    with pytest.raises(ConfigError, match="batch_sise"):
        TrainConfig.load(tmp_path / "bad.json")


def test_set_run_re_derives_the_plan_and_refuses_what_needs_a_new_trainer(tiny_cfg):
    t = Trainer(tiny_cfg.replace(steps=4, step_unit="update"))
    t.set_run(steps=12, step_unit="batch", lr=1e-3)
    cfg = t.cfg
    assert (cfg.steps, cfg.step_unit, cfg.lr) == (12, "batch", 1e-3)
    assert t.plan == derive(len(t.train_samples), cfg.batch_size, cfg.grad_accum, 12, "batch",
                            repeats=cfg.repeats, processes=t.world)
    with pytest.raises(ValueError, match="batch_size, seed"):
        t.set_run(batch_size=2, seed=3, lr=1e-2)
    assert t.cfg.lr == 1e-3   # a refused change leaves the run as it was
    with pytest.raises(ConfigError, match="lr"):
        t.set_run(lr=-1.0)


def test_token_ids_are_the_tokenizers_and_are_cached(tiny_cfg):
    t = Trainer(tiny_cfg.replace(steps=2))
    prompts = [f"a photo of {t.cfg.name}", "a photo of a star", f"a photo of {t.cfg.name}"]
    expected = t.tokenizer([t.token.expand(p) for p in prompts], padding="max_length", truncation=True,
                           max_length=t.tokenizer.model_max_length, return_tensors="pt").input_ids
    assert [x.shape for x in t.token_ids(prompts)] == [expected.shape]   # one tokenizer: one tensor
    assert torch.equal(t.token_ids(prompts)[0], expected)
    calls = []

    class Counting:
        def __init__(self, real):
            self.real, self.model_max_length = real, real.model_max_length

        def __call__(self, *a, **k):
            calls.append(a)
            return self.real(*a, **k)

    t.text.parts[0].tokenizer = Counting(t.tokenizer)
    assert torch.equal(t.token_ids(prompts[::-1])[0], expected.flip(0))
    assert calls == []                      # all three were cached
    t.token_ids(["a red star"])
    assert calls == [(["a red star"],)]     # only the new prompt is tokenized


def test_latent_cache_is_the_same_whatever_the_encode_batch():
    """The trainer encodes cfg.batch_size images at a time (memory); the cached latents must not
    depend on it: posterior means, mirrored views and a seeded 'once' sample alike."""
    from PIL import Image

    from embedtrain.data import LatentCache
    from embedtrain.demo.model import build_pipeline
    vae = build_pipeline("tiny").vae
    images = [Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)) for i in range(5)]
    for im, i in zip(images, range(5)):
        im.paste((250, 250, 250), (2 + i, 4, 12 + 2 * i, 20))       # asymmetric, so the mirror differs
    for sampling in ("deterministic", "once"):
        one = LatentCache(vae, images, "cpu", sampling, flip=True, seed=3, batch=1)
        many = LatentCache(vae, images, "cpu", sampling, flip=True, seed=3, batch=8)
        assert one.mean.shape[:3] == (2, 5, 4)
        torch.testing.assert_close(one.mean, many.mean, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(one.get([0], [True]), one.get([0], [False]))


def test_the_runs_warnings_and_schedule_are_in_the_result_and_on_the_trainer(tiny_cfg, tmp_path):
    import json
    t = Trainer(tiny_cfg.replace(steps=3, lr_schedule="triangular", lr_min=1e-4, lr_step_size=2))
    assert t.warnings == [] and t.schedule_description == ""   # set by a run, present before one
    result = t.run(tmp_path / "run")
    ends_high = [w for w in result.warnings if "not on the low point" in w]
    assert ends_high and result.warnings == t.warnings
    assert t.schedule_description.startswith("triangular 0.0001 -> ")
    start = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["warnings"] == result.warnings
    assert f"LR = {t.schedule_description}" in start["summary"]
