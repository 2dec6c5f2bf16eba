"""SDXL end to end on a tiny SDXL pipeline built from config (two CLIP encoders, 32 and 48 wide, so a swap
of the halves changes shapes and fails): loading, conditioning, training both vector sets, files other
tools read, resume, refusals."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_images
from embedtrain.config import ConfigError, TrainConfig, apply_preset
from embedtrain.embedding import EmbeddingError, load_embedding, save_embedding
from embedtrain.trainer import Trainer

from conftest import XL_WIDTHS

L, G = XL_WIDTHS


@pytest.fixture
def xl_cfg(tmp_path):
    data = make_images(tmp_path / "data", 6, size=40)
    cfg = TrainConfig(model="tiny-xl", data=str(data), name="zorblat", init_text="circle", steps=4, batch_size=2,
                      out=str(tmp_path / "out"), template="object", val_split=0.0)
    return apply_preset(cfg, explicit={"steps", "batch_size", "init_text", "template", "val_split"})


def test_an_sdxl_folder_loads_as_sdxl_with_both_widths(xl_folder):
    from embedtrain.models import load_pipeline, native_resolution
    pipe, info = load_pipeline(str(xl_folder))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert (info.family, info.token_dims, info.resolution) == ("SDXL", (L, G), 32)
    assert "tiny SDXL, token dims 32 + 48, 32 px" in info.describe()
    assert native_resolution(str(xl_folder)) == 32
    assert not any(p.requires_grad for m in (pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())


def test_conditioning_is_both_penultimate_states_joined_plus_the_pooled_output(xl_cfg):
    t = Trainer(xl_cfg)
    prompts = ["a photo of zorblat", "a red circle"]
    time_ids = torch.tensor([[40.0, 40.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    hidden, added = t.encode_prompts(prompts, time_ids)
    ids_l, ids_g = t.token_ids(prompts)
    with torch.no_grad():
        out_l = t.pipe.text_encoder(ids_l, output_hidden_states=True)
        out_g = t.pipe.text_encoder_2(ids_g, output_hidden_states=True)
    assert hidden.shape == (2, 77, L + G)
    torch.testing.assert_close(hidden[..., :L], out_l.hidden_states[-2])
    torch.testing.assert_close(hidden[..., L:], out_g.hidden_states[-2])
    torch.testing.assert_close(added["text_embeds"], out_g.text_embeds)
    assert added["time_ids"] is time_ids
    # diffusers' own SDXL prompt encoding agrees (no CFG, no clip skip)
    with torch.no_grad():
        ref, _, pooled, _ = t.pipe.encode_prompt([t.token.expand(p) for p in prompts], device="cpu",
                                                 do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, ref)
    torch.testing.assert_close(added["text_embeds"], pooled)


def test_micro_conditioning_is_each_images_real_size_and_crop(tmp_path, xl_cfg):
    from PIL import Image
    data = tmp_path / "sizes"
    data.mkdir()
    Image.new("RGB", (80, 40), "red").save(data / "wide.png")     # resized to 64x32, crop left 16
    Image.new("RGB", (40, 120), "blue").save(data / "tall.png")   # resized to 32x96, crop top 32
    t = Trainer(xl_cfg.replace(data=str(data), batch_size=1, flip=True))
    by_name = {s.path.name: s for s in t.train_samples}
    assert (by_name["wide.png"].size, by_name["wide.png"].crop) == ((80, 40), (0, 16))
    assert (by_name["tall.png"].size, by_name["tall.png"].crop) == ((40, 120), (32, 0))
    rows = {}
    for b in range(8):
        _, _, _, _, time_ids = t.batch_inputs(b)
        pos = b  # batch size 1, one process: batch b is stream slot b
        name = t.train_samples[t.stream[pos] % 2].path.name
        rows.setdefault(name, set()).add(tuple(time_ids[0].tolist()))
    # (orig h, orig w, crop top, crop left, target h, target w); a mirrored wide image's crop is measured
    # from the other side (64 - 32 - 16 = 16: the center crop is symmetric)
    assert rows["wide.png"] <= {(40.0, 80.0, 0.0, 16.0, 32.0, 32.0)}
    assert rows["tall.png"] <= {(120.0, 40.0, 32.0, 0.0, 32.0, 32.0)}


def test_training_moves_both_vector_sets_and_writes_clip_l_clip_g(xl_cfg, tmp_path):
    t = Trainer(xl_cfg.replace(save_formats="safetensors,diffusers"))
    start = t.token.saved()
    assert {k: tuple(v.shape) for k, v in start.items()} == {"clip_l": (1, L), "clip_g": (1, G)}
    start = {k: v.detach().clone() for k, v in start.items()}
    result = t.run(tmp_path / "run")
    assert result.status == "finished"
    end = t.token.saved()
    assert all(not torch.allclose(end[k], start[k]) for k in start)
    # the file other tools read: clip_l [n, 768-like] and clip_g [n, 1280-like], our metadata beside
    emb = load_embedding(tmp_path / "run" / "zorblat.safetensors")
    assert emb.format == "sdxl" and emb.meta["model_family"] == "SDXL" and emb.meta["train_encoders"] == "both"
    torch.testing.assert_close(emb.vectors, end["clip_l"].detach())
    torch.testing.assert_close(emb.vectors_g, end["clip_g"].detach())
    names = sorted(p.relative_to(tmp_path / "run").as_posix() for p in result.files)
    assert names == ["diffusers/clip_g/zorblat.safetensors", "diffusers/clip_l/zorblat.safetensors",
                     "zorblat.safetensors"]


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_train_encoders_trains_one_half_and_keeps_the_other(xl_cfg, tmp_path, which):
    t = Trainer(xl_cfg.replace(train_encoders=which))
    other = "clip_g" if which == "clip_l" else "clip_l"
    start = {k: v.detach().clone() for k, v in t.token.saved().items()}
    assert t.token.vectors.shape == (1, L if which == "clip_l" else G)   # only the trained half is a parameter
    t.run(tmp_path / "run")
    end = t.token.saved()
    assert not torch.allclose(end[which], start[which])
    assert torch.equal(end[other], start[other])


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_planted_vectors_are_found_through_each_encoder(xl_cfg, which):
    """Targets made with a known (planted) vector; from the init vectors, descending the loss brings the
    trained half closer to the planted one. A broken gradient path through that encoder (its hidden states
    or the pooled output not reaching the UNet) leaves the distance where it started."""
    t = Trainer(xl_cfg.replace(batch_size=4, train_encoders=which))
    latents, noise, ts, prompts, time_ids = t.batch_inputs(0)
    noisy = t.noise_scheduler.add_noise(latents, noise, ts)
    v = t.token.vectors
    g = torch.Generator().manual_seed(1)
    planted = v.detach() + torch.randn(v.shape, generator=g) * v.detach().std()
    with torch.no_grad():
        v.copy_(planted)
        hidden, added = t.encode_prompts(prompts, time_ids)
        target = t.unet(noisy, ts, hidden, added_cond_kwargs=added).sample
        v.copy_(t.init_vectors)
    before = float((v.detach() - planted).norm())
    opt = torch.optim.Adam([v], lr=2e-3)
    for _ in range(150):
        hidden, added = t.encode_prompts(prompts, time_ids)
        loss = torch.nn.functional.mse_loss(t.unet(noisy, ts, hidden, added_cond_kwargs=added).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = float((v.detach() - planted).norm())
    assert after < 0.8 * before, (before, after)


def test_the_file_loads_in_diffusers_sdxl_pipeline_for_both_encoders(xl_cfg, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from embedtrain.demo.model import build_sdxl_pipeline
    t = Trainer(xl_cfg.replace(save_formats="safetensors,diffusers"))
    run = tmp_path / "run"
    t.run(run)
    pipe = build_sdxl_pipeline("tiny")
    assert isinstance(pipe, StableDiffusionXLPipeline)

    def draw(prompt):
        return pipe(prompt, num_inference_steps=3, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    plain = draw("a photo of zorblat")
    # the README's two calls: the default file's halves, each into its encoder
    state = load_file(run / "zorblat.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="zorblat", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="zorblat", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for enc, tok, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"), (pipe.text_encoder_2, pipe.tokenizer_2,
                                                                          "clip_g")):
        row = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("zorblat")]
        torch.testing.assert_close(row.detach(), t.token.saved()[key][0].detach())
    assert abs(draw("a photo of zorblat") - plain).max() > 1e-3   # the token changes the image
    # the diffusers-format files are paths load_textual_inversion takes, one per encoder
    pipe2 = build_sdxl_pipeline("tiny")
    pipe2.load_textual_inversion(str(run / "diffusers/clip_l/zorblat.safetensors"), text_encoder=pipe2.text_encoder,
                                 tokenizer=pipe2.tokenizer)
    pipe2.load_textual_inversion(str(run / "diffusers/clip_g/zorblat.safetensors"),
                                 text_encoder=pipe2.text_encoder_2, tokenizer=pipe2.tokenizer_2)
    row = pipe2.text_encoder_2.get_input_embeddings().weight[pipe2.tokenizer_2.convert_tokens_to_ids("zorblat")]
    torch.testing.assert_close(row.detach(), state["clip_g"][0])


def test_a_resumed_sdxl_run_equals_an_uninterrupted_one(xl_cfg, tmp_path):
    cfg = xl_cfg.replace(steps=6, save_every=3)
    whole = Trainer(cfg).run(tmp_path / "whole")
    stops = iter([False, False, True])
    part = Trainer(cfg).run(tmp_path / "part", stop=lambda: next(stops, False))
    assert part.status == "stopped" and part.updates == 3
    resumed = Trainer(cfg).run(tmp_path / "part", resume=True)
    assert resumed.status == "finished" and resumed.updates == 6
    a, b = load_embedding(whole.files[0]), load_embedding(resumed.files[0])
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.vectors_g, b.vectors_g)


def test_wrong_family_files_are_refused_in_one_line(xl_cfg, tmp_path, tiny_cfg):
    sd_file = save_embedding(tmp_path / "sdemb.safetensors", torch.randn(2, 32), "sdemb")
    xl_file = save_embedding(tmp_path / "xlemb.safetensors", {"clip_l": torch.randn(2, L), "clip_g": torch.randn(2, G)},
                             "xlemb")
    with pytest.raises(EmbeddingError) as e:
        Trainer(xl_cfg.replace(init_embedding=str(sd_file)))
    assert "is an SD" in str(e.value) and "model tiny-xl is SDXL" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EmbeddingError) as e:
        Trainer(tiny_cfg.replace(init_embedding=str(xl_file)))
    assert "is an SDXL embedding (clip_l + clip_g); model tiny is" in str(e.value)
    with pytest.raises(ConfigError, match="a1111"):
        Trainer(xl_cfg.replace(save_formats="safetensors,a1111"))
    with pytest.raises(EmbeddingError, match="train_encoders 'clip_g' applies to SDXL"):
        Trainer(tiny_cfg.replace(train_encoders="clip_g"))


def test_init_embedding_starts_from_the_files_vectors(xl_cfg, tmp_path):
    start = {"clip_l": torch.randn(3, L) * 0.02, "clip_g": torch.randn(3, G) * 0.02}
    path = save_embedding(tmp_path / "other.safetensors", start, "other")
    t = Trainer(xl_cfg.replace(init_embedding=str(path), vectors=1))
    got = t.token.saved()
    assert got["clip_l"].shape == (3, L)   # the count is the file's
    torch.testing.assert_close(got["clip_l"].detach(), start["clip_l"])
    torch.testing.assert_close(got["clip_g"].detach(), start["clip_g"])
    assert t.metadata(0, 0, None, None)["init_embedding"] == "other.safetensors"


def test_the_grid_renders_an_sdxl_file_and_refuses_an_sd_one(xl_cfg, tmp_path):
    from embedtrain.grid import GridError, GridSettings, render_grid
    from embedtrain.models import load_pipeline
    t = Trainer(xl_cfg)
    t.run(tmp_path / "run")
    pipe, info = load_pipeline("tiny-xl")
    result = render_grid(pipe, info, [tmp_path / "run" / "zorblat.safetensors"],
                         GridSettings(prompts=["a photo of [name]"], seeds=[1], sample_steps=2, cfg_scale=5.0))
    assert len(result.images) == 1 and result.images[0].size == (32, 32)
    sd_file = save_embedding(tmp_path / "sdemb.safetensors", torch.randn(1, 32), "sdemb")
    with pytest.raises(GridError, match="is an SD"):
        render_grid(pipe, info, [sd_file], GridSettings(prompts=["a photo of [name]"], seeds=[1], sample_steps=2))


def test_the_cli_trains_an_sdxl_folder(xl_folder, tmp_path):
    data = make_images(tmp_path / "data", 4, size=40)
    proc = subprocess.run([sys.executable, "-m", "embedtrain", "train", "--model", str(xl_folder), "--data", str(data),
                           "--name", "zorblat", "--init-text", "circle", "--steps", "2", "--out", str(tmp_path / "o"),
                           "--run-name", "r"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tiny SDXL, token dims 32 + 48, 32 px" in proc.stdout
    emb = load_embedding(tmp_path / "o" / "r" / "zorblat.safetensors")
    assert emb.vectors.shape == (1, L) and emb.vectors_g.shape == (1, G)
    assert json.loads((tmp_path / "o" / "r" / "config.json").read_text())["resolution"] == 32


def test_scoring_takes_both_halves_on_sdxl_and_refuses_them_on_sd(tmp_path):
    from embedtrain.demo.model import build_pipeline, build_sdxl_pipeline
    from embedtrain.demo.score import load_embedding_into
    xl_file = save_embedding(tmp_path / "xlemb.safetensors", {"clip_l": torch.randn(2, L), "clip_g": torch.randn(2, G)},
                             "xlemb")
    pipe = build_sdxl_pipeline("tiny")
    token, expand = load_embedding_into(pipe, xl_file)
    ids = pipe.tokenizer_2(expand("a xlemb"), add_special_tokens=False).input_ids
    rows = pipe.text_encoder_2.get_input_embeddings()(torch.tensor(ids))[-2:]
    torch.testing.assert_close(rows, load_embedding(xl_file).vectors_g)   # clip_g went into encoder 2
    with pytest.raises(EmbeddingError, match="is an SDXL embedding"):
        load_embedding_into(build_pipeline("tiny"), xl_file)
