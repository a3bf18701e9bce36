"""The queue on a Ray cluster: each job is a Ray task that asks for what it needs (a GPU, or
CPUs) and runs one attempt (``attempt.run_attempt``) on whichever worker has it free, so as many
jobs train at once as the cluster has room for. Ray does the scheduling; nothing here orders
or places jobs.

A detached actor per workspace (the *keeper*, named after the workspace's path) submits the
tasks and so owns them: they keep running after the ``dorabooth queue submit`` or the app that
asked has exited. Attempts send their events to the keeper as they happen, and readers (the
app, ``dorabooth queue logs --follow``) take them from it: progress is streamed from the
workers, not read from a file. The records in the workspace (``store.JobStore``) are the
state; the keeper's memory is only the live tasks and recent events, and a new keeper (after
the cluster restarted) submits again every job left ``queued`` or ``running``.

A worker that dies mid-run (killed, out of memory, its machine gone) is retried by Ray up to
the job's ``retries`` times; the new attempt continues from the run's last checkpoint and the
record says so. When retries run out, the keeper fails the job with that message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator

# quiet.quiet_libraries (the command line and the app without --verbose) set Ray's logger to
# errors before this import; Ray's import sets it back to INFO, so the wish is read first.
_QUIET = logging.getLogger("ray").level >= logging.ERROR
try:
    import ray
except ImportError:                      # the queue needs it; the rest of dorabooth does not
    ray = None

from .attempt import run_attempt
from .store import FINAL, Job, JobStore

NAMESPACE = "dorabooth"
EVENTS_KEPT = 2000                       # per job, in the keeper's memory (the run folder keeps them all)


def _need_ray():
    if ray is None:
        raise ValueError("the Ray queue needs Ray: pip install 'dorabooth[cluster]' (or pip install ray)")
    return ray


def connect(cluster: str | None = "auto", *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``cluster``: ``auto`` (a cluster running on this machine, `ray start
    --head`), ``ray://HOST:PORT`` (Ray Client) or ``HOST:PORT`` (its head node), or ``local``
    (start one inside this process, ``num_cpus`` CPUs: tests, one machine)."""
    r = _need_ray()
    if r.is_initialized():
        return
    env = {"env_vars": {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "OMP_NUM_THREADS")}}
    level = logging.ERROR if _QUIET else logging.INFO
    if _QUIET:
        logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        if cluster in (None, "local"):
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")      # a cluster of our own reports nothing
            r.init(namespace=NAMESPACE, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                   runtime_env=env, logging_level=level)
        else:
            r.init(address=cluster, namespace=NAMESPACE, log_to_driver=False, runtime_env=env, logging_level=level)
    except ConnectionError as e:
        raise ConnectionError(f"no Ray cluster at {cluster} ({e}); start one with `ray start --head` or give "
                              f"--cluster ray://HOST:10001") from None


def keeper_name(workspace) -> str:
    return "dorabooth-queue-" + hashlib.sha1(str(JobStore(workspace).root).encode()).hexdigest()[:12]


def keeper(workspace):
    """The workspace's keeper actor (created on first use; detached: it outlives this process)."""
    _need_ray()
    return Keeper.options(name=keeper_name(workspace), namespace=NAMESPACE, lifetime="detached",
                          get_if_exists=True, max_concurrency=16, num_cpus=0).remote(str(JobStore(workspace).root))


def _attempt_task(workspace: str, job_id: str, keeper_handle):
    """A Ray task body: one attempt, its events to the keeper (fire and forget)."""
    return run_attempt(workspace, job_id, report=lambda jid, event: keeper_handle.event.remote(jid, event))


class _Keeper:
    """Submits and watches the tasks of one workspace; keeps recent events per job."""

    def __init__(self, workspace: str):
        self.store = JobStore(workspace)
        self.lock = threading.Lock()
        self.refs: dict[str, list] = {}          # job → its tasks not yet seen to end (the last is the newest)
        self.events: dict[str, deque] = {}
        # sequence numbers start at the clock (µs), so a keeper made again after a restart numbers
        # above every event of the one before: a reader's cursor (``events_since``) stays valid
        self.seq = time.time_ns() // 1000
        self.task = ray.remote(_attempt_task)
        self.recovered = self.recover()
        threading.Thread(target=self._watch, daemon=True).start()

    def ping(self) -> bool:
        return True

    def submit(self, job_id: str, again: bool = False) -> None:
        """Start a task for the job, unless one is live (``again``: a resume, whose previous task
        may still be returning after it wrote its final state)."""
        job = self.store.get(job_id)
        with self.lock:
            if self.refs.get(job_id) and not again:
                return
            me = ray.get_runtime_context().current_actor
            self.refs.setdefault(job_id, []).append(self.task.options(
                num_cpus=job.cpus, num_gpus=job.gpus, max_retries=job.retries, retry_exceptions=False,
                name=f"dorabooth:{job_id}").remote(str(self.store.root), job_id, me))

    def recover(self) -> list[str]:
        """Submit again every job whose record says queued or running but has no task here (after
        the cluster or this keeper restarted): a running one continues from its checkpoint."""
        again = [j.id for j in self.store.jobs() if j.state not in FINAL and j.id not in self.refs]
        for job_id in again:
            self.submit(job_id)
        return again

    def cancel(self, job_id: str) -> None:
        """The cancel file is written (the running attempt stops after its step); a task still
        waiting for a worker is taken off the cluster at once."""
        self.store.request_cancel(job_id)
        with self.lock:
            ref = (self.refs.get(job_id) or [None])[-1]
        if ref is not None and self.store.get(job_id).state == "queued":
            ray.cancel(ref)

    def event(self, job_id: str, event: dict) -> None:
        with self.lock:
            self.seq += 1
            self.events.setdefault(job_id, deque(maxlen=EVENTS_KEPT)).append((self.seq, event))

    def events_since(self, job_id: str, since: int = 0) -> list[tuple[int, dict]]:
        with self.lock:
            return [(s, e) for s, e in self.events.get(job_id, ()) if s > since]

    def progress(self) -> dict[str, dict]:
        """The last step event of each job that sent one."""
        with self.lock:
            out = {}
            for job_id, events in self.events.items():
                steps = [e for _, e in events if e.get("type") == "step"]
                if steps:
                    out[job_id] = steps[-1]
            return out

    def live(self) -> list[str]:
        with self.lock:
            return sorted(self.refs)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self.lock:
                tasks = [(job_id, ref, ref is refs[-1]) for job_id, refs in self.refs.items() for ref in refs]
            for job_id, ref, newest in tasks:
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    ray.get(ref)
                except Exception as e:                  # the task itself could not finish: no retries left
                    if newest:
                        self._task_lost(job_id, e)
                with self.lock:
                    refs = [r for r in self.refs.get(job_id, []) if r is not ref]
                    if refs:
                        self.refs[job_id] = refs
                    else:
                        self.refs.pop(job_id, None)

    def _task_lost(self, job_id: str, error: Exception) -> None:
        job = self.store.get(job_id)
        if job.state in FINAL:
            return
        if isinstance(error, ray.exceptions.TaskCancelledError):
            job.state, job.message = "cancelled", "cancelled before it started"
        else:
            job.state = "failed"
            job.message = (f"its worker died {len(job.attempts)} time(s), more than the {job.retries} retries "
                           f"allowed ({type(error).__name__}); `dorabooth queue resume {job_id}` tries again from "
                           f"the last checkpoint")
        for a in job.attempts:
            if a.get("ended") is None:
                a.update(ended=time.time(), outcome="its worker died")
        self.store.save(job)
        self.event(job_id, {"type": "job", "time": time.time(), "state": job.state, "message": job.message})


Keeper = ray.remote(_Keeper) if ray is not None else None


class RayQueue:
    """The queue of ``workspace`` on the cluster ``cluster`` (see :func:`connect`), as one user
    (``user``; None: an operator who sees and changes every job)."""

    def __init__(self, workspace, cluster: str | None = "auto", *, user: str | None = None,
                 max_queued: int | None = None, num_cpus: int | None = None):
        connect(cluster, num_cpus=num_cpus)
        self.store = JobStore(workspace)
        self.store.mkdir()
        self.user, self.max_queued = user, max_queued
        self.keeper = keeper(self.store.root)
        ray.get(self.keeper.ping.remote())

    def submit(self, config: dict, *, job_id: str | None = None, retries: int = 2, cpus: float = 1.0,
               gpus: float | None = None) -> Job:
        """Queue a training (``config``: a TrainConfig's fields); ``gpus`` None = 1 when the
        cluster has GPUs, else 0 (then ``cpus``)."""
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        job = self.store.add(config, self.user or "operator", job_id=job_id, retries=retries, cpus=cpus,
                             gpus=gpus, max_queued=self.max_queued)
        ray.get(self.keeper.submit.remote(job.id))
        return job

    def jobs(self) -> list[Job]:
        return self.store.jobs(self.user)

    def get(self, job_id: str) -> Job:
        return self.store.owned(job_id, self.user)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in FINAL:
            return job
        ray.get(self.keeper.cancel.remote(job_id))
        return self.store.get(job_id)

    def resume(self, job_id: str, config: dict | None = None) -> Job:
        """A job that ended queued again; it continues from its run's last checkpoint (``config``:
        new training fields for the same run folder, e.g. more steps; its folder, and on an object store its
        photos, stay the job's)."""
        job = self.get(job_id)
        if job.state not in FINAL:
            raise ValueError(f"job {job_id} is {job.state}; only a job that ended can be resumed")
        if config is not None:                 # on an object store, also the photos uploaded at submit
            kept = ("out", "images") if self.store.remote else ("out",)
            job.config = {**config, **{k: job.config[k] for k in kept}}
        self.store.clear_cancel(job_id)
        job.state, job.message = "queued", "queued again; continues from its last checkpoint"
        self.store.save(job)
        ray.get(self.keeper.submit.remote(job_id, True))
        return job

    def progress(self) -> dict[str, dict]:
        mine = {j.id for j in self.jobs()}
        return {k: v for k, v in ray.get(self.keeper.progress.remote()).items() if k in mine}

    def events_since(self, job_id: str, since: int = 0) -> list[tuple[int, dict]]:
        """(sequence number, event) of the job's events the keeper holds (its last EVENTS_KEPT),
        those after ``since``: ask again with the last number to get only what came after."""
        self.get(job_id)
        return ray.get(self.keeper.events_since.remote(job_id, since))

    def follow(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None) -> Iterator[dict]:
        """The job's events as the workers send them, until it ends (or ``timeout`` seconds)."""
        since, start = 0, time.monotonic()
        while True:
            for since, event in self.events_since(job_id, since):
                yield event
            if self.store.get(job_id).state in FINAL:
                for since, event in self.events_since(job_id, since):
                    yield event
                return
            if timeout is not None and time.monotonic() - start > timeout:
                return
            time.sleep(poll)

    def wait(self, job_ids, timeout: float | None = None, poll: float = 0.5) -> list[Job]:
        """Until every job has ended (or ``timeout``); their records."""
        start = time.monotonic()
        while True:
            jobs = [self.get(j) for j in job_ids]
            if all(j.state in FINAL for j in jobs) or (timeout is not None and time.monotonic() - start > timeout):
                return jobs
            time.sleep(poll)
