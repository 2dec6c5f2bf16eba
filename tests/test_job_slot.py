"""One job at a time per outputs folder, of any kind, under a file lock; Stop reaches only our own process."""

import json
import subprocess
import sys
import threading
import time

import pytest

from uihelp import _kill_job


def sleeper():
    """A stand-in job process: its own session, like the real ones (launch(detach=True))."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_three_simultaneous_starts_make_one_job(tmp_path, images):
    """The check-then-start was not atomic: three /train calls at the same moment started two jobs."""
    from embedtrain.config import TrainConfig
    from embedtrain.ui.jobs import JobError, JobManager
    outputs = tmp_path / "outputs"
    managers = [JobManager(outputs) for _ in range(3)]   # as if three servers shared the folder
    barrier, results = threading.Barrier(3), []

    def start(i):
        cfg = TrainConfig(model="tiny", data=str(images), name=f"race{i}", init_text="circle", steps=100000,
                          template="object", resolution=32, run_name=f"race{i}")
        barrier.wait()
        try:
            results.append(managers[i].start(cfg))
        except JobError as e:
            results.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        started = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(started) == 1 and len(refused) == 2, results
        assert all("already running" in str(e) for e in refused)
        # only the started job made a run folder, and Stop reaches it
        assert sorted(p.name for p in outputs.iterdir() if p.is_dir()) == [started[0].name]
        assert "stopping" in managers[0].stop()
    finally:
        _kill_job(outputs)


def test_a_running_job_of_any_kind_blocks_the_others(tmp_path, procs):
    from embedtrain import EmbedtrainError
    from embedtrain.ui.grid_tab import Runner
    from embedtrain.ui.jobs import JobManager, JobSlot
    from embedtrain.ui.lr_tab import FinderJobs
    outputs = tmp_path / "outputs"
    slot = JobSlot(outputs)

    def spawn():
        procs.append(sleeper())
        return procs[-1], {"name": "pstar", "run_dir": str(outputs / "pstar-1")}

    slot.start("lr", spawn)
    with pytest.raises(EmbedtrainError, match="an? LR finder run is already running"):
        JobManager(outputs).start(None, resume_dir=str(outputs / "x"))
    with pytest.raises(EmbedtrainError, match="already running"):
        FinderJobs(outputs).start("range", {"name": "a"}, {})
    with pytest.raises(EmbedtrainError, match="already running"):
        list(Runner(outputs).stream(["grid", "--help"]))
    procs[-1].kill()
    procs[-1].wait()
    assert slot.running() is None


def test_stop_never_signals_a_process_that_reused_the_pid(tmp_path, procs):
    """A stale .job.json whose PID now belongs to another process: Stop must not signal it."""
    from embedtrain.ui.jobs import JobManager, job_alive, process_start
    outputs = tmp_path / "outputs"
    run = outputs / "old-run"
    run.mkdir(parents=True)
    (run / "STOP").write_text("asked before\n")             # a second Stop would signal
    (run / "events.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    other = sleeper()
    procs.append(other)
    real = process_start(other.pid)
    assert real
    stale = {"pid": other.pid, "proc_start": str(int(real) - 1000), "run_dir": str(run), "name": "old",
             "started": time.time() - 3600}
    (outputs / ".job.json").write_text(json.dumps(stale))
    jobs = JobManager(outputs)
    assert not job_alive(stale)
    assert jobs.stop() == "no job is running"
    assert jobs.status().state != "running"
    time.sleep(0.3)
    assert other.poll() is None    # untouched


def test_a_second_stop_while_the_job_loads_does_not_kill_it(tmp_path, procs):
    """Two Stops before the job has installed its handler killed it: 'Crashed' and nothing saved."""
    from embedtrain.ui.jobs import JobManager, JobSlot, job_alive
    outputs = tmp_path / "outputs"
    run = outputs / "loading"
    run.mkdir(parents=True)

    def spawn():
        procs.append(sleeper())
        return procs[-1], {"name": "loading", "run_dir": str(run)}

    JobSlot(outputs).start("train", spawn)
    jobs = JobManager(outputs)
    assert jobs.stop().startswith("stopping loading")
    assert "still loading" in jobs.stop()
    time.sleep(0.3)
    assert procs[-1].poll() is None   # not signalled: it will see the STOP file once it runs
    (run / "events.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    assert "signalled" in jobs.stop()
    deadline = time.time() + 10
    while jobs.current() and job_alive(jobs.current()) and time.time() < deadline:   # (reaps it, too)
        time.sleep(0.05)
    assert not job_alive(jobs.current())


def test_a_loading_job_shows_its_model_download_progress(tmp_path, procs):
    """A hub model downloads before the first event: the status shows huggingface_hub's latest bar."""
    from embedtrain.ui.jobs import JobManager, JobSlot
    outputs = tmp_path / "outputs"
    run = outputs / "hubrun"
    run.mkdir(parents=True)
    (run / "job.log").write_text("Fetching 17 files:   0%|          | 0/17 [00:00<?, ?it/s]\r"
                                 "Fetching 17 files:  41%|####1     | 7/17 [00:12<00:17,  1.7s/it]\r")

    def spawn():
        procs.append(sleeper())
        return procs[-1], {"name": "hubrun", "run_dir": str(run)}

    JobSlot(outputs).start("train", spawn)
    st = JobManager(outputs).status()
    assert st.state == "running" and st.message.startswith("Downloading the model: Fetching 17 files:  41%")
    with open(run / "job.log", "a") as fh:
        fh.write("Fetching 17 files: 100%|##########| 17/17 [00:30<00:00]\nloading the pipeline\n")
    assert JobManager(outputs).status().message == ""   # the download is over


@pytest.mark.slow
def test_queued_runs_start_one_after_another_and_survive_a_new_manager(tmp_path, images):
    from embedtrain.config import TrainConfig, apply_preset
    from embedtrain.ui.jobs import JobError, JobManager
    outputs = tmp_path / "outputs"
    base = apply_preset(TrainConfig(model="tiny", data=str(images), name="zorblat", init_text="circle", steps=3,
                                    batch_size=2, template="object"), {"steps", "batch_size", "init_text", "template"})
    jobs = JobManager(outputs)
    first = jobs.enqueue(base.replace(run_name="q1"))
    jobs.enqueue(base.replace(run_name="q2", seed=1))
    with pytest.raises(JobError, match="q1 is already queued"):
        jobs.enqueue(base.replace(run_name="q1"))
    with pytest.raises(JobError, match="batch_size"):
        jobs.enqueue(base.replace(run_name="q3", batch_size=99))   # more than the 8 images: refused now, not later
    assert [q["run_name"] for q in JobManager(outputs).queued()] == ["q1", "q2"]   # on disk: a restart keeps it
    assert jobs.advance() == "started queued run q1"
    assert jobs.advance() == ""          # one job at a time: q2 waits
    assert [q["run_name"] for q in jobs.queued()] == ["q2"] and not jobs.dequeue(first["id"])
    jobs.wait(120)
    later = JobManager(outputs)          # as if the server had restarted
    assert later.advance() == "started queued run q2"
    later.wait(120)
    assert later.queued() == []
    for name in ("q1", "q2"):
        assert later.status(str(outputs / name)).state == "finished"


def test_a_queued_run_that_can_no_longer_start_leaves_the_queue_with_the_reason(tmp_path):
    import shutil

    from conftest import make_images
    from embedtrain.config import TrainConfig
    from embedtrain.ui.jobs import JobManager
    data = make_images(tmp_path / "data", 4)
    jobs = JobManager(tmp_path / "outputs")
    keep = jobs.enqueue(TrainConfig(model="tiny", data=str(data), name="zorblat", init_text="circle", steps=2,
                                    resolution=32, run_name="gone"))
    jobs.enqueue(TrainConfig(model="tiny", data=str(data), name="zorblat", init_text="circle", steps=2,
                             resolution=32, run_name="later"))
    assert jobs.dequeue(jobs.queued()[1]["id"]) and [q["id"] for q in jobs.queued()] == [keep["id"]]
    shutil.rmtree(data)
    said = jobs.advance()
    assert said.startswith("queued run zorblat could not start and left the queue: ") and "data" in said, said
    assert jobs.queued() == [] and not (tmp_path / "outputs" / "gone").exists()
