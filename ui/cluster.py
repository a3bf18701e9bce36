"""``dorabooth-ui --cluster ADDR``: the app's training line on a Ray cluster (``dorabooth.queue``).

The same face as ``worker.TrainingWorker`` (``submit``, ``position``, ``line``, ``events``,
``stop``, ``close``), so the handlers do not know which one they drive; but every queued run is
a job of the workspace's queue, trained by whichever cluster worker is free, several at once.
The records live in ``WORKSPACE/queue/`` and the runs in their usual folders, which the workers
write (the workspace is on a file system every worker reaches, or on an object store, whose runs
the app reads through a local mirror: ``ui.store``), and a restarted app finds its runs still
queued or training on the cluster.

The page's live view of a run (state, step, loss, it/s, ETA, previews, errors, the retry note)
comes from the events the workers stream to the queue's keeper, not from polling the run's
``events.jsonl``: ``events(run)`` keeps a :class:`RunStream` per run and asks the keeper, each
page tick, only for what came after the last event it has. A run this app has not seen queued
or training (ended before the app started) is read from its file, as without ``--cluster``.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.events import EventLog
from dorabooth.queue import FINAL

from . import runs

FILES_FOLLOW = ("sample", "checkpoint", "done", "job")   # streamed events whose files a store's mirror brings down

class RunStream:
    """One run's events as the app has them: the run folder's history when the app first looked,
    then what the keeper streamed, each event once.

    The two overlap and neither is whole. The file has every event the trainer wrote, but the
    app's machine may see it late or not at all (it need not share the workers' file system);
    the keeper has the job's last ``EVENTS_KEPT`` (step events at most every 0.5 s) plus the
    queue's own (``job``), and after an app restart it still holds events the file has too.
    The trainer appends each event to the file and then sends the same dict, so an event reads
    the same in both (as JSON; ``time`` is to the millisecond). So: the file is read once, first
    (the whole history it has: after a restart, the steps the keeper no longer holds), then
    every streamed event not already here is appended, in the keeper's order: a file that lags
    or is missing loses nothing the keeper holds, and an event in both is kept once (no preview
    listed twice). The queue's own events from before the first look land after the file's
    history, which the page's reading of a run does not mind (it skips ``job`` events and shows
    a ``retry`` note once: the file has the same message).
    """

    def __init__(self, history: list[dict]):
        self.events: list[dict] = []
        self.since = 0                     # the keeper's sequence number of the last event read
        self._seen: set[str] = set()
        for event in history:
            self.append(event)

    def add(self, streamed: list[tuple[int, dict]]) -> None:
        """``(sequence number, event)`` pairs from ``RayQueue.events_since(job, self.since)``."""
        for seq, event in streamed:
            self.since = max(self.since, seq)
            self.append(event)

    def append(self, event: dict) -> None:
        """``event``, unless it is here already."""
        key = json.dumps(event, sort_keys=True, default=str)       # as the file has it
        if key not in self._seen:
            self._seen.add(key)
            self.events.append(event)


def job_id(run: Path, root: Path) -> str:
    """The queue's id of the run folder ``run`` of the workspace at ``root``: its path there without
    ``runs/`` (``rex-001-dora-quick``; with logins ``users-<user>-rex-…``), so that no two runs share one."""
    run, root = Path(run).resolve(), Path(root).resolve()
    parts = run.relative_to(root).parts if run.is_relative_to(root) else (run.parent.parent.name, run.name)
    parts = [*parts[:-2], parts[-1]] if len(parts) > 1 and parts[-2] == "runs" else list(parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-.")[:100] or "run"


class ClusterWorker:
    """Runs as jobs of ``RayQueue(workspace, cluster)``."""

    def __init__(self, workspace: str | Path, cluster: str, *, cpus: float = 1.0, user: str | None = None,
                 max_queued: int | None = None, store=None, id_root: Path | None = None):
        from dorabooth.queue.ray_queue import RayQueue

        self.queue = RayQueue(workspace, cluster, user=user, max_queued=max_queued)
        self.workspace, self.cluster, self.cpus = workspace, cluster, cpus
        self.store = store                               # a ui.store.StoreWorkspace: the runs are its mirror's
        # job ids are paths from the whole workspace's root (users/<user>/… included): never one user's folder
        self.id_root = id_root or (store.root if store is not None else Path(workspace))
        self._streams: dict[str, RunStream] = {}         # job → its events, for runs seen queued or training
        self._lock = threading.Lock()                    # page ticks of several tabs at once

    def as_user(self, user: str, store=None) -> ClusterWorker:
        """The same queue as ``user``: their jobs only, owned by them (``ui.users``); ``store``: their
        folder of an object-store workspace (``StoreWorkspace.at``), whose runs their jobs train."""
        return ClusterWorker(self.workspace, self.cluster, cpus=self.cpus, user=user,
                             max_queued=self.queue.max_queued, store=store if store is not None else self.store,
                             id_root=self.id_root)

    def job_id(self, run: Path) -> str:
        return job_id(run, self.id_root)

    def _run(self, job) -> Path:
        """The job's run folder here (in an object-store workspace, the mirror's)."""
        return self.store.local_of(job.run) if self.store is not None else job.run

    def _live(self) -> list:
        """The jobs not yet ended, training ones first, then waiting ones in the order asked."""
        jobs = [j for j in self.queue.jobs() if j.state not in FINAL]
        return [j for j in jobs if j.state == "running"] + [j for j in jobs if j.state == "queued"]

    def submit(self, run: str | Path, config) -> int:
        run = Path(run).resolve()
        if self.position(run) is not None:
            raise ValueError(f"{run.name} is already training or waiting to train")
        fields, job_id = {**config.to_dict(), "out": str(run)}, self.job_id(run)
        if self.store is not None:                            # trained into the store, its request there
            fields = self.store.submitting(run, fields)
        if self.queue.store.has(job_id):                      # stopped or failed before: the same job again
            self.queue.resume(job_id, fields)
        else:
            self.queue.submit(fields, job_id=job_id, cpus=self.cpus)
        return self.position(run) or 0

    def position(self, run: str | Path) -> int | None:
        """0 while it trains (several can), 1, 2, … while it waits, None otherwise."""
        run = Path(run).resolve()
        waiting = 0
        for job in self._live():
            waiting += job.state == "queued"
            if self._run(job) == run:
                return waiting if job.state == "queued" else 0
        return None

    def line(self) -> list[Path]:
        return [self._run(job) for job in self._live()]

    def events(self, run: str | Path) -> list[dict] | None:
        """The run's events as the workers streamed them, once this app has seen it queued or
        training (from then on, also after it ended); None for any other run: its file says it all."""
        run = Path(run).resolve()
        job_id = self.job_id(run)
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is None:
                if self.position(run) is None:
                    return None
                if self.store is not None:                   # the history the store has (after a restart)
                    self.store.pull(run)
                stream = self._streams[job_id] = RunStream(runs.read_events(run))
            streamed = self.queue.events_since(job_id, stream.since)
            if self.store is not None and any(e.get("type") in FILES_FOLLOW for _, e in streamed):
                self.store.pull(run)                         # the worker put their files in the store first
            stream.add(streamed)
            return list(stream.events)

    def stop(self, run: str | Path) -> str:
        run = Path(run).resolve()
        for job in self._live():
            if self._run(job) == run:
                waiting = job.state == "queued"
                self.queue.cancel(job.id)
                if waiting:
                    event = EventLog(run / rd.EVENTS)("stopped", step=0,
                                                      message="taken out of the queue before it started")
                    if self.store is not None:               # the store is what a restarted app reads
                        self.store.push(run / rd.EVENTS)
                    with self._lock:                         # the app wrote it; no worker streams it
                        if job.id in self._streams:
                            self._streams[job.id].append(event)
                    return "removed"
                return "stopping"
        return "idle"

    @property
    def busy(self) -> bool:
        return bool(self._live())

    def close(self, timeout: float = 30.0) -> None:
        """Leave the cluster; its jobs train on (a cluster this app started, ``local``, ends)."""
        import ray

        ray.shutdown()
