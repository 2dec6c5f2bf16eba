"""Embedding files: every format round-trips, loading is safe, names are checked."""

import pickle

import pytest
import torch

from embedtrain.embedding import (EmbeddingError, add_embedding, check_name, load_embedding, save_embedding)


@pytest.fixture(scope="module")
def vec():
    torch.manual_seed(0)
    return torch.randn(3, 32)


@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("a1111", ".pt"),
                                        ("diffusers", ".learned_embeds.safetensors")])
def test_every_format_round_trips(tmp_path, vec, fmt, suffix):
    path = save_embedding(tmp_path / f"zorb{suffix}", vec, "zorb", {"updates": 12, "batch_size": 4}, fmt)
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors, vec)
    assert loaded.name == "zorb"
    if fmt == "safetensors":
        assert loaded.meta["batch_size"] == "4" and loaded.meta["updates"] == "12"


def test_a1111_pt_layout(tmp_path, vec):
    save_embedding(tmp_path / "x.pt", vec, "x", {"updates": 7}, "a1111")
    data = torch.load(tmp_path / "x.pt", weights_only=True)
    assert set(data) >= {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                         "sd_checkpoint_name"}
    assert torch.equal(data["string_to_param"]["*"], vec) and data["step"] == 7


def test_sdxl_and_plain_diffusers_bin_are_read(tmp_path, vec):
    from safetensors.torch import save_file
    save_file({"clip_l": vec, "clip_g": torch.zeros(3, 64)}, str(tmp_path / "xl.safetensors"))
    xl = load_embedding(tmp_path / "xl.safetensors")
    assert xl.format == "sdxl" and xl.vectors_g.shape == (3, 64)
    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")
    b = load_embedding(tmp_path / "learned_embeds.bin")
    assert b.name == "cat-toy" and b.vectors.shape == (1, 32)


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/embedtrain-pwned-marker",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    import os
    marker = "/tmp/embedtrain-pwned-marker"
    if os.path.exists(marker):
        os.unlink(marker)
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"string_to_param": {"*": Evil()}}, fh)
    with pytest.raises(EmbeddingError, match="refused"):
        load_embedding(tmp_path / "evil.pt")
    assert not os.path.exists(marker)


def test_truncated_and_lying_safetensors_are_clear_errors(tmp_path, vec):
    path = save_embedding(tmp_path / "ok.safetensors", vec, "ok")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(EmbeddingError, match="trunc.safetensors"):
        load_embedding(tmp_path / "trunc.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(EmbeddingError, match="header"):
        load_embedding(tmp_path / "huge.safetensors")


def test_wrong_vector_size_for_the_model_names_the_embedding():
    from embedtrain.models import load_pipeline
    pipe, _ = load_pipeline("tiny")
    with pytest.raises(EmbeddingError, match="another model family"):
        add_embedding(pipe.tokenizer, pipe.text_encoder, "wide", torch.zeros(2, 768))


@pytest.mark.parametrize("bad", ["", "   ", "../x", "/etc/passwd", "a" * 65, "con", "a/b", ".hidden", "x..y"])
def test_bad_names_are_refused(bad):
    with pytest.raises(EmbeddingError, match="name"):
        check_name(bad)


def test_unicode_names_are_fine():
    assert check_name("étoile_violette") == "étoile_violette"


def test_names_that_differ_by_case_get_their_own_tokens(vec):
    from embedtrain.models import load_pipeline
    pipe, _ = load_pipeline("tiny")
    sets = [add_embedding(pipe.tokenizer, pipe.text_encoder, n, vec) for n in ("gaST", "gast", "GAST", "GAst")]
    prompts = [s.expand(f"a photo of {s.name}") for s in sets]
    assert len(set(prompts)) == 4
    ids = [pipe.tokenizer(p).input_ids for p in prompts]
    assert len({tuple(i) for i in ids}) == 4


def test_default_output_loads_in_diffusers_load_textual_inversion(tmp_path):
    from embedtrain.models import load_pipeline
    pipe, _ = load_pipeline("tiny")
    dim = pipe.text_encoder.config.hidden_size
    vectors = torch.randn(2, dim)
    path = save_embedding(tmp_path / "zorb.safetensors", vectors, "zorb", {"updates": 3})
    pipe.load_textual_inversion(str(path), token="<zorb>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<zorb>", "<zorb>_1"])
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids].detach(), vectors)
