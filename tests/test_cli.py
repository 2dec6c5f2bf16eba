"""The training CLI end to end, in real subprocesses: one process, and a 2-process torchrun (gloo) run."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--model", "tiny", "--name", "zorblat", "--init-text", "circle", "--template", "object", "--lr", "5e-3"]


def run(cmd, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def vectors(path: Path):
    from safetensors.torch import load_file
    return next(iter(load_file(path).values()))


@pytest.mark.slow
def test_cli_writes_the_run_folder(images, tmp_path):
    out = tmp_path / "out"
    r = run([sys.executable, "-m", "embedtrain", "train", *ARGS, "--data", str(images), "--steps", "6",
             "--batch-size", "2", "--val-split", "0.25", "--val-every", "3", "--save-every", "3",
             "--preview-every", "6", "--out", str(out), "--run-name", "r"])
    assert r.returncode == 0, r.stderr
    assert "Running training" in r.stdout and "full-cycle" in r.stdout
    run_dir = out / "r"
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "log.csv", "events.jsonl", "zorblat.safetensors", "zorblat-3.safetensors"} <= names
    assert (run_dir / "previews" / "zorblat-6.png").is_file()
    rows = list(csv.DictReader(open(run_dir / "log.csv")))
    assert [int(r["update"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"update", "batch", "epoch", "images_seen", "loss", "val_loss", "lr"} <= set(rows[0])
    assert rows[2]["val_loss"] and rows[5]["val_loss"] and not rows[0]["val_loss"]
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 2


def test_cli_bad_input_is_a_clear_error_not_a_traceback(images, tmp_path):
    r = run([sys.executable, "-m", "embedtrain", "train", *ARGS, "--data", str(tmp_path / "nope"),
             "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data" in r.stderr and "nope" in r.stderr
    r = run([sys.executable, "-m", "embedtrain", "train", *ARGS, "--data", str(images), "--grad-accum", "0",
             "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and "grad_accum must be >= 1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is installed with torch")
def test_torchrun_two_processes_match_one_process_of_twice_the_batch(images, tmp_path):
    """2 processes x BS 2 see the same 4 images per update as 1 process x BS 4: gradients are averaged
    across processes, so the vectors must agree to float tolerance, and both processes must hold the same."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    common = [*ARGS, "--data", str(images), "--steps", "5", "--out", str(tmp_path)]
    two = run([torchrun, "--nproc_per_node", "2", "--standalone", "-m", "embedtrain", "train", *common,
               "--batch-size", "2", "--out", str(tmp_path / "auto")])  # default run name: the ranks must agree
    assert two.returncode == 0, two.stderr[-3000:]
    (run_two,) = list((tmp_path / "auto").iterdir())
    run_two.rename(tmp_path / "two")
    one = run([sys.executable, "-m", "embedtrain", "train", *common, "--batch-size", "4", "--run-name", "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    events = [json.loads(line) for line in open(tmp_path / "two" / "events.jsonl")]
    procs = [e for e in events if e["event"] == "processes"]
    assert procs and procs[0]["world"] == 2 and procs[0]["identical"] is True
    assert "processes = 2" in events[0]["summary"]
    a, b = vectors(tmp_path / "one" / "zorblat.safetensors"), vectors(tmp_path / "two" / "zorblat.safetensors")
    assert (a - vectors_init(tmp_path)).abs().max() > 1e-3  # it trained
    assert (a - b).abs().max() < 1e-5
    rows_one = list(csv.DictReader(open(tmp_path / "one" / "log.csv")))
    rows_two = list(csv.DictReader(open(tmp_path / "two" / "log.csv")))
    assert [r["images_seen"] for r in rows_one] == [r["images_seen"] for r in rows_two]
    assert [r["epoch"] for r in rows_one] == [r["epoch"] for r in rows_two]
    for x, y in zip(rows_one, rows_two):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-4)


def vectors_init(tmp_path):
    """The init vectors of the same token on the same model ("circle"), to show the run moved them."""
    from embedtrain import embedding, models
    pipe, _ = models.load_pipeline("tiny")
    tok = embedding.add_embedding(pipe.tokenizer, pipe.text_encoder, "zorblat", init_text="circle", num_vectors=1)
    return tok.vectors.detach()
