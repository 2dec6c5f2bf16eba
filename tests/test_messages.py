"""What the command line says: help that tells the truth about presets, quiet libraries, rounded last lines,
one-line errors for unusable files, and progress for long scoring runs."""

import argparse
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo_model"


def run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "embedtrain", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def need_demo():
    if not (DEMO / "model_index.json").is_file():
        pytest.skip("assets/demo_model is not built")


# ---------------------------------------------------------------- --help and the model presets

def help_by_dest(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.help or "" for a in parser._actions}


def test_train_help_says_which_defaults_a_model_preset_changes():
    from dataclasses import fields

    from embedtrain.config import MODEL_PRESETS, TrainConfig, add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = help_by_dest(parser)
    preset_fields = {k for preset in MODEL_PRESETS.values() for k in preset}
    assert "preview_cfg" in preset_fields
    for f in fields(TrainConfig):
        text = helps[f.name]
        assert f"(default: {f.default!r}" in text
        if f.name in preset_fields:
            # generated from the presets: every model that sets the field, with its value
            for model, preset in MODEL_PRESETS.items():
                if f.name in preset:
                    assert f"{model} {preset[f.name]!r}" in text, (f.name, text)
            assert "model presets change it" in text
        else:
            assert "preset" not in text, (f.name, text)
    assert helps["preview_cfg"] == "CFG scale of a preview (default: 7.5; model presets change it: demo 5.0)"


def test_preset_notes_follow_the_preset_data(monkeypatch):
    from embedtrain import config
    monkeypatch.setitem(config.MODEL_PRESETS, "other", {"preview_cfg": 3.5, "seed": 7})
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    helps = help_by_dest(parser)
    assert "demo 5.0, other 3.5" in helps["preview_cfg"]
    assert helps["seed"].endswith("(default: 0; model presets change it: other 7)")


def test_train_help_prints_the_notes():
    r = run("train", "--help", timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "CFG scale of a preview (default: 7.5; model presets change it: demo 5.0)" in text


# ---------------------------------------------------------------- library noise

def test_quiet_libraries_filters_library_notices_but_not_ours(monkeypatch):
    from embedtrain.__main__ import quiet_libraries
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`torch_dtype` is deprecated and will be removed in version 1.0.0. Please use `dtype` "
                      "instead.", FutureWarning)
        warnings.warn("an embedtrain warning", UserWarning)
        warnings.warn("another library's future change", FutureWarning)
    assert [str(w.message) for w in caught] == ["an embedtrain warning", "another library's future change"]
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["DIFFUSERS_VERBOSITY"] == "error"


def test_quiet_libraries_keeps_a_verbosity_the_user_set(monkeypatch):
    from embedtrain.__main__ import quiet_libraries
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with warnings.catch_warnings():
        quiet_libraries()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_calc_and_help_do_not_import_torch():
    code = ("import sys; from embedtrain.__main__ import main; main(['calc', '--images', '4', '--batch-size', '2', "
            "'--steps', '3']); print('torch' in sys.modules, 'diffusers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False False", r.stdout + r.stderr


# ---------------------------------------------------------------- train: quiet start, rounded last line

@pytest.mark.slow
def test_train_output_is_quiet_and_its_last_line_rounded(tmp_path):
    need_demo()
    r = run("train", "--model", "demo", "--data", "assets/demo_dataset", "--name", "purplestar", "--steps", "2",
            "--val-split", "0.25", "--out", str(tmp_path), "--run-name", "v")
    assert r.returncode == 0, r.stderr[-2000:]
    for noise in ("torchvision", "torch_dtype", "FutureWarning", "Loading pipeline components", "Loading weights"):
        assert noise not in r.stdout + r.stderr, noise
    assert "Warning: only 3 validation images" in r.stdout          # our own warning still shows
    last = next(line for line in r.stdout.splitlines() if line.startswith("finished:"))
    m = re.fullmatch(r"finished: 2 updates, loss (\S+), validation loss (\S+)", last)
    assert m, last
    for number in m.groups():
        assert len(re.sub(r"e[-+]\d+$", "", number).lstrip("0.").replace(".", "")) <= 4, last
    r = run("train", "--model", "demo", "--data", "assets/demo_dataset", "--name", "purplestar", "--steps", "1",
            "--out", str(tmp_path), "--run-name", "n")
    assert r.returncode == 0, r.stderr[-2000:]
    last = next(line for line in r.stdout.splitlines() if line.startswith("finished:"))
    assert last.endswith(", no validation set") and "None" not in last, last


# ---------------------------------------------------------------- score: one-line errors, progress

class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("kind", ["pickle", "damaged", "missing"])
def test_score_names_an_unusable_embedding_in_one_line(kind, tmp_path, capsys):
    need_demo()
    from embedtrain.demo.score import cli
    path = tmp_path / {"pickle": "evil.pt", "damaged": "junk.safetensors", "missing": "gone.safetensors"}[kind]
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}, protocol=2))
    elif kind == "damaged":
        path.write_bytes(b"not a safetensors file at all")
    assert cli(["--model", "demo", "--embedding", str(path), "--n", "1"]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "rror" in line]   # (in-process: the loading bars show)
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(path) in errors[0], err
    assert "Traceback" not in err and "unpickled!" not in out + err and out == ""


def test_score_refuses_a_folder_that_is_not_a_demo_model(tmp_path, capsys):
    from embedtrain.demo.score import cli
    assert cli(["--evaluate-model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(tmp_path) in err
    assert cli(["--evaluate-model", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_score_reports_progress_on_stderr_and_scores_on_stdout(capsys):
    need_demo()
    from embedtrain.demo.score import cli
    assert cli(["--token", "star", "--n", "1"]) == 0
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == ["concept fidelity", "editability"]
    assert re.search(r"^score: 8/8 images \('star', 1 seeds per prompt\), \d+ s elapsed$", err, flags=re.M), err


@pytest.mark.slow
def test_evaluate_model_reports_every_batch(tmp_path):
    need_demo()
    from embedtrain.demo.score import Progress, evaluate_model
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder)
    stream = io.StringIO()
    evaluate_model(folder, n_seen=3, n=1, progress=Progress(stream), log=lambda m: None)
    lines = stream.getvalue().splitlines()
    counts = [line.split(" images")[0].split()[-1] for line in lines if " images" in line]
    assert counts == ["3/19", "11/19", "19/19"], lines
    assert "seen combinations" in lines[1] and "init text 'star'" in lines[2] and "the words" in lines[3], lines
