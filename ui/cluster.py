"""``dorabooth-ui --cluster ADDR``: the app's training line on a Ray cluster (``dorabooth.queue``).

The same face as ``worker.TrainingWorker`` (``submit``, ``position``, ``line``, ``stop``,
``close``), so the handlers do not know which one they drive; but every queued run is a job of
the workspace's queue, trained by whichever cluster worker is free, several at once. The
records live in ``WORKSPACE/queue/`` and the runs in their usual folders, which the workers
write (the workspace must be on a file system every worker reaches), so the page reads the
same ``events.jsonl`` it always reads, and a restarted app finds its runs still queued or
training on the cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.events import EventLog
from dorabooth.queue import FINAL


class ClusterWorker:
    """Runs as jobs of ``RayQueue(workspace, cluster)``."""

    def __init__(self, workspace: str | Path, cluster: str, *, cpus: float = 1.0, user: str | None = None,
                 max_queued: int | None = None):
        from dorabooth.queue.ray_queue import RayQueue

        self.queue = RayQueue(workspace, cluster, user=user, max_queued=max_queued)
        self.workspace, self.cluster, self.cpus = workspace, cluster, cpus

    def as_user(self, user: str) -> ClusterWorker:
        """The same queue as ``user``: their jobs only, owned by them (``ui.users``)."""
        return ClusterWorker(self.workspace, self.cluster, cpus=self.cpus, user=user,
                             max_queued=self.queue.max_queued)

    @staticmethod
    def job_id(run: Path) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{run.parent.name}-{run.name}").strip("-.")[:100] or "run"

    def _live(self) -> list:
        """The jobs not yet ended, training ones first, then waiting ones in the order asked."""
        jobs = [j for j in self.queue.jobs() if j.state not in FINAL]
        return [j for j in jobs if j.state == "running"] + [j for j in jobs if j.state == "queued"]

    def submit(self, run: str | Path, config) -> int:
        run = Path(run).resolve()
        if self.position(run) is not None:
            raise ValueError(f"{run.name} is already training or waiting to train")
        fields, job_id = {**config.to_dict(), "out": str(run)}, self.job_id(run)
        if self.queue.store.path(job_id).is_file():           # stopped or failed before: the same job again
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
            if job.run == run:
                return waiting if job.state == "queued" else 0
        return None

    def line(self) -> list[Path]:
        return [job.run for job in self._live()]

    def stop(self, run: str | Path) -> str:
        run = Path(run).resolve()
        for job in self._live():
            if job.run == run:
                waiting = job.state == "queued"
                self.queue.cancel(job.id)
                if waiting:
                    EventLog(run / rd.EVENTS)("stopped", step=0, message="taken out of the queue before it started")
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
