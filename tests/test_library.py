"""embedtrain.library: the models and embeddings of an A1111 or ComfyUI install (the web UI's --models-dir),
on fake trees: real tiny single-file checkpoints and diffusers folders, header-only files of the standard
sizes, a LoRA, embeddings."""

import json
import struct

import pytest

from embedtrain import checkpoints as C
from embedtrain import library


def fake_header(path, shapes: dict):
    """A .safetensors whose header names tensors of the given shapes (no data: detect reads no weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {k: {"dtype": "F16", "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


UNET_IN = {C.UNET + "input_blocks.0.0.weight": (320, 4, 3, 3)}
SDXL = {**UNET_IN, C.XL_TE1 + "embeddings.token_embedding.weight": (49408, 768),
        C.XL_TE2 + "token_embedding.weight": (49408, 1280)}
SD15 = {**UNET_IN, C.SD1_TE + "embeddings.token_embedding.weight": (49408, 768)}
SD21 = {**UNET_IN, C.SD2_TE + "token_embedding.weight": (49408, 1024)}
LORA = {"lora_unet_x.lora_down.weight": (4, 8), "lora_unet_x.alpha": ()}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny SD single file, a tiny SDXL single file and a tiny SD diffusers folder, written once."""
    from embedtrain.demo.model import build_pipeline, build_sdxl_pipeline
    root = tmp_path_factory.mktemp("tinymodels")
    sd = build_pipeline("tiny")
    C.write_single_file(sd, root / "tiny_sd.safetensors")
    C.write_single_file(build_sdxl_pipeline("tiny"), root / "tiny_xl.safetensors")
    sd.save_pretrained(root / "tiny_diffusers")
    return root


def embedding(path, dim=768):
    from safetensors.numpy import save_file
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": np.zeros((2, dim), dtype=np.float32)}, str(path))
    return path


def a1111_tree(root, tiny_files):
    import shutil
    ckpts = root / "models" / "Stable-diffusion"
    fake_header(ckpts / "sd_xl_base_1.0.safetensors", SDXL)
    fake_header(ckpts / "v1-5-pruned-emaonly.safetensors", SD15)
    fake_header(ckpts / "anime" / "v2-1_768-ema-pruned.safetensors", SD21)   # a subfolder, as A1111 allows
    fake_header(ckpts / "a" / "b" / "c" / "too_deep.safetensors", SD15)     # below MAX_DEPTH: not looked at
    shutil.copy(tiny_files / "tiny_sd.safetensors", ckpts / "tiny_sd.safetensors")
    shutil.copytree(tiny_files / "tiny_diffusers", ckpts / "tiny_diffusers")
    fake_header(ckpts / "notes.txt", {})                                      # not a model file: ignored
    fake_header(root / "models" / "Lora" / "style.safetensors", LORA)       # not a models folder: not looked at
    fake_header(ckpts / "stray_lora.safetensors", LORA)                     # in the models folder: skipped
    embedding(root / "embeddings" / "goodstyle.safetensors")
    embedding(root / "embeddings" / "sub" / "other.safetensors")
    (root / "embeddings" / "readme.txt").write_text("not an embedding")
    return root


def test_a1111_tree(tmp_path, tiny_files):
    root = a1111_tree(tmp_path / "webui", tiny_files)
    lib = library.scan([root])
    labels = dict((v, k) for k, v in lib.choices())
    ckpts = root / "models" / "Stable-diffusion"
    assert labels == {
        str(ckpts / "anime" / "v2-1_768-ema-pruned.safetensors"): "v2-1_768-ema-pruned · SD 2.x v-prediction",
        str(ckpts / "sd_xl_base_1.0.safetensors"): "sd_xl_base_1.0 · SDXL",
        str(ckpts / "tiny_diffusers"): "tiny_diffusers · SD · diffusers",
        str(ckpts / "tiny_sd.safetensors"): "tiny_sd · tiny SD",
        str(ckpts / "v1-5-pruned-emaonly.safetensors"): "v1-5-pruned-emaonly · SD 1.x",
    }
    assert [m.name for m in lib.models][:2] == ["v2-1_768-ema-pruned", "sd_xl_base_1.0"]   # folder order, sorted
    [skipped] = lib.skipped
    assert skipped.path == str(ckpts / "stray_lora.safetensors") and skipped.reason == "a LoRA, not a model"
    assert lib.embedding_dirs == [root / "embeddings"]
    assert sorted(p.name for p in lib.embeddings) == ["goodstyle.safetensors", "other.safetensors"]
    summary = lib.summary()
    assert summary.startswith("5 models found, 2 embedding files; skipped 1: stray_lora.safetensors (a LoRA")
    # the install's models folder given instead of the install: the same checkpoints (A1111's embeddings
    # folder is beside it, so none)
    assert [m.path for m in library.scan([root / "models"]).models] == [m.path for m in lib.models]
    # given twice (or as the install and a folder inside it): each model once
    assert len(library.scan([root, root, ckpts]).models) == 5


def test_comfyui_tree_and_plain_folder(tmp_path, tiny_files):
    import shutil
    root = tmp_path / "ComfyUI"
    fake_header(root / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors", SDXL)
    shutil.copy(tiny_files / "tiny_xl.safetensors", root / "models" / "checkpoints" / "tiny_xl.safetensors")
    shutil.copytree(tiny_files / "tiny_diffusers", root / "models" / "diffusers" / "my_sd")
    fake_header(root / "models" / "loras" / "x.safetensors", LORA)
    embedding(root / "models" / "embeddings" / "comfy_emb.safetensors", 1280)
    lib = library.scan([str(root)])
    assert [m.label for m in lib.models] == ["sd_xl_base_1.0 · SDXL", "tiny_xl · tiny SDXL", "my_sd · SD · diffusers"]
    assert lib.skipped == [] and lib.embedding_dirs == [root / "models" / "embeddings"]
    assert [p.name for p in lib.embeddings] == ["comfy_emb.safetensors"]
    # a plain folder of checkpoints (none of the conventional subfolders), one of them a LoRA
    plain = tmp_path / "my_checkpoints"
    fake_header(plain / "sd15.safetensors", SD15)
    fake_header(plain / "lora.safetensors", LORA)
    fake_header(plain / "embedding.safetensors", {"emb_params": (2, 768)})
    lib = library.scan([plain])
    assert [m.label for m in lib.models] == ["sd15 · SD 1.x"]
    assert sorted((s.path.rsplit("/", 1)[-1], s.reason) for s in lib.skipped) == [
        ("embedding.safetensors", "an embedding, not a model"), ("lora.safetensors", "a LoRA, not a model")]
    assert library.scan([tmp_path / "missing"]).models == []


def test_bounded_count_and_no_symlinked_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(library, "MAX_ENTRIES", 3)
    plain = tmp_path / "many"
    for i in range(6):
        fake_header(plain / f"m{i}.safetensors", SD15)
    (tmp_path / "elsewhere").mkdir()
    fake_header(tmp_path / "elsewhere" / "far.safetensors", SD15)
    lib = library.scan([plain])
    assert [m.name for m in lib.models] == ["m0", "m1", "m2"] and lib.truncated == [plain]
    assert "only the first 3 entries" in lib.summary()
    monkeypatch.setattr(library, "MAX_ENTRIES", 100)
    (plain / "link").symlink_to(tmp_path / "elsewhere")
    assert "far" not in [m.name for m in library.scan([plain]).models]


def test_ckpt_listed_without_torch_until_read(tmp_path):
    """A .ckpt is read through torch: with read_ckpt=False (the web server before its page is served) it is
    listed unread, and once a scan has read it the cached label is used."""
    import torch
    folder = tmp_path / "ckpts"
    folder.mkdir()
    sd = {k: torch.zeros(s) for k, s in SD15.items()}
    torch.save({"state_dict": sd}, folder / "old_model.ckpt")
    [m] = library.scan([folder], read_ckpt=False).models
    assert m.label == "old_model.ckpt · architecture not read yet (reload the page)" and m.arch == ""
    assert library.scan([folder]).models[0].label == "old_model · SD 1.x"
    assert library.scan([folder], read_ckpt=False).models[0].label == "old_model · SD 1.x"   # cached


def test_inside():
    assert library.inside("/a/b/c.pt", ["/x", "/a/b"]) and not library.inside("/a/bc/d.pt", ["/a/b"])
