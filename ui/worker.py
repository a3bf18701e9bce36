"""Background training: one run at a time per device; later requests wait in line.

The worker is a thread that calls the trainer for each queued run with a stop flag. It
holds no run state of its own beyond the line and the stop flag: progress, results and
errors are in each run folder's ``events.jsonl``, which the page reads, so a reload (or a
second browser tab) sees the same thing. ``position(run)`` is 0 for the running run and
1, 2, … for runs waiting behind it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.events import EventLog
from dorabooth.rundir import RunBusy

log = logging.getLogger("dorabooth.ui")


@dataclass
class Job:
    run: Path
    config: object                     # a dorabooth TrainConfig


def _default_train(config, on_event=None, stop=None):
    from dorabooth import train

    return train(config, on_event=on_event, stop=stop)


class TrainingWorker:
    """``submit`` runs in order; ``stop`` ends the running one at its next step (keeping a
    checkpoint) or takes a waiting one out of the line."""

    def __init__(self, train: Callable | None = None, before_train: Callable[[], None] | None = None):
        self._train = train or _default_train
        self._before_train = before_train
        self._line: list[Job] = []
        self._current: Job | None = None
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dorabooth-training", daemon=True)
        self._thread.start()

    # ---- what the page asks ------------------------------------------------------------------
    def submit(self, run: str | Path, config) -> int:
        """Queue a run; returns its position (0: it starts now)."""
        run = Path(run).resolve()
        with self._wake:
            if self._closed:
                raise RuntimeError("the training worker has shut down")
            if self.position(run) is not None:
                raise ValueError(f"{run.name} is already training or waiting to train")
            self._line.append(Job(run, config))
            self._wake.notify_all()
            return len(self._line) - (0 if self._current is not None else 1)

    def position(self, run: str | Path) -> int | None:
        run = Path(run).resolve()
        with self._wake:
            if self._current is not None and self._current.run == run:
                return 0
            for i, job in enumerate(self._line):
                if job.run == run:
                    return i + (1 if self._current is not None else 0)
        return None

    def line(self) -> list[Path]:
        """The running run (if any) first, then the waiting ones in order."""
        with self._wake:
            return ([self._current.run] if self._current is not None else []) + [job.run for job in self._line]

    def events(self, run: str | Path) -> None:
        """None: the page reads the run's ``events.jsonl``, which this process writes
        (``ui.cluster.ClusterWorker`` gives the events its workers stream)."""
        return None

    def stop(self, run: str | Path) -> str:
        """"stopping" (running: stops after the current step), "removed" (was waiting) or "idle"."""
        run = Path(run).resolve()
        with self._wake:
            if self._current is not None and self._current.run == run:
                self._stop.set()
                return "stopping"
            for job in self._line:
                if job.run == run:
                    self._line.remove(job)
                    EventLog(run / rd.EVENTS)("stopped", step=0,
                                                   message="taken out of the queue before it started")
                    return "removed"
        return "idle"

    @property
    def busy(self) -> bool:
        with self._wake:
            return self._current is not None or bool(self._line)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the running run (it checkpoints), drop the line, end the thread."""
        with self._wake:
            self._closed = True
            self._line.clear()
            self._stop.set()
            self._wake.notify_all()
        self._thread.join(timeout)

    # ---- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._line and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._current = self._line.pop(0)
                self._stop.clear()
            try:
                if self._before_train is not None:
                    self._before_train()
                self._train(job.config, stop=self._stop)
            except RunBusy:                            # another process trains it: its events are its own
                log.warning("training %s skipped: another process trains it", job.run)
            except Exception as e:                     # the run's events.jsonl says what happened
                log.exception("training %s failed", job.run)
                _record_error(job.run, e)
            finally:
                with self._wake:
                    self._current = None


def _record_error(run: Path, error: Exception) -> None:
    """The trainer logs its own errors; add one only if it failed before it could."""
    from .runs import read_events

    events = read_events(run)
    if not events or events[-1].get("type") != "error":
        EventLog(run / rd.EVENTS)("error", message=f"{type(error).__name__}: {error}")
