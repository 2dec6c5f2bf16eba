"""The shipped demo model (assets/demo_model): it loads offline, draws the world, and textual inversion
learns the held-out concept's attributes from its images.

Two of issue 7's targets are NOT met by the model shipped now (pretrained for 246 minutes on a 2-core
CPU; see its README.md): seen combinations shape + colour 0.70 of 96 (target 0.85), and the default
textual-inversion run reaches concept fidelity 0.63 / editability 0.38 at 32 seeds per prompt
(targets 0.7 / 0.5), up from 0.0 for the init text. Those targets stay here as strict xfails with the
measured numbers: when a better model lands they start passing, strict mode fails the suite, and the
marks must come off.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "assets" / "demo_model"
DEMO_DATA = ROOT / "assets" / "demo_dataset"


def _need_demo():
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("the pretrained demo model is not in assets/demo_model")
    pytest.importorskip("embedtrain.trainer")


@pytest.fixture(scope="module")
def seen():
    _need_demo()
    from embedtrain.demo.score import load_demo_pipeline, seen_agreement
    return seen_agreement(load_demo_pipeline("demo"), n=24, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default run on the demo dataset (the model preset, no other flags), and the scores."""
    _need_demo()
    from embedtrain.config import TrainConfig, apply_preset
    from embedtrain.demo.score import fidelity, load_demo_pipeline, load_embedding_into
    from embedtrain.trainer import train
    tmp = tmp_path_factory.mktemp("demo-ti")
    cfg = apply_preset(TrainConfig(model="demo", data=str(DEMO_DATA), name="pstar", out=str(tmp),
                                   preview_every=0, val_every=0), explicit={"preview_every", "val_every"})
    result = train(cfg.validate(), run_dir=tmp / "run", log=lambda *a, **k: None)
    emb = tmp / "run" / "pstar.safetensors"
    assert emb.is_file(), result
    pipe = load_demo_pipeline("demo")
    base = fidelity(pipe, "star", n=4)
    token, expand = load_embedding_into(pipe, emb)
    # 32 seeds per prompt, as the model card measures: at 8 this embedding reads 0.84 / 0.50 with seeds 0-7
    # and 0.31 / 0.34 with seeds 100-107 (the seed decides much of an image here)
    return base, fidelity(pipe, token, n=32, expand=expand)


@pytest.mark.slow
def test_demo_model_loads_offline_and_draws_the_prompted_shapes(seen):
    # measured: n=96 0.90; chance is 1/6
    assert seen["shape"] >= 0.6, seen


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 7 target not met: seen shape+colour 0.70 (target 0.85), background "
                                       "0.96 (n=96) on the CPU-pretrained model; colour binding plateaued near 0.70")
def test_demo_model_draws_seen_combinations(seen):
    assert seen["background"] >= 0.8, seen
    assert seen["shape_and_colour"] >= 0.85, seen


@pytest.mark.slow
def test_short_textual_inversion_run_learns_the_held_out_concept(trained):
    base, learned = trained
    assert base["concept_fidelity"] <= 0.3, base          # the init text alone does not draw purple stars
    # measured at n=32 (the card): 0.0 -> 0.63; a rise of 0.3 is far outside seed noise
    assert learned["concept_fidelity"] >= base["concept_fidelity"] + 0.3, (base, learned)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 7 target not met: after the default run concept fidelity 0.63 "
                                       "(target 0.7), editability 0.38 (target 0.5), 32 seeds; baseline 0.0")
def test_short_textual_inversion_run_reaches_the_targets(trained):
    _, learned = trained
    assert learned["concept_fidelity"] >= 0.7 and learned["editability"] >= 0.5, learned
