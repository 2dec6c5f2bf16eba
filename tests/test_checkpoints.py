"""Single-file checkpoints in the original (A1111/ComfyUI/civitai) layout: detection from the header, loading
offline, the one-line refusals. Fast tier: tiny SD 1.x / SD 2.x-layout / SDXL models written by
checkpoints.write_single_file and checked against the original weights and against diffusers' own
converters (an independent reading of the same layout). Slow tier: SD 1.5, SD 2.1-v and SDXL base at full
size with random weights, loaded with no model config."""

from __future__ import annotations

import gc
import json
import struct
import time

import pytest
import torch

from embedtrain import ASSETS
from embedtrain import checkpoints as C
from embedtrain.checkpoints import ModelError

QUIET = pytest.mark.filterwarnings("ignore")


def same_weights(a, b, cast=None):
    """Names of the weights of module `a` that differ in `b` (after `cast` of a's, e.g. to fp16 and back)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    cast = cast or (lambda t: t)
    return [k for k in sa if not torch.equal(cast(sa[k]) if sa[k].is_floating_point() else sa[k], sb[k])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SD and SDXL pipelines, saved as diffusers folders (the model configs) once per module."""
    from embedtrain.demo.model import build_pipeline, build_sdxl_pipeline
    root = tmp_path_factory.mktemp("tiny")
    sd, xl = build_pipeline("tiny"), build_sdxl_pipeline("tiny")
    sd.save_pretrained(root / "sd")
    xl.save_pretrained(root / "xl")
    return dict(sd=sd, xl=xl, sd_dir=root / "sd", xl_dir=root / "xl", root=root)


COMPONENTS = {"sd": ("unet", "vae", "text_encoder"), "xl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_tiny_round_trip(tiny, tmp_path, kind):
    pipe = tiny[kind]
    path = C.write_single_file(pipe, tmp_path / f"{kind}.safetensors")
    info = C.detect(path)
    assert info["arch"] == ("tiny SD" if kind == "sd" else "tiny SDXL")
    assert info["family"] == ("SD" if kind == "sd" else "SDXL")
    assert info["token_dims"] == ((32,) if kind == "sd" else (32, 48))
    assert (info["dtype"], info["ema"], info["format"], info["prediction"]) == ("fp32", False, "safetensors", "epsilon")
    loaded = C.load_single_file(path, str(tiny[f"{kind}_dir"]))
    assert type(loaded).__name__ == type(pipe).__name__
    for name in COMPONENTS[kind]:
        assert same_weights(getattr(pipe, name), getattr(loaded, name)) == [], name
        assert not getattr(loaded, name).training
        assert not any(p.requires_grad for p in getattr(loaded, name).parameters())
    assert torch.equal(loaded.text_encoder.embeddings.position_ids, torch.arange(77)[None])
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], loaded.text_encoder(ids)[0])


def test_original_keys_are_the_released_names():
    """Full-size standard configs (built on the meta device, nothing allocated) map to key names that released
    SD 1.5 / SDXL files carry."""
    expect = {
        "SD 1.x": ["model.diffusion_model.time_embed.0.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
                   "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                   "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                   "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                   "model.diffusion_model.output_blocks.2.1.conv.weight",
                   "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.out.2.bias",
                   "first_stage_model.encoder.mid.attn_1.q.weight",
                   "first_stage_model.decoder.up.3.upsample.conv.weight",
                   "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
                   "first_stage_model.post_quant_conv.bias",
                   "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"],
        "SDXL": ["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                 "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
                 "model.diffusion_model.output_blocks.2.2.conv.weight",
                 "model.diffusion_model.output_blocks.5.2.conv.weight",
                 "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                 "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                 "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding"],
    }
    for arch, names in expect.items():
        configs = C.standard_configs(arch, 1024 if arch == "SDXL" else 512, "epsilon")
        family = "SDXL" if arch == "SDXL" else "SD"
        models = C._build(configs, family)
        keys = {o for o, _, _ in C._rows("unet", models["unet"], "", configs["unet"])}
        keys |= {o for o, _, _ in C._rows("vae", models["vae"], "", configs["vae"])}
        for (component, prefix), m in zip(C._te_layouts(arch, {}), models["text_encoders"]):
            keys |= {o for o, _, _ in C._rows(component, m, prefix)}
        assert [n for n in names if n not in keys] == [], arch


@pytest.mark.parametrize("arch", ["SD 1.x", "SD 2.x", "SDXL"])
def test_full_size_mapping_agrees_with_diffusers_converter(arch):
    """Each original key, tagged with its index, lands where diffusers' own converter puts it (UNet, VAE)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    configs = C.standard_configs(arch, 768 if arch == "SD 2.x" else 512, "epsilon")
    models = C._build(configs, "SDXL" if arch == "SDXL" else "SD")
    for component, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        module = models[component]
        rows = C._rows(component, module, "", configs[component])
        tagged = {o: torch.tensor([float(i)]) for i, (o, _, _) in enumerate(rows)}
        out = convert(dict(tagged), dict(module.config))
        assert set(out) == set(module.state_dict())
        assert [ds[0] for i, (_, ds, _) in enumerate(rows) if out[ds[0]].flatten()[0].item() != i] == []


@QUIET
def test_written_files_read_by_diffusers(tiny, tmp_path):
    """diffusers' own single-file loader reads the writer's layout to the same weights (SD and SDXL)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    for kind, cls in (("sd", StableDiffusionPipeline), ("xl", StableDiffusionXLPipeline)):
        path = C.write_single_file(tiny[kind], tmp_path / f"{kind}.safetensors")
        theirs = cls.from_single_file(str(path), config=str(tiny[f"{kind}_dir"]), local_files_only=True)
        for name in COMPONENTS[kind]:
            assert same_weights(getattr(tiny[kind], name), getattr(theirs, name)) == [], (kind, name)


def test_sd2_openclip_layout(tiny, tmp_path):
    """An SD 2.x-layout encoder (OpenCLIP, fused q/k/v, one more layer than used) loads into CLIPTextModel."""
    pipe = tiny["sd"]
    path = C.write_single_file(pipe, tmp_path / "sd2-768-v.safetensors", layout="SD 2.x")
    raw, _ = C.read_header(path)
    assert C.SD2_TE + "transformer.resblocks.0.attn.in_proj_weight" in raw
    assert C.SD2_TE + "transformer.resblocks.1.ln_1.weight" in raw   # the tiny encoder has 1 layer: 1 extra
    info = C.detect(path)
    assert (info["arch"], info["prediction"], info["resolution"]) == ("tiny SD", "v_prediction", 0)
    loaded = C.load_single_file(path, str(tiny["sd_dir"]))
    assert same_weights(pipe.text_encoder, loaded.text_encoder) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_file_loads_as_fp32(tiny, tmp_path, dtype):
    path = C.write_single_file(tiny["xl"], tmp_path / "half.safetensors", dtype=dtype)
    assert C.detect(path)["dtype"] == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    loaded = C.load_single_file(path, str(tiny["xl_dir"]))
    for name in COMPONENTS["xl"]:
        module = getattr(loaded, name)
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert same_weights(getattr(tiny["xl"], name), module, lambda t: t.to(dtype).float()) == [], name


def test_ema_file_and_ckpt(tiny, tmp_path):
    """A non-pruned file (EMA copies beside the weights) loads its non-EMA weights; a .ckpt loads through
    torch.load(weights_only=True), the {"state_dict": ...} wrapper taken off."""
    path = C.write_single_file(tiny["sd"], tmp_path / "full.ckpt", ema=True)
    info = C.detect(path)
    assert (info["ema"], info["format"]) == (True, "ckpt")
    loaded = C.load_single_file(path, str(tiny["sd_dir"]))
    for name in COMPONENTS["sd"]:
        assert same_weights(getattr(tiny["sd"], name), getattr(loaded, name)) == [], name


def test_ckpt_with_python_objects_is_refused(tiny, tmp_path):
    import argparse
    path = tmp_path / "pickled.ckpt"   # as training scripts save their hyper-parameters
    torch.save({"state_dict": C.original_state_dict(tiny["sd"]), "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ModelError, match="weights_only") as e:
        C.load_single_file(path, str(tiny["sd_dir"]))
    assert "\n" not in str(e.value)


def write_tensors(path, tensors: dict):
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("keys, what", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "a LoRA"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 8)}, "a LoRA"),
    ({"emb_params": (2, 768)}, "an embedding"),
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "an embedding"),
])
def test_lora_or_embedding_as_model(tmp_path, keys, what):
    path = write_tensors(tmp_path / "thing.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
    for call in (C.detect, C.load_single_file):
        with pytest.raises(ModelError, match=f"is {what}, not a model") as e:
            call(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a1111_embedding_ckpt_refused(tmp_path):
    path = tmp_path / "emb.ckpt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "x", "step": 3}, path)
    with pytest.raises(ModelError, match="is an embedding, not a model"):
        C.detect(path)


def fake_header(path, shapes: dict, metadata: dict | None = None):
    """A .safetensors whose header names tensors of the given shapes (no data: detect reads no weights)."""
    header = {k: {"dtype": "F16", "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


SD2_KEYS = {C.UNET + "input_blocks.0.0.weight": (320, 4, 3, 3), C.SD2_TE + "token_embedding.weight": (49408, 1024)}


@pytest.mark.parametrize("name, side, meta, arg, want", [
    ("v2-1_768-ema-pruned.safetensors", None, None, "", ("v_prediction", 768)),
    ("v2-1_512-ema-pruned.safetensors", None, None, "", ("epsilon", 512)),
    ("sd21-base-finetune.safetensors", None, None, "", ("epsilon", 512)),
    ("mymodel.safetensors", 'model:\n  params:\n    parameterization: "v"\n', None, "", ("v_prediction", 768)),
    ("my768model.safetensors", "model:\n  params:\n    linear_start: 0.00085\n", None, "", ("epsilon", 512)),
    ("mymodel.safetensors", None, {"modelspec.prediction_type": "epsilon"}, "", ("epsilon", 512)),
    ("v2-1_768.safetensors", None, None, "epsilon", ("epsilon", 512)),
])
def test_sd2_prediction_rule(tmp_path, name, side, meta, arg, want):
    path = fake_header(tmp_path / name, SD2_KEYS, meta)
    if side:
        path.with_suffix(".yaml").write_text(side)
    info = C.detect(path, prediction=arg)
    assert (info["arch"], info["family"], info["token_dims"]) == ("SD 2.x", "SD", (1024,))
    assert (info["prediction"], info["resolution"]) == want


def test_detect_standard_architectures_from_header(tmp_path):
    sd1 = fake_header(tmp_path / "sd15.safetensors", {C.UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                                                      C.SD1_TE + "embeddings.token_embedding.weight": (49408, 768)})
    assert C.detect(sd1) == dict(arch="SD 1.x", family="SD", token_dims=(768,), resolution=512, prediction="epsilon",
                                 dtype="fp16", ema=False, format="safetensors")
    old = fake_header(tmp_path / "old.safetensors", {C.UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                                                     "cond_stage_model.transformer.embeddings.token_embedding.weight":
                                                     (49408, 768)})
    assert C.detect(old)["arch"] == "SD 1.x"
    xl = fake_header(tmp_path / "xl.safetensors", {C.UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                                                   C.XL_TE1 + "embeddings.token_embedding.weight": (49408, 768),
                                                   C.XL_TE2 + "token_embedding.weight": (49408, 1280), "v_pred": (0,)})
    info = C.detect(xl)
    assert (info["arch"], info["token_dims"], info["resolution"], info["prediction"]) == \
        ("SDXL", (768, 1280), 1024, "v_prediction")


@pytest.mark.parametrize("shapes, message", [
    ({C.UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    ({C.UNET + "input_blocks.0.0.weight": (384, 4, 3, 3),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "SDXL refiner"),
    ({"some.other.weight": (3,)}, "not a Stable Diffusion checkpoint"),
    ({C.UNET + "input_blocks.0.0.weight": (320, 4, 3, 3)}, "no text encoder"),
])
def test_other_files_refused(tmp_path, shapes, message):
    with pytest.raises(ModelError, match=message) as e:
        C.detect(fake_header(tmp_path / "x.safetensors", shapes))
    assert "\n" not in str(e.value)


def test_bad_files_one_line(tmp_path, tiny):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    (tmp_path / "model.bin").write_bytes(b"")
    for path, message in ((tmp_path / "junk.safetensors", "not a valid .safetensors"),
                          (tmp_path / "junk.ckpt", "not a readable PyTorch .ckpt"),
                          (tmp_path / "model.bin", "must be a .safetensors or .ckpt"),
                          (tmp_path / "missing.safetensors", "not found")):
        with pytest.raises(ModelError, match=message) as e:
            C.load_single_file(path)
        assert "\n" not in str(e.value)
    tiny_file = C.write_single_file(tiny["sd"], tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError, match="non-standard SD model .*give --model-config"):
        C.load_single_file(tiny_file)
    # another architecture's config (the demo model's)
    with pytest.raises(ModelError, match="lacks .* of model config .*demo_model") as e:
        C.load_single_file(tiny_file, str(ASSETS / "demo_model"))
    assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated.safetensors"
    sd = C.original_state_dict(tiny["sd"])
    sd.pop(C.UNET + "out.2.weight")
    write_tensors(truncated, sd)
    with pytest.raises(ModelError, match="lacks 'model.diffusion_model.out.2.weight'"):
        C.load_single_file(truncated, str(tiny["sd_dir"]))


def test_truncated_or_reshaped_file(tiny, tmp_path):
    path = C.write_single_file(tiny["sd"], tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])   # an interrupted download: the header is whole, the data is not
    with pytest.raises(ModelError, match="shorter than its header says") as e:
        C.load_single_file(path, str(tiny["sd_dir"]))
    assert "\n" not in str(e.value)
    sd = C.original_state_dict(tiny["sd"])
    sd[C.UNET + "input_blocks.0.0.weight"] = torch.zeros(3, 4, 3, 3)
    with pytest.raises(ModelError, match=r"'model.diffusion_model.input_blocks.0.0.weight' has shape \[3, 4, 3, 3\]"):
        C.load_single_file(write_tensors(tmp_path / "odd.safetensors", sd), str(tiny["sd_dir"]))


def test_tokenizer_missing_names_what_to_get(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "_hub_vocab", lambda: None)
    monkeypatch.setattr(C, "_bpe_file", lambda: None)
    with pytest.raises(ModelError, match="pip install --no-deps open-clip-torch") as e:
        C.clip_tokenizer_folder()
    assert "\n" not in str(e.value)


def test_vocab_from_bpe_file_layout(tmp_path):
    """CLIP's vocabulary order from a BPE file: 256 bytes, the same with </w>, the merges, the two specials."""
    import gzip
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as fh:
        fh.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\nc a\nca t</w>\nd o\n")
    vocab, merges = C.vocab_from_bpe(bpe)
    assert merges == ["c a", "ca t</w>", "d o"]
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["ca"] == 512 and vocab["cat</w>"] == 513
    assert vocab["<|startoftext|>"] == 515 and vocab["<|endoftext|>"] == 516 and len(vocab) == 517
    assert len(set(C.clip_byte_chars())) == 256


def real_vocab_available() -> bool:
    return C._hub_vocab() is not None or C._bpe_file() is not None


@pytest.mark.skipif(not real_vocab_available(), reason="no CLIP vocabulary on this machine (pip install --no-deps "
                    "open-clip-torch, or openai/clip-vit-large-patch14 in the Hugging Face cache)")
def test_real_clip_tokenizer(tmp_path, monkeypatch):
    from transformers import CLIPTokenizer
    monkeypatch.setenv("EMBEDTRAIN_CACHE", str(tmp_path))
    tok = CLIPTokenizer.from_pretrained(str(C.clip_tokenizer_folder()))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    bang = CLIPTokenizer.from_pretrained(str(C.clip_tokenizer_folder("!")))
    assert bang("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


# ---------------------------------------------------------------------------------------------------------
# Slow: the standard architectures at full size, random weights, no model config.

def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), GiB; 0 where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def random_full_size(arch: str, resolution: int, prediction: str):
    """A pipeline of a standard architecture with random fp16 weights (memory: 2 bytes a weight), built on the
    meta device and given storage, so that no fp32 copy and no slow init happen."""
    from types import SimpleNamespace
    configs = C.standard_configs(arch, resolution, prediction)
    models = C._build(configs, "SDXL" if arch == "SDXL" else "SD")
    gen = torch.Generator().manual_seed(0)
    for module in [models["unet"], models["vae"], *models["text_encoders"]]:
        module.to(torch.float16).to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02, generator=gen)
    encoders = models["text_encoders"]
    return SimpleNamespace(unet=models["unet"], vae=models["vae"], text_encoder=encoders[0],
                           text_encoder_2=encoders[1] if len(encoders) > 1 else None)


SAMPLES = {"unet": ["conv_in.weight", "mid_block.attentions.0.proj_in.weight", "up_blocks.1.upsamplers.0.conv.weight"],
           "vae": ["decoder.up_blocks.0.upsamplers.0.conv.weight", "encoder.mid_block.attentions.0.to_q.weight"],
           "text_encoder": ["embeddings.token_embedding.weight", "encoder.layers.5.self_attn.k_proj.weight"],
           "text_encoder_2": ["text_model.encoder.layers.31.self_attn.v_proj.weight", "text_projection.weight"]}


@pytest.mark.slow
@pytest.mark.parametrize("arch, name, want", [
    ("SD 1.x", "v1-5-pruned-emaonly.safetensors", dict(arch="SD 1.x", resolution=512, prediction="epsilon")),
    ("SD 2.x", "v2-1_768-ema-pruned.safetensors", dict(arch="SD 2.x", resolution=768, prediction="v_prediction")),
    ("SDXL", "sd_xl_base_1.0.safetensors", dict(arch="SDXL", resolution=1024, prediction="epsilon")),
])
def test_full_size_offline_no_config(tmp_path, monkeypatch, arch, name, want):
    from embedtrain.demo.model import write_tokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    pipe = random_full_size(arch, want["resolution"], want["prediction"])
    path = C.write_single_file(pipe, tmp_path / name)
    kept = {(c, k): getattr(pipe, c).state_dict()[k].float().clone()
            for c, ks in SAMPLES.items() if getattr(pipe, c, None) is not None for k in ks}
    written_rss = rss_gib("VmHWM")
    del pipe
    gc.collect()
    t1 = time.perf_counter()
    info = C.detect(path)
    assert {k: info[k] for k in want} == want and info["dtype"] == "fp16"
    # Without a real CLIP vocabulary on this machine, a small tokenizer folder stands in (the weights load the same)
    tokenizer = None if real_vocab_available() else str(write_tokenizer(tmp_path / "tok"))
    loaded = C.load_single_file(path, tokenizer=tokenizer)
    t2 = time.perf_counter()
    print(f"\n{arch}: build+write {t1 - t0:.1f} s (peak RSS {written_rss:.1f} GiB), load {t2 - t1:.1f} s, file "
          f"{path.stat().st_size / 2**30:.2f} GiB, RSS after load {rss_gib():.1f} GiB, peak {rss_gib('VmHWM'):.1f} GiB")
    assert type(loaded).__name__ == ("StableDiffusionXLPipeline" if arch == "SDXL" else "StableDiffusionPipeline")
    assert loaded.scheduler.config.prediction_type == want["prediction"]
    assert loaded.unet.config.sample_size * loaded.vae_scale_factor == want["resolution"]
    for (c, k), v in kept.items():
        assert torch.equal(getattr(loaded, c).state_dict()[k], v), (c, k)
    assert loaded.text_encoder.config.hidden_size == (1024 if arch == "SD 2.x" else 768)
    # and it trains: one weight update of the full-size architecture (at 64 px, to stay a few seconds on a CPU)
    from conftest import make_images
    from embedtrain.config import TrainConfig
    from embedtrain.models import _info
    from embedtrain.trainer import Trainer
    cfg = TrainConfig(model=str(path), data=str(make_images(tmp_path / "data", 2, size=64)), name="fullsizetok",
                      init_text="a", resolution=64, steps=1, batch_size=1, out=str(tmp_path))
    trainer = Trainer(cfg, pipe=loaded, info=_info(loaded, str(path), path.stem), log=lambda *a: None)
    start = trainer.token.vectors.detach().clone()
    result = trainer.run(tmp_path / "run")
    assert result.status == "finished" and result.updates == 1
    assert not torch.equal(trainer.token.vectors.detach(), start)
    print(f"  one update at 64 px: {time.perf_counter() - t2:.1f} s, peak RSS {rss_gib('VmHWM'):.1f} GiB")
