"""Fuzzing the two ways settings come in, the command line and the web API, with hostile values for every
field: random text, huge and negative numbers, NaN and infinities, wrong types, odd Unicode.

What must hold for every input: either a clear refusal (a non-zero exit with one line on stderr, or an
EmbedtrainError naming the field) or a run that finishes; never a traceback, never a second job, and the
process's memory stays bounded."""

from __future__ import annotations

import contextlib
import io
import random
import resource
from dataclasses import fields

import pytest

HOSTILE = ["", " ", "abc", "-1", "0", "1", "1e400", "-1e400", "nan", "inf", "-inf", str(10 ** 40), "1" * 5000,
           "0x10", "1_000", "３", "é" * 300, "\x00", "../../etc", "COM1", "💥" * 50, "True", "[1, 2]",
           "{\"a\": 1}", "1e-320", "5e-324", "  7  "]

MEMORY_BOUND_MB = 4096   # the whole test process, tiny-model runs included (a resolution bomb took > 5 GB)


def _reset_peak() -> None:
    """Start the peak RSS afresh (Linux: '5' to /proc/self/clear_refs resets VmHWM to the current RSS), so an
    earlier test in this process (the full-size checkpoint tests peak at ~15 GB) does not count here."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """This process's peak RSS since _reset_peak (VmHWM), or since it started where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cases(seed: int, per_field: int):
    from embedtrain.config import TrainConfig
    rng = random.Random(seed)
    for f in fields(TrainConfig):
        if f.name in ("out", "run_name", "device"):   # where and how it runs: set by the harness
            continue
        for value in rng.sample(HOSTILE, per_field):
            yield f.name, f.type, value


@pytest.fixture
def own_signals():
    """cli() is a process's entry point: after a run it ignores SIGINT/SIGTERM (nothing left to abort). Run
    in-process here, the test process gets its handlers back, or later tests' child processes would
    inherit SIG_IGN and could not be stopped."""
    import signal
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_cli_train_refuses_in_one_line_or_finishes(tmp_path, images, own_signals):
    from embedtrain.trainer import cli
    base = ["--model", "tiny", "--data", str(images), "--name", "zorb", "--init-text", "circle", "--template",
            "object", "--resolution", "32", "--steps", "1", "--batch-size", "2", "--preview-every", "0",
            "--save-every", "0", "--out", str(tmp_path / "out")]
    finished = refused = 0
    _reset_peak()
    held = _peak_mb()   # what the process already holds (earlier tests' memory that was not given back)
    for i, (name, typ, value) in enumerate(_cases(seed=0, per_field=2)):
        flag = "--" + name.replace("_", "-")
        if typ == "bool":
            argv = base + [flag if value.strip() in ("", "1", "True") else "--no-" + name.replace("_", "-")]
        else:
            argv = base + [f"{flag}={value}"]
        argv += ["--run-name", f"fuzz{i}"]
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli(argv)
            except SystemExit as e:   # argparse: a value of the wrong type
                code = e.code
            except Exception as e:    # anything else reached the user as a traceback
                pytest.fail(f"{flag}={value[:40]!r}: {type(e).__name__}: {str(e)[:300]}")
        text = err.getvalue()
        assert "Traceback" not in text + out.getvalue(), (flag, value[:40], text[-800:])
        if code == 0:
            finished += 1
            assert list((tmp_path / "out" / f"fuzz{i}").glob("*.safetensors")), (flag, value[:40])
        else:
            refused += 1
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            assert lines, (flag, value[:40], "refused without saying why")
            assert len(lines[-1]) < 2000, (flag, value[:40], "the reason is not one readable line")
        assert _peak_mb() - held < MEMORY_BOUND_MB, (flag, value[:40], _peak_mb(), held)
    assert finished >= 10 and refused >= 50, (finished, refused)
   # both outcomes reached: the harness is not refusing everything


def test_api_train_refuses_with_a_named_field_or_starts_one_job(tmp_path, monkeypatch):
    """What /train does with a form (train_tab.form_config + JobManager.start), for hostile values of every
    form field, with the job process replaced by a stand-in (no training here): an EmbedtrainError, or one
    job started; a second start while it runs is refused."""
    import subprocess
    import sys

    from embedtrain import EmbedtrainError
    from embedtrain.ui import jobs as jobs_module
    from embedtrain.ui.context import DEMO_DATASET, UIContext
    from embedtrain.ui.train_tab import FIELDS, default_config, form_checks, form_config

    started = []

    def fake_launch(argv, stdout, stderr=None, detach=True):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                        start_new_session=detach))
        return started[-1]

    monkeypatch.setattr(jobs_module, "launch", fake_launch)
    ctx = UIContext(outputs=tmp_path / "outputs", data=str(DEMO_DATASET))
    cfg = default_config(ctx)
    base = {k: getattr(cfg, k) for k in FIELDS}
    rng = random.Random(1)
    wrong_types = [None, 3.7, -5, 10 ** 30, float("nan"), float("inf"), True, [1], {"a": 1}, b"\xff"]
    try:
        for i, key in enumerate(FIELDS * 3):
            values = dict(base, run_name=f"api{i}")
            values[key] = rng.choice(HOSTILE + wrong_types)
            slots, bad = form_checks(ctx, values)          # must never raise
            try:
                job_cfg = form_config(ctx, values)
                run = ctx.jobs.start(job_cfg)
            except EmbedtrainError as e:
                assert str(e).strip(), (key, values[key])
                continue
            assert not bad, (key, values[key], bad)         # the page would have let it start: it must be valid
            assert run.is_dir()
            with pytest.raises(EmbedtrainError, match="already running"):   # one job at a time
                ctx.jobs.start(job_cfg.replace(run_name=f"second{i}"))
            started[-1].kill()
            started[-1].wait()
    finally:
        for p in started:
            p.kill()
            p.wait()
    assert started, "no hostile value left the form valid: the harness refused everything"
