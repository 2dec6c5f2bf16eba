"""Hardening II: deflate bombs in .pt files, size bounds on every size field, an LR that overflows the
optimizer, a run name that already exists, log.csv rewritten atomically on resume, one-line errors for
crafted files and settings, and names (auto run names that fit, Windows' COM¹).

"One line" everywhere means: a non-zero exit, one line on stderr that names the file or field and what
is valid, and no traceback."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from embedtrain.config import ConfigError, TrainConfig
from embedtrain.embedding import EmbeddingError, load_embedding, save_embedding

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
DIM = 32  # the tiny model's token width


def one_line_error(err: str, *words: str) -> str:
    """The one 'error:' line of a command's stderr, checked: no traceback, each of `words` in it."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def keep_signals():
    """trainer.cli installs SIGINT/SIGTERM handlers; an in-process call must not leave them behind."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# ====================================================================== 3. deflate bombs in .pt files
def torch_pkl(vec=None) -> tuple[bytes, bytes]:
    """data.pkl and version of a real torch.save of an A1111-style embedding (storage '0' = 32 floats)."""
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(1, DIM) if vec is None else vec}}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read("archive/data.pkl"), z.read("archive/version")


def deflate_bomb(path: Path, megabytes: int, method=zipfile.ZIP_DEFLATED) -> Path:
    """A torch zip whose tensor record data/0 is `megabytes` MB of zeros: deflated, ~1 kB per MB."""
    data_pkl, version = torch_pkl()
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/version", version)
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = method
        with z.open(info, "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(megabytes):
                fh.write(block)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return deflate_bomb(tmp_path_factory.mktemp("bomb") / "bomb.pt", 1024)


def test_the_deflate_bomb_is_real(bomb):
    # ~1 MB on disk, under the 64 MB file limit; its record really inflates to a gigabyte of zeros
    assert bomb.stat().st_size < 2 << 20
    with zipfile.ZipFile(bomb) as z:
        info = z.getinfo("archive/data/0")
        assert info.compress_type == zipfile.ZIP_DEFLATED and info.file_size == 1 << 30
        with z.open(info) as fh:
            assert fh.read(65 << 20) == b"\0" * (65 << 20)   # past every limit an embedding has


BOMB_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from embedtrain.embedding import EmbeddingError, load_embedding
    load_embedding(sys.argv[1])   # a real embedding first: the imports and torch's first use are not counted
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {}
    for path in sys.argv[2:]:
        base, t0 = rss_mb(), time.perf_counter()
        try:
            load_embedding(path)
            outcome = "loaded"
        except EmbeddingError as e:
            outcome = str(e)
        out[path] = [outcome, time.perf_counter() - t0, rss_mb() - base]
    print(json.dumps(out))
""")


def test_a_deflate_bomb_pt_is_refused_from_its_zip_directory_in_milliseconds(bomb, tmp_path):
    """Before: torch inflated the 1 GB record first (3.6 s, +1 GB RSS) and only then saw its size was wrong.
    Now the zip's central directory is read first: refused unread, in milliseconds and a few MB."""
    warm = save_embedding(tmp_path / "warm.pt", torch.ones(1, DIM), "warm", fmt="a1111")
    stored = deflate_bomb(tmp_path / "stored.pt", 65, zipfile.ZIP_STORED)   # 65 MB stored: over the file limit
    small = deflate_bomb(tmp_path / "small.pt", 9)   # 9 MB deflated: over the deflated-records limit
    files = [bomb, stored, small]
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(warm), *map(str, files)], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in files:
        message, seconds, extra_mb = results[str(path)]
        assert message.startswith(str(path)), message
        assert seconds < 0.25 and extra_mb < 8, (path.name, seconds, extra_mb)
    assert "unpacks to 1024.0 MB, deflated from" in results[str(bomb)][0] and "zip bomb" in results[str(bomb)][0]
    assert "too big for an embedding" in results[str(stored)][0]   # the file itself is over 64 MB
    assert "deflated records total at most 8 MB" in results[str(small)][0]


def raw_zip(entries: list[tuple[str, int, int, int]], count: int | None = None, lie_offset: int = 0) -> bytes:
    """A zip by hand: (name, method, packed size, unpacked size) per entry, data of `packed` zero bytes;
    the sizes in the directory may lie. `count` overrides the end record's entry count; `lie_offset` is
    added to every entry's offset in the directory."""
    out, central = io.BytesIO(), []
    for name, method, packed, plain in entries:
        offset = out.tell()
        raw = name.encode()
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, 0, packed, plain, len(raw), 0))
        out.write(raw + b"\0" * packed)
        central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, 0, packed,
                                   plain, len(raw), 0, 0, 0, 0, 0, offset + lie_offset) + raw)
    cd_offset = out.tell()
    cd = b"".join(central)
    n = len(entries) if count is None else count
    out.write(cd + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), cd_offset, 0))
    return out.getvalue()


@pytest.mark.parametrize("case,words", [
    ("lying_stored_size", "stored but claims"),
    ("bzip2", "compression method 12"),
    ("too_many_entries", "holds 300 entries"),
    ("count_beyond_directory", "entry is cut short"),
    ("entry_past_directory", "lies outside the file's data"),
    ("no_end_record", "without its end record"),
])
def test_crafted_zip_directories_are_refused_unread(tmp_path, monkeypatch, case, words):
    data_pkl, _ = torch_pkl()
    ok = [("archive/data.pkl", 0, len(data_pkl), len(data_pkl))]
    raw = {
        "lying_stored_size": lambda: raw_zip(ok + [("archive/data/0", 0, 128, 2 << 30)]),
        "bzip2": lambda: raw_zip(ok + [("archive/data/0", 12, 128, 128)]),
        "too_many_entries": lambda: raw_zip([(f"archive/data/{i}", 0, 0, 0) for i in range(300)]),
        "count_beyond_directory": lambda: raw_zip(ok, count=5),
        "entry_past_directory": lambda: raw_zip(ok, lie_offset=10 ** 6),
        "no_end_record": lambda: raw_zip(ok)[:-22],
    }[case]()
    path = tmp_path / f"{case}.pt"
    path.write_bytes(raw)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached a refused zip"))
    with pytest.raises(EmbeddingError, match=words) as err:
        load_embedding(path)
    assert path.name in str(err.value)


def test_torch_and_a1111_zip_files_still_pass_the_directory_check(tmp_path):
    vec = torch.randn(3, DIM)
    torch.save({"string_to_param": {"*": vec}, "name": "plain"}, tmp_path / "plain.pt")     # torch's own zip (zip64 end)
    save_embedding(tmp_path / "ours.pt", vec, "ours", fmt="a1111")                            # A1111's entries only
    data_pkl, version = torch_pkl(vec)
    storage = vec.numpy().tobytes()
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as z:          # deflated, small
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/version", version)
        z.writestr("archive/data/0", storage)
    for name in ("plain.pt", "ours.pt", "deflated.pt"):
        assert torch.equal(load_embedding(tmp_path / name).vectors, vec), name


# ====================================================================== 5. size fields have upper bounds
TOO_BIG = {
    "resolution": (8_000_000, "resolution must be 0 (the model's own) or a multiple of 8, >= 8 and <= 4096 pixels, got 8000000"),
    "batch_size": (10 ** 6, "batch_size must be >= 1 and <= 1024"),
    "grad_accum": (10 ** 6, "grad_accum must be >= 1 and <= 4096"),
    "steps": (10 ** 9, "steps must be >= 1 and <= 10000000"),
    "repeats": (10 ** 6, "repeats must be >= 1 and <= 1000"),
    "preview_steps": (10 ** 6, "preview_steps must be >= 1 and <= 1000"),
    "val_train_subset": (10 ** 7, "val_train_subset must be >= 0 (0 = off) and <= 100000 images"),
    "log_every": (10 ** 9, "log_every must be >= 1 and <= 10000000"),
    "val_every": (10 ** 9, "val_every must be >= 0 (0 = off) and <= 10000000"),
    "save_every": (10 ** 9, "save_every must be >= 0 (0 = off) and <= 10000000"),
    "preview_every": (10 ** 9, "preview_every must be >= 0 (0 = off) and <= 10000000"),
    "lr_warmup": (10 ** 9, "lr_warmup must be >= 0 and <= 10000000"),
    "lr_step_size": (10 ** 9, "lr_step_size must be >= 0 (0 = derive it) and <= 10000000"),
    "seed": (2 ** 64, "seed must be a whole number between -2**63 and 2**63-1"),
    "preview_seed": (-2, "preview_seed must be -1 (the run's seed)"),
    "lr": (1e5, "lr must be > 0 and <= 10000"),
    "lr_min": (1e5, "lr_min must be >= 0 and <= 10000"),
}


@pytest.mark.parametrize("field", sorted(TOO_BIG))
def test_every_size_field_has_an_upper_bound_named_in_the_message(tmp_path, field):
    value, says = TOO_BIG[field]
    cfg = TrainConfig(model="tiny", data=str(tmp_path), name="zorblat", **{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value).startswith(says), str(err.value)


def test_the_bounds_leave_real_settings_alone(tmp_path):
    TrainConfig(model="tiny", data=str(tmp_path), name="zorblat", resolution=4096, batch_size=1024, grad_accum=4096,
                steps=10_000_000, repeats=1000, preview_steps=1000, seed=2 ** 63 - 1, preview_seed=0,
                lr=1e4, lr_schedule="constant").validate()
    TrainConfig(model="tiny", data=str(tmp_path), name="zorblat", seed=-5, lr_schedule="piecewise",
                lr_piecewise="0.005:30, 1e4").validate()


def test_images_times_repeats_is_bounded_before_the_model_loads(tiny_cfg, monkeypatch):
    from embedtrain import config, models
    from embedtrain.trainer import Trainer
    monkeypatch.setattr(config, "MAX_EPOCH_IMAGES", 100)
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match=r"repeats: 8 images x 20 repeats = 160 images per epoch, over the 100"):
        Trainer(tiny_cfg.replace(repeats=20))


def test_a_huge_resolution_is_one_line_before_anything_loads(images, tmp_path, capsys, keep_signals, monkeypatch):
    from embedtrain import data
    from embedtrain.trainer import cli
    # before: the images were resized to 8000000 px squares (past 5 GB, then a MemoryError traceback)
    monkeypatch.setattr(data, "scan_folder", lambda *a, **k: pytest.fail("the images were read"))
    t0 = time.perf_counter()
    assert cli(["--model", "tiny", "--data", str(images), "--name", "zorblat", "--out", str(tmp_path / "out"),
                "--resolution", "8000000"]) == 2
    one_line_error(capsys.readouterr().err, "resolution", "<= 4096")
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "out").exists()


# ====================================================================== 6. an LR that overflows the optimizer
@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from conftest import make_images

    from embedtrain.config import apply_preset
    from embedtrain.trainer import Trainer
    data = make_images(tmp_path_factory.mktemp("hardening") / "data", 8)
    cfg = TrainConfig(model="tiny", data=str(data), name="zorblat", init_text="circle", steps=8, batch_size=2,
                      lr=5e-3, template="object", val_split=0.25, val_every=2)
    return Trainer(apply_preset(cfg, explicit={"steps", "batch_size", "lr", "init_text", "template"}),
                   log=lambda s: None)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_an_lr_that_overflows_the_step_keeps_the_last_good_embedding(trainer, tmp_path, monkeypatch, optimizer):
    """'0.005:5, 3.4e38': before, AdamW raised 'value cannot be converted to type float without overflow' at
    update 6 — a traceback, no embedding, no 'failed' event, the 5 good updates lost."""
    from embedtrain.schedules import build_schedule
    from embedtrain.ui.jobs import read_run
    t = trainer
    t.reset_embedding()
    monkeypatch.setattr(t, "cfg", t.cfg.replace(optimizer=optimizer, save_every=2))
    schedule = build_schedule("piecewise", 0.0, 8, piecewise="0.005:5, 3.4e38")   # the schedule builder allows it
    seen = {}
    result = t.run(tmp_path / "run", schedule=schedule,
                   on_event=lambda ev: ev["event"] == "update" and seen.update({ev["update"]: t.token.vectors.detach()
                                                                               .clone()}))
    assert result.status == "failed" and result.updates == 5, result
    assert "last good embedding (from update 5)" in result.message and "\n" not in result.message
    if optimizer == "adamw":   # torch raises inside the step
        assert "weight update 6 failed in the optimizer step at LR 3.4e+38 (the step overflowed float32" in \
            result.message, result.message
    else:                      # SGD's step stays finite; the next loss is NaN and condemns it (the NaN path)
        assert "loss became nan at update 7" in result.message, result.message
    final = load_embedding(tmp_path / "run" / "zorblat.safetensors")
    assert torch.equal(final.vectors, seen[5]) and final.meta["status"] == "failed" and final.meta["updates"] == "5"
    assert final.meta["batches"] == "5"
    last = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()][-1]
    assert last["event"] == "failed" and last["message"] == result.message
    assert read_run(tmp_path / "run").state == "failed"


def test_lr_and_piecewise_rates_past_the_bound_are_refused(tmp_path, images, capsys, keep_signals):
    base = dict(model="tiny", data=str(tmp_path), name="zorblat")
    with pytest.raises(ConfigError, match=r"^lr_piecewise part 2: rate 3.4e\+38 is above the highest accepted"):
        TrainConfig(**base, lr_schedule="piecewise", lr_piecewise="0.005:30, 3.4e38").validate()
    with pytest.raises(ConfigError, match=r"^lr must be > 0 and <= 10000, got 3e\+37"):
        TrainConfig(**base, lr=3e37).validate()
    from embedtrain.trainer import cli
    assert cli(["--model", "tiny", "--data", str(images), "--name", "zorblat", "--out", str(tmp_path / "out"),
                "--lr", "0.005:30, 3.4e38"]) == 2
    one_line_error(capsys.readouterr().err, "lr_piecewise part 2", "10000")


# ====================================================================== 10. a run name that exists already
ARGS = ["--model", "tiny", "--name", "zorblat", "--init-text", "circle", "--template", "object", "--steps", "2",
        "--batch-size", "2"]


@pytest.mark.slow
def test_the_cli_refuses_a_run_name_that_exists_and_points_at_resume(images, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, "-m", "embedtrain", "train", *ARGS, "--data", str(images), "--out",
                            str(out), "--run-name", "r", "--save-every", "1"], capture_output=True, text=True,
                           timeout=300, env=ENV, cwd=str(ROOT))
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "r").rglob("*") if p.is_file()}
    again = subprocess.run([sys.executable, "-m", "embedtrain", "train", *ARGS, "--data", str(images), "--out",
                            str(out), "--run-name", "r", "--steps", "3"], capture_output=True, text=True, timeout=300,
                           env=ENV, cwd=str(ROOT))
    assert again.returncode == 2
    one_line_error(again.stderr, f"{out / 'r'} already exists", "--run-name", "--resume")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "r").rglob("*") if p.is_file()}
    assert after == before   # nothing overwritten, nothing added


def test_an_existing_run_folder_is_refused_naming_the_way_back(tmp_path):
    from embedtrain.trainer import refuse_existing_run
    run = tmp_path / "r"
    refuse_existing_run(run)                      # absent: fine
    run.mkdir()
    refuse_existing_run(run)                      # empty: fine
    (run / "job.json").write_text("{}")           # what the web UI writes before it launches the run
    (run / "job.log").write_text("")
    refuse_existing_run(run)
    (run / "log.csv").write_text("update\n")
    with pytest.raises(ConfigError, match=r"no resume.pt \(it finished\)"):
        refuse_existing_run(run)
    (run / "resume.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        refuse_existing_run(run)
    assert str(err.value).startswith("run_name: ") and f"continue that run with --resume {run}" in str(err.value)


def test_lr_find_and_sweep_refuse_an_existing_run_name(images, tmp_path):
    from embedtrain.lr_finder import prepare
    argv = [*ARGS, "--data", str(images), "--out", str(tmp_path), "--run-name", "probe"]
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "job.log").write_text("")   # the web UI's launch: allowed
    prepare("lr-find", argv)
    (tmp_path / "probe" / "lr_find.json").write_text("{}")
    for command in ("lr-find", "sweep"):
        with pytest.raises(ConfigError, match="already exists and holds lr_find.json"):
            prepare(command, argv)


# ====================================================================== 11. log.csv rewritten atomically
def write_log(path: Path, n: int, cut_last: bool = False) -> bytes:
    from embedtrain.trainer import LOG_COLUMNS
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    w.writeheader()
    for u in range(1, n + 1):
        w.writerow(dict(update=u, batch=u, epoch=u / 8, images_seen=2 * u, loss=1.0 / u, val_loss="",
                        val_train_loss="", lr=0.005, effective_lr="", time_s=u / 10))
    text = buf.getvalue() + ("4001,40" if cut_last else "")   # a kill -9 in the middle of appending a row
    path.write_text(text, newline="")
    return path.read_bytes()


def test_a_resume_that_dies_while_rewriting_the_log_leaves_the_old_log_whole(tmp_path, monkeypatch):
    """Before: the log was reopened with 'w' and rewritten in place, so a kill or a full disk in the middle
    left a cut log (400k rows became 6.9k). Now the rewrite goes to a temp file that replaces the log."""
    from embedtrain import trainer as trainer_mod
    path = tmp_path / "log.csv"
    old = write_log(path, 4000)
    real = csv.DictWriter

    class Dying(real):
        def writerow(self, row):
            if row.get("update") == "1500":
                raise OSError(28, "No space left on device")
            return super().writerow(row)

    monkeypatch.setattr(trainer_mod.csv, "DictWriter", Dying)
    with pytest.raises(OSError):
        trainer_mod._CsvLog(path, enabled=True, keep_until=3000)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]   # no temp file left behind


def test_a_resumed_log_keeps_whole_rows_up_to_the_resume_point_and_appends(tmp_path):
    from embedtrain.trainer import _CsvLog
    path = tmp_path / "log.csv"
    write_log(path, 4000, cut_last=True)
    log = _CsvLog(path, enabled=True, keep_until=3000)
    log.write(dict(update=3001, batch=3001, epoch=1, images_seen=1, loss=0.5, val_loss="", val_train_loss="",
                   lr=0.005, effective_lr="", time_s=1))
    log.close()
    rows = list(csv.DictReader(open(path, newline="")))
    assert [int(r["update"]) for r in rows] == list(range(1, 3002))
    write_log(path, 10, cut_last=True)
    _CsvLog(path, enabled=True, keep_until=5000).close()   # the row a kill cut short is dropped, not kept as 40
    assert [int(r["update"]) for r in csv.DictReader(open(path, newline=""))] == list(range(1, 11))


# ====================================================================== 13. crafted files and settings: one line
def big_int_safetensors(path: Path) -> Path:
    raw = ('{"emb_params": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, ' + "9" * 5000 + "]}}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 128)
    return path


def deep_meta_pt(path: Path) -> Path:
    """A real torch zip whose 'name' is a list nested 200000 deep (str() of it overflows Python's stack)."""
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(1, DIM)}, "name": "PLACEHOLDERXYZ"}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X\x0e\x00\x00\x00PLACEHOLDERXYZ", b"]" * 200_001 + b"a" * 200_000)
            dst.writestr(info.filename, data)
    path.write_bytes(out.getvalue())
    return path


def test_crafted_embeddings_are_one_error_naming_the_file(tmp_path):
    for path, words in ((big_int_safetensors(tmp_path / "bigint.safetensors"), "not a valid safetensors file"),
                        (deep_meta_pt(tmp_path / "deep.pt"), "not a usable embedding file")):
        with pytest.raises(EmbeddingError, match=words) as err:
            load_embedding(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(EmbeddingError, match="is a folder"):
        load_embedding(tmp_path / "folder.pt")


def test_score_and_grid_refuse_crafted_embeddings_in_one_line_before_the_model_loads(tmp_path, capsys, bomb,
                                                                                    monkeypatch):
    from embedtrain import grid, models
    from embedtrain.demo import score
    monkeypatch.setattr(score, "load_demo_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "folder.safetensors").mkdir()
    files = [big_int_safetensors(tmp_path / "bigint.safetensors"), deep_meta_pt(tmp_path / "deep.pt"), bomb,
             tmp_path / "folder.safetensors"]
    for path in files:
        assert score.cli(["--embedding", str(path), "--n", "1"]) == 2
        one_line_error(capsys.readouterr().err, str(path))
        assert grid.cli_grid(["--model", "tiny", "--embeddings", str(path)]) == 2
        one_line_error(capsys.readouterr().err, str(path))


CRAFTED_RESUME = {
    # name: (change to a real state, words)
    "vectors_list": (lambda s: s.update(vectors=[[0.0] * DIM]), "vectors is a list"),
    "vectors_shape": (lambda s: s.update(vectors=torch.zeros(3, DIM)), "vectors have shape (3, 32)"),
    "vectors_nan": (lambda s: s["vectors"].fill_(float("nan")), "NaN"),
    "no_optimizer": (lambda s: s.pop("optimizer"), "(missing optimizer)"),
    "optimizer_keys": (lambda s: s.update(optimizer={"state": {}}), "lacks 'state' and one entry of 'param_groups'"),
    "optimizer_group": (lambda s: s["optimizer"]["param_groups"][0].update(params=[0, 1]), "does not fit"),
    "optimizer_shape": (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(5)), "exp_avg' has shape"),
    "update_text": (lambda s: s.update(update="3"), "are not the counts"),
    "negative": (lambda s: s.update(update=-1), "are not the counts"),
    "no_counts": (lambda s: s.clear() or s.update(x=1), "missing update, batch, vectors, optimizer"),
    "a_list": (lambda s: [s], "it holds a list, not a dict"),
    "deflate_bomb": ("deflate", "zip bomb"),
    "stored_100_mb": ("stored", "100 MB; a resume state is at most a few MB"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_RESUME))
def test_a_crafted_resume_state_is_one_config_error(trainer, tmp_path, case):
    change, words = CRAFTED_RESUME[case]
    run = tmp_path / "run"
    trainer.reset_embedding()
    trainer.run(run, stop=lambda: True)
    if isinstance(change, str):
        method = zipfile.ZIP_DEFLATED if change == "deflate" else zipfile.ZIP_STORED
        deflate_bomb(tmp_path / "b.pt", 100, method).replace(run / "resume.pt")
    else:
        state = torch.load(run / "resume.pt", weights_only=True)
        replaced = change(state)   # changes the state in place, or (a_list) returns what replaces it
        torch.save(replaced if isinstance(replaced, list) else state, run / "resume.pt")
    with pytest.raises(ConfigError) as err:
        trainer.run(run, resume=True)
    msg = str(err.value)
    assert msg.startswith(f"resume: {run / 'resume.pt'} is damaged") and words in msg and "\n" not in msg, msg


def test_the_train_cli_says_a_crafted_resume_state_in_one_line(trainer, tmp_path, capsys, keep_signals):
    from embedtrain.trainer import cli
    run = tmp_path / "run"
    trainer.reset_embedding()
    trainer.run(run, stop=lambda: True)
    state = torch.load(run / "resume.pt", weights_only=True)
    state["vectors"] = state["vectors"].tolist()
    torch.save(state, run / "resume.pt")
    assert cli(["--resume", str(run)]) == 2
    one_line_error(capsys.readouterr().err, "resume.pt", "vectors is a list")


SETTINGS_FILES = {
    # name: (file bytes or "dir", words in the one line)
    "bigint.json": (b'{"steps": ' + b"9" * 5000 + b"}", "holds a number Python refuses to read"),
    "deep.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "latin1.json": ('{"name": "café"}'.encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    "folder.json": ("dir", "is a folder; --config needs a settings JSON file"),
    "list.json": (b"[1, 2]", "must hold a JSON object"),
    "huge.json": (b" " * (2 << 20) + b"{}", "a settings JSON file is a few kB"),
}


@pytest.mark.parametrize("name", sorted(SETTINGS_FILES))
@pytest.mark.parametrize("command", ["train", "lr-find", "study"])
def test_a_bad_config_file_is_one_line(images, tmp_path, capsys, keep_signals, name, command):
    from embedtrain.__main__ import main
    content, words = SETTINGS_FILES[name]
    path = tmp_path / name
    path.mkdir() if content == "dir" else path.write_bytes(content)
    extra = ["--low", "2,1", "--high", "1,2", "--low-steps", "2", "--high-steps", "4"] if command == "study" else []
    assert main([command, "--config", str(path), "--model", "tiny", "--data", str(images), "--name", "zorblat",
                 "--out", str(tmp_path / "out"), *extra]) == 2
    line = one_line_error(capsys.readouterr().err, str(path), words)
    assert "cannot write" not in line


def test_a_template_file_that_is_not_utf8_is_one_line(images, tmp_path, capsys, keep_signals):
    from embedtrain.trainer import cli
    tpl = tmp_path / "tpl.txt"
    tpl.write_bytes("a photo of [name], café".encode("latin-1"))
    assert cli(["--model", "tiny", "--data", str(images), "--name", "zorblat", "--out", str(tmp_path / "out"),
                "--template", str(tpl)]) == 2
    one_line_error(capsys.readouterr().err, f"template file {tpl} is not UTF-8 text")
    tpl.write_text("\n \n")
    with pytest.raises(ConfigError, match="has no lines"):
        TrainConfig(model="tiny", data=str(images), name="zorblat", template=str(tpl)).validate()


@pytest.mark.parametrize("argv,words", [
    (["lr-find", "--end-lr", "1e30"], "end_lr must be a number > 0 and <= 10000"),
    (["sweep", "--candidates", "1e38"], "candidates: every LR must be a number > 0 and <= 10000, got 1e38"),
    (["sweep", "--candidates", "1e-3,inf"], "candidates: every LR"),
])
def test_finder_learning_rates_past_the_bound_are_one_line(images, tmp_path, capsys, argv, words):
    from embedtrain.__main__ import main
    assert main([*argv, *ARGS, "--data", str(images), "--out", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]   # refused before any folder was made


def test_a_range_test_stops_at_the_first_non_finite_loss_and_writes_its_files(trainer, tmp_path, monkeypatch):
    """Before: a NaN validation loss reached suggest_range, which raised; no result files. Now the curve ends
    before the first non-finite point, the ramp stops there, and lr_find.csv/.json/.png are written."""
    from embedtrain.lr_finder import range_test
    real, calls = trainer.fixed_loss, {"n": 0}

    def fixed_loss(which="val"):
        calls["n"] += 1
        return float("nan") if calls["n"] >= 7 else real(which)   # call 1 is the start; NaN from update 6

    monkeypatch.setattr(trainer, "fixed_loss", fixed_loss)
    out = tmp_path / "finder"
    report = range_test(trainer.cfg, out, end_lr=0.05, updates=20, val_every=1, trainer=trainer, log=lambda s: None)
    assert {p.name for p in out.iterdir()} >= {"lr_find.csv", "lr_find.json", "lr_find.png", "range"}
    assert report["updates_run"] < 20   # it stopped instead of ramping on
    saved = json.loads((out / "lr_find.json").read_text())
    assert any("became non-finite at update 6" in r for r in saved["reasons"]), saved["reasons"]
    rows = list(csv.DictReader(open(out / "lr_find.csv", newline="")))
    assert [int(r["update"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert all(r["val_loss"] != "nan" for r in rows)


def test_a_sweep_candidate_with_a_non_finite_loss_does_not_learn(trainer, tmp_path, monkeypatch):
    from embedtrain.lr_finder import sweep
    real, calls = trainer.fixed_loss, {"n": 0}

    def fixed_loss(which="val"):
        calls["n"] += 1
        return float("nan") if calls["n"] >= 5 else real(which)   # 1: start, 2-4: first candidate, 5-: second

    monkeypatch.setattr(trainer, "fixed_loss", fixed_loss)
    report = sweep(trainer.cfg, tmp_path / "sw", candidates=[1e-3, 1e-2], epochs=1, val_every=1, trainer=trainer,
                   log=lambda s: None)
    second = report["candidates"][1]
    assert second["verdict"] == "no_learning" and "non-finite" in second["sentence"], second
    assert (tmp_path / "sw" / "sweep.json").is_file() and (tmp_path / "sw" / "sweep.png").is_file()


# ====================================================================== 15. names
def test_a_long_name_gets_a_run_folder_that_fits(tmp_path):
    from embedtrain.config import MAX_NAME_CHARS, check_safe_name
    from embedtrain.lr_finder import prepare
    from embedtrain.trainer import new_run_dir
    name = "x" * 60
    cfg = TrainConfig(model="tiny", data=str(tmp_path), name=name, out=str(tmp_path)).validate()
    run = new_run_dir(cfg)          # before: "name is 76 characters", the timestamp counted against the user
    assert len(run.name) <= MAX_NAME_CHARS and run.name.startswith("x" * 48 + "-") and check_safe_name(run.name)
    *_, out_dir = prepare("sweep", ["--model", "tiny", "--data", str(tmp_path), "--name", name, "--out", str(tmp_path)])
    assert len(out_dir.name) <= MAX_NAME_CHARS and "-sweep-" in out_dir.name
    wide = "é" * 64   # 128 bytes: the bytes limit shortens it too
    run = new_run_dir(TrainConfig(model="tiny", data=str(tmp_path), name=wide).validate())
    assert len(run.name.encode()) <= 128 and run.name.startswith("é" * 10)
    with pytest.raises(ConfigError, match=r"^name is 65 characters"):   # the field the user typed
        TrainConfig(model="tiny", data=str(tmp_path), name="x" * 65).validate()
    with pytest.raises(ConfigError, match=r"^run_name is 65 characters"):
        TrainConfig(model="tiny", data=str(tmp_path), name="x", run_name="y" * 65).validate()


@pytest.mark.parametrize("name", ["COM¹", "com²", "Com³", "LPT¹", "lpt²", "LPT³", "com¹.txt", "lpt³.v2"])
def test_windows_superscript_device_names_are_reserved(tmp_path, name):
    with pytest.raises(ConfigError, match="reserved file name on Windows"):
        TrainConfig(model="tiny", data=str(tmp_path), name=name).validate()
    with pytest.raises(EmbeddingError, match="reserved"):
        from embedtrain.embedding import check_name
        check_name(name)


def test_config_pointing_at_a_folder_says_so(images, tmp_path, capsys, keep_signals):
    from embedtrain.trainer import cli
    assert cli(["--config", str(tmp_path), "--data", str(images), "--name", "zorblat"]) == 2
    line = one_line_error(capsys.readouterr().err, "is a folder", "settings JSON file")
    assert "cannot write" not in line


# ====================================================================== the same classes, around them
def test_the_study_checks_all_four_runs_before_the_first_trains(images, tmp_path, capsys, monkeypatch):
    """A study of NAME-gaST ... : a name near the limit is refused as the name the user typed, and a run length
    past the bound before anything trains (before: the fourth run failed after three had trained)."""
    from embedtrain import models
    from embedtrain.study import cli as cli_study
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    common = ["--model", "tiny", "--data", str(images), "--low", "2,1", "--high", "1,2", "--low-steps", "2",
              "--study-out", str(tmp_path / "study")]
    assert cli_study([*common, "--name", "x" * 62, "--high-steps", "4"]) == 2
    one_line_error(capsys.readouterr().err, "name: the study names its embeddings NAME-gaST",
                   "at most 59 characters", "is 62 characters")
    assert cli_study([*common, "--name", "zorblat", "--high-steps", str(10 ** 9)]) == 2
    one_line_error(capsys.readouterr().err, "study run gaST", "steps must be >= 1 and <= 10000000", "--high-steps")
    assert not (tmp_path / "study").exists()


def test_the_study_refuses_a_study_folder_that_holds_files(images, tmp_path, capsys):
    from embedtrain.study import cli as cli_study
    (tmp_path / "study" / "gaST").mkdir(parents=True)
    assert cli_study(["--model", "tiny", "--data", str(images), "--name", "zorblat", "--low", "2,1", "--high", "1,2",
                      "--low-steps", "2", "--high-steps", "4", "--study-out", str(tmp_path / "study")]) == 2
    one_line_error(capsys.readouterr().err, "study_out: the study folder", "already exists and holds gaST",
                   "--study-out")


@pytest.mark.parametrize("argv,words", [
    (["lr-find", "--updates", str(10 ** 9)], "updates must be a whole number >= 5 and <= 10000000"),
    (["sweep", "--epochs", "1e9"], "epochs must be a number > 0 and <= 1000"),
])
def test_finder_lengths_are_bounded_before_anything_loads(images, tmp_path, capsys, argv, words):
    from embedtrain.__main__ import main
    assert main([*argv, *ARGS, "--data", str(images), "--out", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, words)


@pytest.mark.parametrize("flag,value,words", [("--n", "1000000", "--n must be between 1 and 1000"),
                                              ("--steps", "1000000", "--steps must be between 1 and 1000")])
def test_score_bounds_its_sizes(capsys, monkeypatch, flag, value, words):
    from embedtrain.demo import score
    monkeypatch.setattr(score, "load_demo_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_:
        score.cli(["--token", "star", flag, value])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_resume_of_something_that_is_not_a_run_folder_is_one_line(tmp_path, capsys, keep_signals):
    from embedtrain.trainer import cli
    (tmp_path / "file.txt").write_text("x")
    for target, words in ((tmp_path / "file.txt", "is not a run folder"), (tmp_path / "nope", "is not a run folder"),
                          (tmp_path, "config.json does not exist")):
        assert cli(["--resume", str(target)]) == 2
        one_line_error(capsys.readouterr().err, str(target), words)


def test_the_template_size_limit_is_the_one_the_data_loader_reads():
    from embedtrain.config import MAX_TEMPLATE_FILE
    from embedtrain.data import MAX_TEMPLATE_BYTES
    assert MAX_TEMPLATE_FILE == MAX_TEMPLATE_BYTES
