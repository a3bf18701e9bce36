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

from .. import rundir as rd
from .store import FINAL, Job, JobStore

CANCEL_POLL_S = 0.5
PROGRESS_EVERY_S = 0.5               # step events passed on at most this often (the others, all)


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
    try:
        config = TrainConfig.from_dict({**job.config, "resume": rd.is_run(job.run)})
        result = _train(config, on_event=forward, stop=stop)
    except Exception as e:                               # the run's events.jsonl has the trainer's own error
        return _end(store, job, "failed", f"{type(e).__name__}: {e}", report)
    finally:
        ended.set()
    if result.stopped:
        return _end(store, job, "cancelled", f"cancelled after step {result.step}"
                    + (" with a checkpoint; `dorabooth queue resume` continues it" if result.step else ""), report)
    job.result = str(result.adapter) if result.adapter is not None else None
    return _end(store, job, "done", "", report)


def _train(config, on_event=None, stop=None):
    from ..train import train

    return train(config, on_event=on_event, stop=stop)


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
