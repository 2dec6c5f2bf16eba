"""Training jobs for the web UI: each job is its own process, followed through its run folder.

`python -m embedtrain train --config RUN/job.json` runs in a new session, so neither a closed browser
tab nor a restarted web server stops it; the page re-attaches by reading `outputs/.job.json` and the
run folder's events.jsonl / log.csv. One job at a time per outputs folder. No gradio import here.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from embedtrain import EmbedtrainError
from embedtrain.config import TEMPLATES, TrainConfig, default_run_name
from embedtrain.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent.parent


def launch(argv: list[str], stdout, stderr=subprocess.STDOUT, detach: bool = True) -> subprocess.Popen:
    """Start `python -m embedtrain ARGV` from the project root, offline and unbuffered.

    The one way the UI starts a process (training jobs, LR finder, grids). `detach` puts it in its own
    session, so a closed page or a restarted server does not stop it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")   # HF_HUB_OFFLINE is the user's: a hub model may download
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")   # the package's own folder
    # OpenMP threads that spin while they wait collapse when the web server takes a core for a moment
    # (measured: 20 polling pages cut a job's update rate by 97%); passive waiting keeps the job going.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return subprocess.Popen([sys.executable, "-m", "embedtrain", *argv], stdout=stdout, stderr=stderr,
                            env=env, start_new_session=detach, text=stdout == subprocess.PIPE)


class JobError(EmbedtrainError):
    """A job cannot be started or controlled; the message says why."""


@dataclass
class JobStatus:
    state: str                          # idle | running | finished | stopped | failed | crashed
    run_dir: str = ""
    name: str = ""
    update: int = 0
    weight_updates: int = 0
    eta_s: float | None = None
    loss: float | None = None
    val_loss: float | None = None
    message: str = ""
    summary: str = ""
    previews: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)   # log.csv rows (for the plots)
    stopping: bool = False              # running, and a stop was asked for (it finishes its update first)

    @property
    def running(self) -> bool:
        return self.state == "running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a finished child we started is a zombie until reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or "" where that
    cannot be read (no /proc). With the PID it names one process: a PID reused later has another start."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", errors="replace")
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: count fields after its closing ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else ""


def job_alive(job: dict | None) -> bool:
    """A recorded job's process still runs, and it is that process, not a later one with its PID."""
    if not job or not isinstance(job.get("pid"), int) or not _alive(job["pid"]):
        return False
    recorded = job.get("proc_start")
    return not recorded or process_start(job["pid"]) in ("", recorded)


# Every kind of job the web UI runs records itself in its own state file under the outputs folder.
STATE_FILES = {"train": ".job.json", "lr": "lr/.job.json", "grid": "grids/.job.json"}
KIND_WORDS = {"train": "training job", "lr": "LR finder run", "grid": "grid or study"}


class JobSlot:
    """One job at a time per outputs folder, whatever its kind (training, LR finder, grid or study): they
    share the machine's one GPU. The check and the start happen under an exclusive file lock
    (outputs/.jobs.lock), so two requests at the same moment, from threads or from two servers on the same
    folder, cannot both start."""

    def __init__(self, outputs):
        self.outputs = Path(outputs).resolve()

    def record(self, kind: str) -> dict | None:
        try:
            job = json.loads((self.outputs / STATE_FILES[kind]).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return job if isinstance(job, dict) else None

    def running(self) -> tuple[str, dict] | None:
        """(kind, record) of the job that runs now, if any."""
        for kind in STATE_FILES:
            job = self.record(kind)
            if job_alive(job):
                return kind, job
        return None

    def start(self, kind: str, spawn) -> dict:
        """Under the lock: refuse if any job runs, else `spawn()` -> (Popen, record fields), and write the
        record (pid, its start time, slot kind, started) to the kind's state file. Returns the record."""
        import fcntl
        self.outputs.mkdir(parents=True, exist_ok=True)
        with open(self.outputs / ".jobs.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            busy = self.running()
            if busy:
                raise self.busy(*busy)
            proc, fields = spawn()
            job = {**fields, "slot": kind, "pid": proc.pid, "proc_start": process_start(proc.pid),
                   "started": time.time()}
            path = self.outputs / STATE_FILES[kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(job))
            return job

    @staticmethod
    def busy(kind: str, job: dict) -> JobError:
        what = job.get("name") or Path(job.get("run_dir", "")).name
        return JobError(f"a {KIND_WORDS[kind]} is already running ({what}, started "
                        f"{time.strftime('%H:%M:%S', time.localtime(job.get('started', 0)))}); "
                        "one job runs at a time: wait for it or stop it first")

    def signal(self, job: dict, sig=signal.SIGTERM) -> bool:
        """Signal a recorded job's process group, only if it is still that process."""
        if not job_alive(job):
            return False
        try:
            os.killpg(job["pid"], sig) if job.get("group", True) else os.kill(job["pid"], sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


QUEUE_FILE = ".queue.json"


def run_queue(manager: "JobManager", every_s: float = 2.0, log=None):
    """A daemon thread that starts queued runs as jobs end, whether or not a page is open. Returns the thread."""
    def loop():
        while True:
            try:
                said = manager.advance()
                if said and log:
                    log(said)
            except Exception as e:   # noqa: BLE001  a broken queue file must not end the server's loop
                if log:
                    log(f"queue: {e}")
            time.sleep(every_s)
    thread = threading.Thread(target=loop, name="embedtrain-queue", daemon=True)
    thread.start()
    return thread


# What Stop says for each kind: (first press: a STOP file was written; second press: the process was signalled).
STOP_WORDS = {"train": ("stopping {name}: it finishes the current update and saves", "stop asked again: signalled {name}"),
              "lr": ("stopping: the current update finishes, then the curve so far is read",
                     "stop asked again: signalled the process")}


class Job:
    """The web UI's job of one kind (train, lr or grid): a `python -m embedtrain ...` process in its own session,
    started under the one-job lock (JobSlot) and recorded in the kind's state file: kind, command line, run
    folder, pid and the process's start time. Everything the page shows is read from that record and the
    files the process writes, so a page opened later, or a restarted server, finds a running job of every
    kind, follows it and can stop it; nothing about a job lives only in the server's memory."""

    def __init__(self, outputs, kind: str):
        self.outputs, self.kind = Path(outputs).resolve(), kind
        self.slot = JobSlot(self.outputs)
        self.proc = None   # the process, when this server started it (tests wait on it)

    def record(self) -> dict | None:
        return self.slot.record(self.kind)

    def running(self) -> dict | None:
        job = self.record()
        return job if job_alive(job) else None

    def refuse_if_busy(self) -> None:
        """Any job running (of any kind) refuses a start; said before a request's own checks, and checked again
        under the lock in start(), where it counts."""
        busy = self.slot.running()
        if busy:
            raise self.slot.busy(*busy)

    def start(self, argv: list[str], stdout: Path, stderr: Path | None = None, prepare=None, **fields) -> dict:
        """Under the lock: `prepare()` (make the run folder, write its settings), then `python -m embedtrain ARGV`
        with its output appended to `stdout` (and `stderr`, else the same file). Returns the record."""
        def spawn():
            if prepare is not None:
                prepare()
            Path(stdout).parent.mkdir(parents=True, exist_ok=True)
            with open(stdout, "ab" if stderr is None else "wb") as out:
                if stderr is None:
                    self.proc = launch(argv, stdout=out)
                else:
                    with open(stderr, "wb") as err:
                        self.proc = launch(argv, stdout=out, stderr=err)
            return self.proc, {"argv": argv, **fields}

        return self.slot.start(self.kind, spawn)

    def stop(self) -> str:
        """Stop the running job. Jobs with a run folder (training, LR finder) get a STOP file first: they
        finish the current update, save and exit; a second press signals the process, except while a training
        job is still loading (a signal then would kill it before it can save). Grids are signalled at once."""
        job = self.running()
        if not job:
            return "no job is running" if self.kind == "train" else "nothing is running"
        if self.kind == "grid":
            return "stopped" if self.slot.signal(job) else "nothing is rendering"
        first, again = STOP_WORDS[self.kind]
        stop = Path(job["run_dir"]) / "STOP"
        if not stop.exists():
            stop.write_text("stop requested from the web UI\n")
            return first.format(name=job.get("name", ""))
        if self.kind == "train" and not _has_started(Path(job["run_dir"])):
            return f"stop already asked: {job['name']} is still loading and stops before its first update"
        if not self.slot.signal(job):
            return "no job is running"
        return again.format(name=job.get("name", ""))


class JobManager:
    """Training jobs: a run folder per job, `train --config RUN/job.json` (or `--resume RUN`) as its process."""

    def __init__(self, outputs):
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.job = Job(self.outputs, "train")
        self.slot = self.job.slot
        # The web UI's rule for folders and files it may read (UIContext.allowed_folder); None: no limit (the
        # CLI, tests). A /train call must not make a job read what the page itself may not.
        self.allowed_folder = None

    @property
    def _proc(self):
        return self.job.proc

    # ------------------------------------------------------------ control
    def current(self) -> dict | None:
        return self.job.record()

    def start(self, cfg: TrainConfig, resume_dir: str | None = None) -> Path:
        """Start a job, or resume a stopped run; refuse while another job of any kind runs."""
        self.job.refuse_if_busy()
        if resume_dir:
            run_dir = self._inside_outputs(resume_dir)
            if not (run_dir / "resume.pt").is_file():
                raise JobError(f"{run_dir.name} has no resume state: only a stopped run can be resumed")
            args = ["--resume", str(run_dir)]
            name = json.loads((run_dir / "config.json").read_text())["name"]
        else:
            cfg = cfg.replace(out=str(self.outputs),
                              run_name=cfg.run_name or default_run_name(cfg.name))
            cfg.validate()
            self.check_readable(cfg)
            from embedtrain.preflight import check_run
            problems = check_run(cfg)
            if problems:   # refused before a folder is made: a job that cannot run leaves nothing behind
                raise JobError("; ".join(str(p) for p in problems))
            run_dir = self.outputs / cfg.run_name
            args = ["--config", str(run_dir / "job.json")]
            name = cfg.name

        def prepare():
            if not resume_dir:
                if run_dir.exists():
                    raise JobError(f"run folder {run_dir.name} already exists; choose another run name")
                run_dir.mkdir(parents=True)
                cfg.save(run_dir / "job.json")
            (run_dir / "STOP").unlink(missing_ok=True)

        self.job.start(["train", *args], run_dir / "job.log", prepare=prepare, run_dir=str(run_dir), name=name)
        return run_dir

    def check_readable(self, cfg: TrainConfig) -> None:
        """NotAllowed unless every folder or file the job would read is one the web UI may read."""
        if self.allowed_folder is None:
            return
        for path, what, field_ in ((cfg.data, "data folder", "data"), (cfg.val_data, "validation folder", "val_data"),
                                   (cfg.template, "template file", "template"),
                                   (cfg.init_embedding, "init_embedding file", "init_embedding")):
            if path and not (field_ == "template" and path in TEMPLATES):
                self.allowed_folder(path, what, field_)

    def stop(self) -> str:
        """Ask the running job to finish its update, save and exit (a STOP file); a second stop signals it."""
        return self.job.stop()

    # ------------------------------------------------------------ the queue
    # Runs waiting for their turn, in outputs/.queue.json: one starts when no job of any kind runs. The file
    # is the queue, so queued runs survive a server restart; any server on the folder (its poll or the
    # queue thread) starts the next one.
    def queued(self) -> list[dict]:
        """The waiting runs, oldest first: {id, name, run_name, added, config}."""
        try:
            items = json.loads((self.outputs / QUEUE_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return []
        return [q for q in items if isinstance(q, dict) and isinstance(q.get("config"), dict)] \
            if isinstance(items, list) else []

    def _write_queue(self, items: list[dict]) -> None:
        atomic_write_text(self.outputs / QUEUE_FILE, json.dumps(items, indent=1))

    def enqueue(self, cfg: TrainConfig) -> dict:
        """Add a run to the queue, checked now as a start would check it (a run that could not start is refused
        here, not found out later); its run folder is named when it starts unless run_name is set."""
        cfg = cfg.replace(out=str(self.outputs)).validate()
        self.check_readable(cfg)
        from embedtrain.preflight import check_run
        problems = check_run(cfg)
        if problems:
            raise JobError("; ".join(str(p) for p in problems))
        import uuid
        with self._queue_lock():
            items = self.queued()
            names = {q.get("run_name") for q in items if q.get("run_name")}
            if cfg.run_name and (cfg.run_name in names or (self.outputs / cfg.run_name).exists()):
                raise JobError(f"run_name: {cfg.run_name} is already queued or exists; choose another run name")
            item = {"id": uuid.uuid4().hex[:12], "name": cfg.name, "run_name": cfg.run_name, "added": time.time(),
                    "config": cfg.to_dict()}
            self._write_queue(items + [item])
        return item

    def dequeue(self, item_id: str) -> bool:
        """Remove a waiting run; False when it is not in the queue (it started meanwhile, or never was)."""
        with self._queue_lock():
            items = self.queued()
            kept = [q for q in items if q.get("id") != item_id]
            self._write_queue(kept)
        return len(kept) < len(items)

    def advance(self) -> str:
        """Start the next queued run if no job of any kind runs; returns what happened ("" when nothing did).
        A queued run that can no longer start (its data folder gone, say) is dropped with the reason."""
        if self.slot.running():
            return ""
        with self._queue_lock():
            items = self.queued()
            if not items:
                return ""
            item, rest = items[0], items[1:]
            try:
                run_dir = self.start(TrainConfig.from_dict(item["config"]))
            except JobError as e:
                if "already running" in str(e):
                    return ""   # another job started first: the run keeps its place
                self._write_queue(rest)
                return f"queued run {item.get('name')} could not start and left the queue: {e}"
            except EmbedtrainError as e:
                self._write_queue(rest)
                return f"queued run {item.get('name')} could not start and left the queue: {e}"
            self._write_queue(rest)
        return f"started queued run {run_dir.name}"

    def _queue_lock(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            with open(self.outputs / ".queue.lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                yield
        return held()

    def wait(self, timeout: float = 60.0) -> None:
        job = self.current()
        t0 = time.time()
        while job_alive(job) and time.time() - t0 < timeout:
            time.sleep(0.2)

    # ------------------------------------------------------------ reading runs
    def status(self, run_dir: str | None = None) -> JobStatus:
        job = self.current()
        if run_dir is None:
            if not job:
                return JobStatus("idle")
            run_dir = job["run_dir"]
        run = Path(run_dir)
        st = read_run(run)
        running = bool(job and job.get("run_dir") == str(run) and job_alive(job))
        if running:
            st.state = "running"
            st.stopping = (run / "STOP").exists()
            if not st.weight_updates and not st.message:   # still loading: a hub download shows its progress
                st.message = download_progress(run / "job.log")
        elif st.state == "running":  # the process is gone without its final event: it crashed
            st.state = "crashed"
            st.message = "the job ended without finishing (crashed or killed). Last output:\n" + \
                tail(run / "job.log", 1500)
        return st

    def history(self) -> list[JobStatus]:
        runs = [p for p in self.outputs.iterdir()
                if p.is_dir() and ((p / "config.json").exists() or (p / "job.json").exists())]
        runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [self.status(str(p)) for p in runs]

    def _inside_outputs(self, path) -> Path:
        p = Path(path).resolve()
        if self.outputs not in p.parents:
            raise JobError(f"{path} is not a run folder inside {self.outputs}")
        return p


class _RunReader:
    """Follows one run folder: only the lines appended to events.jsonl and log.csv since the last read
    are parsed, so polling a long run costs the same at update 10 and at update 100000."""

    def __init__(self, run: Path):
        self.run = run
        self._start_over()

    def _start_over(self) -> None:
        """Forget what was read (the run's events.jsonl was replaced: a new run in the same folder)."""
        run = self.run
        self.st = JobStatus("running", run_dir=str(run), name=run.name)
        self.ev = (None, 0)      # (inode, bytes consumed) of events.jsonl
        self.log = (None, 0)     # the same for log.csv
        self.fields: list[str] | None = None
        self.any_event = False
        self.named = False       # the embedding name has been read from config.json / job.json

    def _new_lines(self, path: Path, mark: tuple) -> tuple[list[str], tuple, bool]:
        """Complete lines added since `mark`; `reset` when the file was replaced or truncated."""
        try:
            info = path.stat()
        except FileNotFoundError:
            return [], (None, 0), mark[0] is not None
        inode, pos = mark
        reset = inode is not None and (inode != info.st_ino or info.st_size < pos)
        if reset or inode is None:
            pos = 0
        if info.st_size == pos:
            return [], (info.st_ino, pos), reset
        with open(path, "rb") as fh:
            fh.seek(pos)
            data = fh.read(info.st_size - pos)
        end = data.rfind(b"\n") + 1          # a line being written right now waits for the next read
        return data[:end].decode("utf-8", errors="replace").splitlines(), (info.st_ino, pos + end), reset

    def read(self) -> JobStatus:
        run = self.run
        lines, self.ev, reset = self._new_lines(run / "events.jsonl", self.ev)
        if reset:
            self._start_over()
            lines, self.ev, _ = self._new_lines(run / "events.jsonl", self.ev)
        st = self.st
        if not self.named:   # read once: the config does not change while a run is followed
            for name in ("config.json", "job.json"):
                try:
                    st.name = json.loads((run / name).read_text(encoding="utf-8")).get("name", run.name)
                    self.named = True
                    break
                except (FileNotFoundError, json.JSONDecodeError):
                    pass
        for line in lines:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.any_event = True
            kind = ev.get("event")
            if kind == "start":
                st.summary, st.weight_updates = ev.get("summary", ""), ev.get("weight_updates", 0)
                st.state, st.message = "running", ""      # a resumed run starts again
            elif kind == "update":
                st.update, st.eta_s, st.loss = ev["update"], ev.get("eta_s"), ev.get("loss")
                st.val_loss = ev.get("val_loss") or st.val_loss
            elif kind in ("done", "stopped", "failed"):
                st.state = {"done": "finished"}.get(kind, kind)
                st.message, st.files = ev.get("message", ""), ev.get("files", [])
                st.val_loss = ev.get("val_loss", st.val_loss)
        lines, self.log, reset = self._new_lines(run / "log.csv", self.log)
        if reset:   # a resume rewrites log.csv
            st.rows, self.fields = [], None
        if lines:
            if self.fields is None:
                self.fields, lines = next(csv.reader(lines[:1])), lines[1:]
            st.rows = st.rows + list(csv.DictReader(lines, fieldnames=self.fields))
        if (run / "previews").is_dir():
            st.previews = [str(p) for p in sorted((run / "previews").glob("*.png"), key=lambda p: p.stat().st_mtime)]
        out = replace(st)   # callers may change state/message; rows are shared read-only
        if not self.any_event and not (run / "job.log").exists():
            out.state = "unknown"
        return out


_READERS: dict[str, _RunReader] = {}
_READERS_LOCK = threading.Lock()


def read_run(run: Path) -> JobStatus:
    """The state of a run folder from its files alone (events.jsonl, log.csv, previews)."""
    run = Path(run)
    with _READERS_LOCK:
        reader = _READERS.get(str(run))
        if reader is None:
            if len(_READERS) > 256:
                _READERS.clear()
            reader = _READERS[str(run)] = _RunReader(run)
        return reader.read()


def _has_started(run: Path) -> bool:
    """The job wrote its "start" event: its stop handling is in place."""
    try:
        with open(run / "events.jsonl", "rb") as fh:
            return b'"start"' in fh.read(65536)
    except FileNotFoundError:
        return False


def download_progress(log: Path) -> str:
    """The latest download progress line a loading job printed (huggingface_hub's bars, each redrawn
    with a carriage return), as "Downloading the model: ...", or "" when it downloads nothing."""
    text = tail(log, 4096)
    parts = [p.strip() for p in text.replace("\r", "\n").splitlines() if p.strip()]
    bars = [p for p in parts if "%|" in p or p.startswith(("Fetching", "Downloading"))]
    if not bars or bars[-1] != parts[-1]:   # nothing, or the download is over and something else followed
        return ""
    return "Downloading the model: " + bars[-1][:200]


def tail(path: Path, n: int) -> str:
    """The last `n` bytes of a text file (a job's log can be long: only its end is read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - n))
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
