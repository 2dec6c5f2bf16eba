"""Textual inversion really learns on the demo model: fidelity rises well above the init-text baseline."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "assets" / "demo_model"
DEMO_DATA = ROOT / "assets" / "demo_dataset"


def _need_demo():
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("the pretrained demo model is not in assets/demo_model")
    pytest.importorskip("embedtrain.trainer")


@pytest.mark.slow
def test_demo_model_loads_offline_and_draws_seen_combinations():
    _need_demo()
    from embedtrain.demo.score import load_demo_pipeline, seen_agreement
    pipe = load_demo_pipeline("demo")
    seen = seen_agreement(pipe, n=24, seed=1)
    assert seen["background"] >= 0.8, seen
    assert seen["shape_and_colour"] >= 0.6, seen


@pytest.mark.slow
def test_short_textual_inversion_run_beats_the_init_text(tmp_path):
    _need_demo()
    from embedtrain.config import TrainConfig, apply_preset
    from embedtrain.demo.score import fidelity, load_demo_pipeline, load_embedding_into
    from embedtrain.trainer import train

    cfg = apply_preset(TrainConfig(model="demo", data=str(DEMO_DATA), name="pstar", out=str(tmp_path),
                                   preview_every=0, val_every=0), explicit={"preview_every", "val_every"})
    result = train(cfg.validate(), run_dir=tmp_path / "run", log=lambda *a, **k: None)
    emb = tmp_path / "run" / "pstar.safetensors"
    assert emb.is_file(), result

    pipe = load_demo_pipeline("demo")
    base = fidelity(pipe, "star", n=4)
    token, expand = load_embedding_into(pipe, emb)
    learned = fidelity(pipe, token, n=4, expand=expand)
    assert base["concept_fidelity"] <= 0.3, base
    assert learned["concept_fidelity"] >= base["concept_fidelity"] + 0.3, (base, learned)
