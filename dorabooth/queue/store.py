"""The queue's state: one JSON record per job in ``WORKSPACE/queue/``, beside the run folders in
``WORKSPACE/runs/``. Every worker, the app and the command line reach the same folder (a file
system they all mount), so the queue survives any of them restarting: nothing lives only in
a process's memory.

The workspace may also be an fsspec URL (``s3://bucket/ws``: ``queue.remote``): then records
and cancel requests are objects, and attempts train in a local scratch folder mirrored to
``WORKSPACE/runs/<job>/``.

A record is written whole (temporary file, then rename; on an object store, one PUT). Writers
take turns by construction: the submitter writes a record once (``queued``), then only the attempt that trains it
(``running``, ``done``, ``failed``, ``cancelled``), one attempt at a time; a cancel request is
a file of its own (``JOB.cancel``) that the running attempt watches, so a cancel never races a
status write.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..formats.files import write_bytes
from .remote import filesystem, is_url, join, upload_inputs

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
WAITING = ("queued", "running")
QUEUE_DIR, RUNS_DIR = "queue", "runs"


class QuotaExceeded(ValueError):
    """A user has as many jobs waiting or training as the deployment allows."""


class NotYours(PermissionError):
    """A job that belongs to another user."""


@dataclass
class Job:
    id: str
    owner: str
    config: dict                       # a TrainConfig's fields; config["out"] is the run folder
    state: str = "queued"
    submitted: float = 0.0
    retries: int = 2                   # attempts more after a worker dies (a training error is not retried)
    cpus: float = 1.0                  # what each attempt asks the cluster for
    gpus: float = 0.0
    attempts: list[dict] = field(default_factory=list)   # {started, host, pid[, ended, outcome]}
    message: str = ""
    result: str | None = None          # the adapter (or unet/ folder) of a finished job
    step: int = 0                      # the last step an attempt reported
    total: int | None = None

    @property
    def run(self) -> Path | str:
        """The run folder: a path, or a URL in an object-store workspace."""
        out = self.config["out"]
        return out if "://" in out else Path(out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def current_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "local"


class JobStore:
    """The records of one workspace."""

    def __init__(self, workspace: str | os.PathLike):
        self.remote = is_url(workspace)
        if self.remote:                                 # an fsspec URL: records are objects
            self.root = str(workspace).rstrip("/")
            self.fs, base = filesystem(self.root)
            protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
            self.on_disk = "file" in protocols               # file:// (tests): a disk behind fsspec
            self.dir, self.runs = join(self.root, QUEUE_DIR), join(self.root, RUNS_DIR)
            self._dir = join(base, QUEUE_DIR)
        else:
            self.on_disk = True
            self.root = Path(workspace).resolve()
            self.dir = self.root / QUEUE_DIR
            self.runs = self.root / RUNS_DIR

    # ---- records -----------------------------------------------------------------------------
    def path(self, job_id: str) -> Path | str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}", job_id or ""):
            raise ValueError(f"{job_id!r} is not a job id; `dorabooth queue list` shows them")
        return join(self._dir, f"{job_id}.json") if self.remote else self.dir / f"{job_id}.json"

    def _read(self, path) -> str:
        if self.remote:
            return self.fs.cat_file(path).decode()
        return path.read_text()

    def _write(self, path, text: str) -> None:
        """The whole file at once: one PUT on an object store, a renamed temporary file on a disk
        (also a ``file://`` workspace, where a plain write could be read half done)."""
        if self.on_disk:
            write_bytes(path, text.encode())
        else:
            self.fs.pipe_file(path, text.encode())

    def _exists(self, path) -> bool:
        return self.fs.exists(path) if self.remote else path.exists()

    def mkdir(self) -> None:
        if self.remote:
            self.fs.makedirs(self._dir, exist_ok=True)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)

    def has(self, job_id: str) -> bool:
        return self._exists(self.path(job_id))

    def get(self, job_id: str) -> Job:
        path = self.path(job_id)
        try:
            return Job.from_dict(json.loads(self._read(path)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no job {job_id} in {self.dir}; `dorabooth queue list --workspace "
                                    f"{self.root}` shows the jobs there") from None

    def save(self, job: Job) -> Job:
        self._write(self.path(job.id), json.dumps(job.to_dict(), indent=1) + "\n")     # as write_json writes it
        return job

    def _records(self) -> list:
        if self.remote:
            return self.fs.glob(join(self._dir, "*.json")) if self.fs.exists(self._dir) else []
        return list(self.dir.glob("*.json")) if self.dir.is_dir() else []

    def jobs(self, owner: str | None = None) -> list[Job]:
        """Every job (or ``owner``'s), oldest first; a record being written is skipped."""
        out = []
        for path in self._records():
            try:
                job = Job.from_dict(json.loads(self._read(path)))
            except (OSError, ValueError, TypeError):
                continue
            if owner is None or job.owner == owner:
                out.append(job)
        return sorted(out, key=lambda j: (j.submitted, j.id))

    def add(self, config: dict, owner: str, *, job_id: str | None = None, retries: int = 2, cpus: float = 1.0,
            gpus: float = 0.0, max_queued: int | None = None) -> Job:
        """A new ``queued`` record; ``config["out"]`` defaults to ``runs/<id>``. With ``max_queued``,
        refused when ``owner`` already has that many jobs waiting or training."""
        if max_queued is not None:
            waiting = [j for j in self.jobs(owner) if j.state in WAITING]
            if len(waiting) >= max_queued:
                raise QuotaExceeded(f"{owner} has {len(waiting)} job(s) waiting or training, the most this queue "
                                    f"allows ({max_queued}); wait for one to finish or cancel one")
        job_id = job_id or self.new_id(config)
        if self.has(job_id):
            raise FileExistsError(f"a job {job_id} exists already in {self.dir}; choose another id")
        if self.remote:                                 # runs live in the workspace: trained elsewhere, mirrored
            out = str(config.get("out") or join(self.runs, job_id)).rstrip("/")
            if not out.startswith(self.root + "/"):       # the app's runs: WORKSPACE/<subject>/runs/<run>
                raise ValueError(f"in a workspace on an object store ({self.root}) a run's folder is in the "
                                 f"workspace ({join(self.runs, '<job id>')} by default): leave --out out")
            config = upload_inputs(self.root, job_id, config)
        else:
            out = str(Path(config.get("out") or self.runs / job_id).resolve())
        config = {**config, "out": out}
        mine = [j for j in self.jobs() if str(j.run) == out and j.state in WAITING]
        if mine:
            raise FileExistsError(f"{config['out']} is the run folder of job {mine[0].id}, which is "
                                  f"{mine[0].state}; give this one another --out")
        return self.save(Job(job_id, owner, config, submitted=time.time(), retries=int(retries), cpus=float(cpus),
                             gpus=float(gpus)))

    def new_id(self, config: dict) -> str:
        words = f"{config.get('token') or 'sks'}-{config.get('class_noun') or 'run'}"
        words = re.sub(r"[^A-Za-z0-9]+", "-", words).strip("-")[:40] or "run"
        return f"{words}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def owned(self, job_id: str, user: str | None) -> Job:
        """The job, when ``user`` may touch it (None: an operator, any job)."""
        job = self.get(job_id)
        if user is not None and job.owner != user:
            raise NotYours(f"job {job_id} belongs to another user; you can see and change only your own")
        return job

    # ---- cancel requests ---------------------------------------------------------------------
    def cancel_file(self, job_id: str) -> Path | str:
        path = self.path(job_id)
        return path.removesuffix(".json") + ".cancel" if self.remote else path.with_suffix(".cancel")

    def request_cancel(self, job_id: str) -> None:
        self._write(self.cancel_file(job_id), f"{socket.gethostname()}:{os.getpid()} {time.time():.3f}\n")

    def cancel_requested(self, job_id: str) -> bool:
        return self._exists(self.cancel_file(job_id))

    def clear_cancel(self, job_id: str) -> None:
        path = self.cancel_file(job_id)
        if not self.remote:
            path.unlink(missing_ok=True)
        elif self.fs.exists(path):
            self.fs.rm_file(path)
