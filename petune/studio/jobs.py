"""The studio's job queue: ``petune`` commands (runs, merges, exports) as separate processes,
one at a time (one device), each with its own folder under ``<workspace>/.petune-studio/jobs/``:
``job.json`` (what and how it went), ``log.txt`` (its output) and ``events.jsonl`` (progress,
see :mod:`petune.studio.progress`).

Processes start in a session of their own with their output in files, so they outlive the
page and the server: a studio started again reads the folders back and follows a run still
going (by pid and start time). Stop sends SIGINT: a run checkpoints at the end of its step and
exits (as with Ctrl-C); a second stop stops it at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = ".petune-studio"
ACTIVE = ("queued", "running", "stopping")
POLL_SECONDS = 0.2


@dataclass
class Job:
    id: str
    args: list[str]  # petune's arguments: ["run", "recipes/x.toml", "--overwrite"]
    kind: str = "run"  # run | merge | export
    recipe: str | None = None  # workspace-relative recipe path
    output: str | None = None  # workspace-relative run (or output) folder
    status: str = "queued"  # queued | running | stopping | completed | interrupted | failed | cancelled | died
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    pid_started: float | None = None  # the process's start time (a recycled pid is not this job)
    returncode: int | None = None
    resumes: str | None = None  # the job this one resumes

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict:
        return asdict(self) | {"active": self.active, "command": "petune " + " ".join(self.args)}


class JobQueue:
    def __init__(self, workspace: Path, *, python: str = sys.executable, env: dict | None = None):
        self.workspace = Path(workspace).resolve()
        self.folder = self.workspace / STATE_DIR / "jobs"
        self.python, self.env = python, env
        self._lock = threading.Condition()
        self._procs: dict[str, subprocess.Popen] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        self.jobs: dict[str, Job] = {}
        for path in sorted(self.folder.glob("*/job.json")) if self.folder.is_dir() else []:
            try:
                job = Job(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue  # not ours, or damaged: left alone
            self.jobs[job.id] = job

    # -- files --------------------------------------------------------------------------------
    def dir(self, job: Job) -> Path:
        return self.folder / job.id

    def log_path(self, job: Job) -> Path:
        return self.dir(job) / "log.txt"

    def events_path(self, job: Job) -> Path:
        return self.dir(job) / "events.jsonl"

    def _save(self, job: Job) -> None:
        folder = self.dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")
        os.replace(tmp, folder / "job.json")

    # -- the queue ----------------------------------------------------------------------------
    def submit(self, args: list[str], *, kind: str = "run", recipe: str | None = None, output: str | None = None,
               resumes: str | None = None) -> Job:
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], args=list(args), kind=kind,
                  recipe=recipe, output=output, resumes=resumes)
        with self._lock:
            self.jobs[job.id] = job
            self._save(job)
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: j.created)

    def stop(self, job: Job) -> Job:
        """A queued job is cancelled; a running one gets SIGINT (checkpoint and stop), and a
        second stop a second SIGINT (stop at once)."""
        with self._lock:
            if job.status == "queued":
                job.status, job.ended = "cancelled", time.time()
                self._save(job)
            elif job.status in ("running", "stopping") and job.pid is not None:
                job.status = "stopping"
                self._save(job)
                try:
                    os.kill(job.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            self._lock.notify_all()
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="petune-studio-jobs", daemon=True)
        self._thread.start()

    def close(self, *, kill: bool = False, timeout: float = 30) -> None:
        """Stop handing out jobs. Running processes keep going unless ``kill``: then they get
        SIGINT, and SIGKILL after ``timeout`` seconds."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            procs = list(self._procs.values())
        if kill:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._follow()
                busy = any(j.status in ("running", "stopping") for j in self.jobs.values())
                waiting = [j for j in self.jobs.values() if j.status == "queued"]
                job = None if busy or not waiting else min(waiting, key=lambda j: j.created)
                if job is not None:
                    self._launch(job)
                self._lock.wait(POLL_SECONDS)

    def _launch(self, job: Job) -> None:
        folder = self.dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(self.env if self.env is not None else os.environ)
        from petune.studio import EVENTS_ENV

        env.update({EVENTS_ENV: str(self.events_path(job)), "PYTHONUNBUFFERED": "1", "COLUMNS": "110",
                    "TERM": "dumb"})
        with self.log_path(job).open("ab") as log:
            try:
                proc = subprocess.Popen([self.python, "-m", "petune", *job.args], cwd=self.workspace, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except OSError as exc:
                log.write(f"could not start petune: {exc}\n".encode())
                job.status, job.ended = "failed", time.time()
                self._save(job)
                return
        self._procs[job.id] = proc
        job.status, job.started, job.pid, job.pid_started = "running", time.time(), proc.pid, _started(proc.pid)
        self._save(job)

    def _follow(self) -> None:
        """Update running jobs: ours by their process, those of an earlier studio by pid."""
        for job in self.jobs.values():
            if job.status not in ("running", "stopping"):
                continue
            proc = self._procs.get(job.id)
            if proc is not None:
                code = proc.poll()
                if code is None:
                    continue
                del self._procs[job.id]
                job.returncode = code
                job.status = "completed" if code == 0 else "interrupted" if code == 130 else "failed"
            elif job.pid is not None and _alive(job.pid, job.pid_started):
                continue
            else:  # started by an earlier studio and gone: the run folder says how it ended
                job.status = self._ended_as(job)
            job.ended = time.time()
            self._save(job)

    def _ended_as(self, job: Job) -> str:
        if job.kind == "run" and job.output:
            try:
                status = json.loads((self.workspace / job.output / "manifest.json").read_text()).get("status")
            except (OSError, ValueError, AttributeError):
                status = None
            if status in ("completed", "interrupted", "failed"):
                return status
        return "died"


def _started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 — psutil missing or the process already gone
        return None


def _alive(pid: int, started: float | None) -> bool:
    try:
        import psutil

        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and (started is None or
                                                            abs(process.create_time() - started) < 1)
    except Exception:  # noqa: BLE001 — gone, or not ours to see
        return False
