"""Model sources: a hub id (org/name) is loaded through the Hugging Face cache (offline here: the cache is
built in a temp HF_HOME from the demo model), and one that is neither cached nor reachable is one line
naming the id and the cache folder. Nothing here touches the network."""

import os
import shutil
import subprocess
import sys

from conftest import ROOT

REV = "0123456789abcdef0123456789abcdef01234567"


def hf_home_with(tmp_path, repo_id: str, model=ROOT / "assets" / "demo_model"):
    """An HF_HOME whose hub cache holds `model` (the demo model) as `repo_id` (the layout huggingface_hub
    writes)."""
    home = tmp_path / "hf"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / REV)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return home


def run(args, home, tmp_path):
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_a_hub_id_trains_from_the_cache_offline(tmp_path):
    home = hf_home_with(tmp_path, "embedtest/tiny-sd")
    r = run(["-m", "embedtrain", "train", "--model", "embedtest/tiny-sd", "--data", str(ROOT / "assets" / "demo_dataset"),
             "--name", "hubstar", "--init-text", "star", "--resolution", "64", "--steps", "2", "--run-name", "hub1",
             "--out", str(tmp_path / "out")], home, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "hub1" / "hubstar.safetensors").is_file()
    # the pre-start checks read the cached tokenizer: a word the model knows is refused before any job
    r = run(["-c", "from embedtrain.config import TrainConfig; from embedtrain.preflight import check_run; "
                   f"print(check_run(TrainConfig(model='embedtest/tiny-sd', data=r'{ROOT / 'assets' / 'demo_dataset'}', "
                   "name='star')))"], home, tmp_path)
    assert r.returncode == 0 and "already a word of the model's vocabulary" in r.stdout, r.stdout + r.stderr


def test_a_hub_id_neither_cached_nor_reachable_is_one_line(tmp_path):
    home = hf_home_with(tmp_path, "embedtest/tiny-sd")
    r = run(["-m", "embedtrain", "train", "--model", "embedtest/not-here", "--data",
             str(ROOT / "assets" / "demo_dataset"), "--name", "hubstar", "--steps", "2",
             "--out", str(tmp_path / "out")], home, tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "'embedtest/not-here' is not in the Hugging Face cache" in line and str(home / "hub") in line, line
    assert "HF_HUB_OFFLINE is set" in line


def test_an_sdxl_hub_id_loads_from_the_cache_as_sdxl(tmp_path, monkeypatch):
    from embedtrain.demo.model import build_sdxl_pipeline
    build_sdxl_pipeline("tiny").save_pretrained(tmp_path / "xl")
    home = hf_home_with(tmp_path, "embedtest/tiny-sdxl", tmp_path / "xl")
    r = run(["-c", "from embedtrain.models import load_pipeline, native_resolution; "
                   "p, info = load_pipeline('embedtest/tiny-sdxl'); print(type(p).__name__, info.describe()); "
                   "print('native', native_resolution('embedtest/tiny-sdxl'))"], home, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "StableDiffusionXLPipeline tiny-sdxl: tiny SDXL, token dims 32 + 48, 32 px" in r.stdout
    assert "native 32" in r.stdout   # read from the cached configs: the data is checked before the model loads


def test_single_file_checkpoints_train_offline(tmp_path):
    """A checkpoint in the original (A1111) layout, SD and SDXL: the demo model needs --model-config (its size is
    not a standard one), a tiny SDXL file too; both train from the command line with no network."""
    from embedtrain.checkpoints import write_single_file
    from embedtrain.demo.model import build_sdxl_pipeline
    from embedtrain.models import load_pipeline
    demo, _ = load_pipeline("demo")
    write_single_file(demo, tmp_path / "demo.safetensors")
    xl = build_sdxl_pipeline("tiny")
    xl.save_pretrained(tmp_path / "xl-config")
    write_single_file(xl, tmp_path / "xl.safetensors")
    home = tmp_path / "hf"
    for ckpt, config, name, res in (("demo.safetensors", ROOT / "assets" / "demo_model", "demostar", "64"),
                                    ("xl.safetensors", tmp_path / "xl-config", "xlstar", "32")):
        r = run(["-m", "embedtrain", "train", "--model", str(tmp_path / ckpt), "--model-config", str(config),
                 "--data", str(ROOT / "assets" / "demo_dataset"), "--name", name, "--init-text", "star",
                 "--resolution", res, "--steps", "2", "--run-name", name, "--out", str(tmp_path / "out")], home,
                tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / "out" / name / f"{name}.safetensors").is_file()
    assert "tiny SDXL, token dims 32 + 48" in r.stdout and "hash " in r.stdout


def test_preflight_reads_a_single_files_family_from_its_header(tmp_path):
    import torch

    from embedtrain.checkpoints import write_single_file
    from embedtrain.config import TrainConfig
    from embedtrain.demo.model import build_sdxl_pipeline
    from embedtrain.embedding import save_embedding
    from embedtrain.preflight import check_run, model_kind
    ckpt = write_single_file(build_sdxl_pipeline("tiny"), tmp_path / "xl.safetensors")
    kind = model_kind(str(ckpt))
    assert (kind.family, kind.dims) == ("SDXL", (32, 48))
    sd = save_embedding(tmp_path / "sdemb.safetensors", torch.randn(1, 32), "sdemb")
    problems = check_run(TrainConfig(model=str(ckpt), data=str(ROOT / "assets" / "demo_dataset"), name="xlstar",
                                     init_embedding=str(sd)))
    assert any(p.field == "init_embedding" and "SDXL" in str(p) for p in problems), problems
