"""One attempt at a queued job, in whatever process runs it (a Ray worker, or this process).

The attempt reads the job's record, marks it ``running`` (and an earlier attempt that never
ended as killed with its worker), trains with the ordinary trainer (``--resume`` whenever the
run folder holds a run, so a retry continues from the last checkpoint), watches the job's
cancel file (a cancel stops the trainer after its current step, with a checkpoint), and
writes the outcome into the record. A training error fails the job (retrying would fail the
same way); only a dead worker is retried, by the cluster.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import rundir as rd
from ..events import EventLog
from .remote import RunMirror, local_inputs, relocate, scratch_dir
from .store import FINAL, Job, JobStore

CANCEL_POLL_S = 0.5
PROGRESS_EVERY_S = 0.5               # step events passed on at most this often (the others, all)
MIRROR_AFTER = ("checkpoint", "sample", "prepared", "start", "done")  # object-store workspaces: push the run then
# (before the event goes on: a reader that sees "sample" or "done" finds its files in the workspace)


def run_attempt(workspace: str | os.PathLike, job_id: str, report: Callable[[str, dict], None] | None = None) -> dict:
    """Train ``job_id`` once; returns the record as written at the end. ``report(job_id, event)``
    receives the trainer's events as they happen (step events at most every 0.5 s)."""
    from ..config import TrainConfig

    store = JobStore(workspace)
    job = store.get(job_id)
    if job.state in FINAL:                               # (a retry after the last write of a finished attempt)
        return job.to_dict()
    now = time.time()
    if store.cancel_requested(job_id):
        return _end(store, job, "cancelled", "cancelled before it started", report)
    died = [a for a in job.attempts if a.get("ended") is None]
    for a in died:
        a.update(ended=now, outcome="its worker died")
    job.attempts.append({"started": now, "host": socket.gethostname(), "pid": os.getpid()})
    job.state = "running"
    job.message = (f"attempt {len(job.attempts)} of {job.retries + 1}: its worker died, continuing from the last "
                   f"checkpoint" if died else "")
    store.save(job)
    forward = _forwarder(job, report)
    if job.message:
        forward({"type": "retry", "time": now, "attempt": len(job.attempts), "message": job.message})

    stop = threading.Event()
    ended = threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(store, job_id, stop, ended), daemon=True)
    watcher.start()
    mirror = None
    try:
        fields = job.config
        if store.remote:                                 # train here, keep WORKSPACE/runs/<job> a copy
            scratch = scratch_dir(job_id)
            fields = local_inputs(job.config, scratch)
            mirror = RunMirror(str(job.run), Path(fields["out"]))
            if mirror.download():
                relocate(Path(fields["out"]), fields)
            forward = _mirrored(forward, mirror)
        if job.message:                                  # the run's own history says so too (the app shows it)
            EventLog(Path(fields["out"]) / rd.EVENTS)("retry", attempt=len(job.attempts), message=job.message)
        config = TrainConfig.from_dict({**fields, "resume": rd.is_run(fields["out"])})
        result = _train(config, on_event=forward, stop=stop)
    except Exception as e:                               # the run's events.jsonl has the trainer's own error
        _push(mirror)
        return _end(store, job, "failed", f"{type(e).__name__}: {e}", report)
    finally:
        ended.set()
    _push(mirror)
    if result.stopped:
        return _end(store, job, "cancelled", f"cancelled after step {result.step}"
                    + (" with a checkpoint; `dorabooth queue resume` continues it" if result.step else ""), report)
    job.result = (None if result.adapter is None else
                  f"{job.run}/{Path(result.adapter).name}" if mirror else str(result.adapter))
    return _end(store, job, "done", "", report)


def _train(config, on_event=None, stop=None):
    from ..train import train

    return train(config, on_event=on_event, stop=stop)


def _mirrored(forward, mirror) -> Callable[[dict], None]:
    """``forward``, and after each checkpoint and preview the run's copy brought up to date."""
    def both(event: dict) -> None:
        if event.get("type") in MIRROR_AFTER:
            mirror.push()
        forward(event)
    return both


def _push(mirror) -> None:
    if mirror is not None:
        mirror.push()


def _forwarder(job: Job, report) -> Callable[[dict], None]:
    last = [0.0]

    def forward(event: dict) -> None:
        if event.get("type") == "step":
            job.step, job.total = int(event["step"]), event.get("total")
            if time.monotonic() - last[0] < PROGRESS_EVERY_S and event["step"] != event.get("total"):
                return
            last[0] = time.monotonic()
        if report is not None:
            report(job.id, event)
    return forward


def _watch_cancel(store: JobStore, job_id: str, stop: threading.Event, ended: threading.Event) -> None:
    while not ended.wait(CANCEL_POLL_S):
        if store.cancel_requested(job_id):
            stop.set()
            return


def _end(store: JobStore, job: Job, state: str, message: str, report) -> dict:
    job.state, job.message = state, message
    if job.attempts and job.attempts[-1].get("ended") is None:
        job.attempts[-1].update(ended=time.time(), outcome=state)
    store.save(job)
    if report is not None:
        report(job.id, {"type": "job", "time": time.time(), "state": state, "message": message})
    return job.to_dict()
