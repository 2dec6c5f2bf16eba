"""Faults: non-finite losses, kill -9 during a save, read-only or full storage, stops at awkward
moments and twice, crashed and repeated resumes. Nothing good is lost and the log says why."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from embedtrain.embedding import load_embedding

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    from conftest import make_images

    from embedtrain.config import TrainConfig, apply_preset
    data = make_images(tmp_path_factory.mktemp("faults") / "data", 8)
    cfg = TrainConfig(model="tiny", data=str(data), name="zorblat", init_text="circle", steps=8, batch_size=2,
                      lr=5e-3, lr_schedule="cosine", template="object", val_split=0.25, val_every=2)
    return apply_preset(cfg, explicit={"steps", "batch_size", "lr", "init_text", "template"})


@pytest.fixture(scope="module")
def trainer(base_cfg):
    """One model + latent cache for the in-process tests; each test resets the embedding and runs into
    its own folder (run() builds a fresh optimizer, and a resume reloads vectors and optimizer state)."""
    from embedtrain.trainer import Trainer
    return Trainer(base_cfg, log=lambda s: None)


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]


def vectors_by_update(t):
    """on_event callback that records the vectors after every weight update."""
    seen = {}

    def on_event(ev):
        if ev["event"] == "update":
            seen[ev["update"]] = t.token.vectors.detach().clone()
    return seen, on_event


# ---------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "nan_grad", "step_overflow"])
def test_non_finite_values_stop_the_run_and_keep_the_last_good_embedding(trainer, tmp_path, monkeypatch, poison):
    from embedtrain import optimizers
    from embedtrain.ui.jobs import read_run
    t = trainer
    t.reset_embedding()
    monkeypatch.setattr(t, "cfg", t.cfg.replace(save_every=2))
    real_loss, calls = t._loss, {"n": 0}

    def poisoned_loss(*a, **k):
        out = real_loss(*a, **k)
        if k.get("reduce", True):  # training batches, not validation
            calls["n"] += 1
            if calls["n"] == 4 and poison in ("nan_loss", "inf_loss"):
                return out * float("nan" if poison == "nan_loss" else "inf")
            if calls["n"] == 4 and poison == "nan_grad":  # the loss stays finite, its gradient does not
                hooks.append(t.token.vectors.register_hook(lambda g: g * float("nan")))
        return out
    hooks = []
    monkeypatch.setattr(t, "_loss", poisoned_loss)
    if poison == "step_overflow":  # the 4th optimizer step itself overflows (huge LR x gradient in fp16 ...)
        real_make = optimizers.make_optimizer

        def make(*a, **k):
            opt = real_make(*a, **k)
            real_step, steps = opt.step, {"n": 0}

            def step(*sa, **sk):
                out = real_step(*sa, **sk)
                steps["n"] += 1
                if steps["n"] == 4:
                    with torch.no_grad():
                        t.token.vectors.mul_(float("inf"))
                return out
            opt.step = step
            return opt
        monkeypatch.setattr(optimizers, "make_optimizer", make)
    seen, on_event = vectors_by_update(t)
    run = tmp_path / "run"
    try:
        result = t.run(run, on_event=on_event)
    finally:
        for h in hooks:
            h.remove()

    # a non-finite loss condemns the vectors that gave it (those after update 3): update 2's are kept;
    # a bad gradient or step condemns only itself: update 3's vectors are kept
    kept = 2 if poison in ("nan_loss", "inf_loss") else 3
    assert result.status == "failed" and result.updates == kept, result
    assert f"last good embedding (from update {kept})" in result.message
    why = {"nan_loss": "loss became nan at update 4", "inf_loss": "loss became inf at update 4",
           "nan_grad": "the gradient became NaN or infinite at update 4",
           "step_overflow": "weight update 4 made the vectors NaN or infinite"}[poison]
    assert why in result.message, result.message
    final = load_embedding(run / "zorblat.safetensors")
    assert torch.equal(final.vectors, seen[kept]) and torch.isfinite(final.vectors).all()
    assert final.meta["status"] == "failed" and final.meta["updates"] == str(kept)
    assert final.meta["batches"] == str(kept * 1) and float(final.meta["epochs"]) == pytest.approx(kept * 2 / 6, 1e-3)
    assert torch.equal(load_embedding(run / "zorblat-2.safetensors").vectors, seen[2])  # the snapshot is intact
    assert [int(r["update"]) for r in read_log(run)] == [1, 2, 3]
    last = events(run)[-1]
    assert last["event"] == "failed" and last["message"] == result.message
    status = read_run(run)  # what the web UI shows
    assert status.state == "failed" and "Lower the LR" in status.message


# ---------------------------------------------------------------- stops at awkward moments
@pytest.mark.parametrize("during", ["preview", "validation", "snapshot save", "final update"])
def test_a_stop_during_preview_validation_or_save_ends_cleanly(trainer, tmp_path, monkeypatch, during):
    from embedtrain import embedding
    t = trainer
    t.reset_embedding()
    monkeypatch.setattr(t, "cfg", t.cfg.replace(preview_every=1, preview_steps=2, save_every=1))
    asked = {"n": 0}

    def ask_on_second_call(real):
        calls = {"n": 0}

        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                asked["n"] += 1  # the stop arrives while this is running
            return real(*a, **k)
        return wrapped
    if during == "preview":
        monkeypatch.setattr(t, "preview", ask_on_second_call(t.preview))
    elif during == "validation":
        monkeypatch.setattr(t, "fixed_loss", ask_on_second_call(t.fixed_loss))  # val at updates 2, 4, ...
    elif during == "snapshot save":
        monkeypatch.setattr(embedding, "save_embedding", ask_on_second_call(embedding.save_embedding))
    run = tmp_path / "run"
    stop = (lambda: asked["n"] > 0) if during != "final update" else (lambda: True)
    result = t.run(run, stop=stop)
    expect = {"preview": 2, "validation": 4, "snapshot save": 2, "final update": 1}[during]
    assert result.status == "stopped" and result.updates == expect, result
    assert (run / "resume.pt").is_file()
    assert load_embedding(run / "zorblat.safetensors").meta["updates"] == str(expect)
    from PIL import Image
    for png in (run / "previews").glob("*.png"):
        with Image.open(png) as im:
            im.verify()  # every preview is a whole PNG
    assert not list(run.rglob("*.tmp"))
    assert events(run)[-1]["event"] == "stopped"


# ---------------------------------------------------------------- resume, twice
def test_resuming_twice_and_after_a_crash_matches_an_uninterrupted_run(trainer, tmp_path, monkeypatch):
    t = trainer
    monkeypatch.setattr(t, "cfg", t.cfg.replace(save_every=3))
    t.reset_embedding()
    t.run(tmp_path / "full")
    full = t.token.vectors.detach().clone()

    def stop_at(n):
        return lambda: len(read_log(run)) >= n

    # twice in a row: stopped at 3, resumed and stopped at 6, resumed to the end
    run = tmp_path / "twice"
    t.reset_embedding()
    assert t.run(run, stop=stop_at(3)).updates == 3
    t.reset_embedding()  # a resume must not depend on what is in memory
    assert t.run(run, resume=True, stop=stop_at(6)).updates == 6
    t.reset_embedding()
    assert t.run(run, resume=True).status == "finished"
    torch.testing.assert_close(t.token.vectors, full, rtol=0, atol=1e-6)

    # a resume that crashes half way (after writing log rows past its resume point), then another resume
    run = tmp_path / "crash"
    t.reset_embedding()
    t.run(run, stop=stop_at(3))
    real_loss, calls = t._loss, {"n": 0}

    def crash(*a, **k):
        if k.get("reduce", True):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")
        return real_loss(*a, **k)
    monkeypatch.setattr(t, "_loss", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.run(run, resume=True)
    assert len(read_log(run)) == 5  # rows 4 and 5 from the crashed attempt are on disk
    monkeypatch.setattr(t, "_loss", real_loss)
    t.reset_embedding()
    assert t.run(run, resume=True).status == "finished"
    torch.testing.assert_close(t.token.vectors, full, rtol=0, atol=1e-6)

    reference = read_log(tmp_path / "full")
    for name in ("twice", "crash"):
        rows = read_log(tmp_path / name)
        assert [r["update"] for r in rows] == [r["update"] for r in reference] == [str(i) for i in range(1, 9)]
        for a, b in zip(reference, rows):
            for col in ("batch", "epoch", "images_seen", "lr", "val_loss", "val_train_loss"):
                assert a[col] == b[col], (name, col, a, b)
            assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        meta = load_embedding(tmp_path / name / "zorblat.safetensors").meta
        ref = load_embedding(tmp_path / "full" / "zorblat.safetensors").meta
        assert {k: meta[k] for k in ("updates", "batches", "epochs", "status")} == \
            {k: ref[k] for k in ("updates", "batches", "epochs", "status")}
        assert not (tmp_path / name / "resume.pt").exists()
        assert [e["event"] for e in events(tmp_path / name)].count("done") == 1


def test_a_damaged_resume_state_is_a_clear_error(trainer, tmp_path):
    from embedtrain.config import ConfigError
    run = tmp_path / "run"
    trainer.reset_embedding()
    trainer.run(run, stop=lambda: True)
    raw = (run / "resume.pt").read_bytes()
    (run / "resume.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match="resume.pt is damaged"):
        trainer.run(run, resume=True)
    torch.save({"something": "else"}, run / "resume.pt")
    with pytest.raises(ConfigError, match="resume.pt is damaged"):
        trainer.run(run, resume=True)


# ---------------------------------------------------------------- kill -9 in the middle of a save
KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import safetensors.torch as st
    mode, ready, target, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    real_save, real_replace = st.save_file, os.replace

    def pause():
        ready.write_text("saving")
        time.sleep(600)

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if mode == "mid-write" and Path(filename).name.startswith("." + target + "."):
            with open(filename, "r+b") as fh:   # half of the bytes are on disk ...
                fh.truncate(os.path.getsize(filename) // 2)
            pause()                             # ... when the process is killed

    def replace(src, dst):
        if mode == "before-rename" and Path(dst).name == target:
            pause()                             # written and fsynced, not yet renamed
        return real_replace(src, dst)

    st.save_file, os.replace = save_file, replace
    from embedtrain.trainer import cli
    sys.exit(cli(argv))
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_kill_9_during_a_save_leaves_the_previous_embedding_intact(trainer, tmp_path, mode):
    """A stopped run (update 2) is resumed in a real training process, which is killed with SIGKILL
    in the middle of writing the final embedding. The previous file is byte-for-byte intact, and a
    further resume still finishes the run."""
    t = trainer
    run = tmp_path / "run"
    t.reset_embedding()
    t.run(run, stop=lambda: True)
    t.run(run, resume=True, stop=lambda: True)  # update 2 (resume state + final file at 2)
    before = (run / "zorblat.safetensors").read_bytes()
    before_resume = (run / "resume.pt").read_bytes()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, mode, str(ready), "zorblat.safetensors",
                             "--resume", str(run)], env=ENV, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    t0 = time.time()
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the training process ended before its save: {proc.stdout.read().decode()[-2000:]}")
        assert time.time() - t0 < 240, "the training process never reached its final save"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert list(run.glob(".zorblat.safetensors.*.tmp")), "the kill did not land inside the save"
    assert (run / "zorblat.safetensors").read_bytes() == before
    assert load_embedding(run / "zorblat.safetensors").meta["updates"] == "2"
    assert (run / "resume.pt").read_bytes() == before_resume
    t.reset_embedding()
    result = t.run(run, resume=True)  # the run can still be finished from its resume state
    assert result.status == "finished" and result.updates == 8
    assert not list(run.glob(".*.tmp")), "the resume removes the temp file the killed save left"
    assert load_embedding(run / "zorblat.safetensors").meta["updates"] == "8"


# ---------------------------------------------------------------- storage that cannot be written
def cli_args(cfg, **extra) -> list[str]:
    args = ["--model", "tiny", "--data", cfg.data, "--name", cfg.name, "--init-text", cfg.init_text,
            "--batch-size", str(cfg.batch_size), "--template", cfg.template]
    for k, v in extra.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def drop_root_powers() -> list[str]:
    """Root ignores directory permissions; without CAP_DAC_OVERRIDE (via setpriv) it obeys them."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@pytest.mark.slow
def test_read_only_outputs_are_a_clear_error_before_training(base_cfg, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        proc = subprocess.run([*drop_root_powers(), sys.executable, "-m", "embedtrain", "train",
                               *cli_args(base_cfg, out=locked / "outputs", steps=2)],
                              capture_output=True, text=True, timeout=300, env=ENV, cwd=str(ROOT))
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: out: cannot write the run folder" in proc.stderr and "Permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr and "Running training" not in proc.stdout  # refused before the work
    assert list(locked.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_mid_run_is_a_clear_error_and_keeps_earlier_files(trainer, base_cfg, tmp_path):
    """RLIMIT_FSIZE makes every write past 4 kB fail with EFBIG, as a full disk fails with ENOSPC: the
    resumed run dies on its first big write with a clear message; the earlier embedding and resume
    state are untouched and no temp file is left."""
    t = trainer
    run = tmp_path / "run"
    t.reset_embedding()
    t.run(run, stop=lambda: len(read_log(run)) >= 2)
    big = torch.randn(40, t.token.vectors.shape[1])  # 5 kB of vectors: over the limit
    from embedtrain.embedding import save_embedding
    save_embedding(run / "zorblat.safetensors", big, "zorblat", {"updates": 2})
    before = {p.name: p.read_bytes() for p in (run / "zorblat.safetensors", run / "resume.pt")}

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    proc = subprocess.run([sys.executable, "-m", "embedtrain", "train", "--resume", str(run), "--save-every", "1"],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=str(ROOT),
                          preexec_fn=limit)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "File too large" in proc.stderr and ("could not write" in proc.stderr or "cannot write" in proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert {p: (run / p).read_bytes() for p in before} == before
    assert not list(run.rglob("*.tmp"))


def test_a_failed_embedding_write_names_the_file_and_keeps_the_old_one(trainer, tmp_path, monkeypatch):
    import errno

    import safetensors.torch as st

    from embedtrain.embedding import EmbeddingError
    t = trainer
    monkeypatch.setattr(t, "cfg", t.cfg.replace(save_every=1))
    run = tmp_path / "run"
    t.reset_embedding()
    t.run(run, stop=lambda: len(read_log(run)) >= 2)  # zorblat-1, zorblat-2, zorblat.safetensors at update 2
    before = (run / "zorblat.safetensors").read_bytes()
    real = st.save_file

    def full_disk(tensors, filename, metadata=None):  # the disk fills up while the final file is written
        real(tensors, filename, metadata=metadata)
        if "zorblat.safetensors" in Path(filename).name:
            with open(filename, "r+b") as fh:
                fh.truncate(10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    monkeypatch.setattr(st, "save_file", full_disk)
    t.reset_embedding()
    with pytest.raises(EmbeddingError, match=r"could not write .*/zorblat\.safetensors: No space left on device"):
        t.run(run, resume=True)
    assert (run / "zorblat.safetensors").read_bytes() == before
    assert load_embedding(run / "zorblat-7.safetensors").meta["updates"] == "7"  # snapshots before it are whole
    assert not list(run.rglob("*.tmp"))


# ---------------------------------------------------------------- stopping twice
def wait_for_updates(run_dir: Path, n: int, proc, timeout=240):
    t0 = time.time()
    while True:
        f = run_dir / "events.jsonl"
        if f.exists() and f.read_text().count('"event": "update"') >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early with {proc.returncode}")
        assert time.time() - t0 < timeout, "the job never got going"
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_twice_aborts_cleanly_and_leaves_only_whole_files(base_cfg, tmp_path):
    run = tmp_path / "out" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "embedtrain", "train",
                             *cli_args(base_cfg, out=tmp_path / "out", run_name="run", steps=100000, save_every=1)],
                            env=ENV, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_updates(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode in (130, 0), (proc.returncode, err[-2000:])
    assert "aborted" in err if proc.returncode == 130 else "stopped" in out
    snaps = sorted(run.glob("zorblat-*.safetensors"))
    assert snaps and all(load_embedding(p).vectors.shape == (1, 32) for p in snaps)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_the_web_ui_stop_twice_stops_a_job_gracefully(base_cfg, tmp_path):
    """The Stop button pressed twice: a STOP file, then SIGTERM. The job finishes its update, writes
    its embedding and resume state and exits; the page then shows it as stopped."""
    from embedtrain.ui.jobs import JobManager
    jobs = JobManager(tmp_path / "outputs")
    run = jobs.start(base_cfg.replace(steps=100000, run_name="ui-run"))
    proc = jobs._proc
    wait_for_updates(run, 2, proc)
    first, second = jobs.stop(), jobs.stop()
    assert first.startswith("stopping") and "again" in second
    proc.wait(120)
    status = jobs.status()
    assert status.state == "stopped", (status.state, status.message)
    assert (run / "resume.pt").is_file() and load_embedding(run / "zorblat.safetensors").vectors.shape == (1, 32)
    assert "Traceback" not in (run / "job.log").read_text()
    assert not list(run.rglob("*.tmp"))
