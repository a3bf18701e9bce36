"""Measuring a benchmark's processes: peak resident memory and CPU time of a process tree, and
training runs watched from outside.

``PeakRSS()`` watches this process (the block it wraps); ``PeakRSS(pid)`` watches another
process and every process below it (a training script started with ``subprocess``), so that
a run's memory is its own and not the benchmark's. Linux ``/proc`` is read directly; where
there is none, only this process's ``ru_maxrss`` high-water mark is available.

``measure(argv, …)`` runs a training command and times its steps by the moment each step's
progress marker appears in its output (``StepClock``): the same clock for any trainer, whatever
it logs, as long as it prints one marker per step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dorabooth.testing.memory import PeakRSS, cpu_seconds, descendants, rss_bytes  # noqa: F401  (re-exported for the bench)


# ---- training runs watched from outside ----------------------------------------------------
class StepClock:
    """The first time each step marker ``pattern`` (groups: step, total) is seen in a stream
    fed in chunks; a marker split across two chunks is found when the second arrives."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.seen: dict[int, float] = {}
        self.total: int | None = None
        self._tail = ""

    def feed(self, text: str, now: float) -> list[int]:
        """New steps found in ``text`` (received at ``now``), in order."""
        window = self._tail + text
        new = []
        for m in self.pattern.finditer(window):
            step, self.total = int(m.group(1)), int(m.group(2))
            if step not in self.seen:
                self.seen[step] = now
                new.append(step)
        self._tail = window[-400:]
        return new


def step_durations(marks: dict[int, float], skip: int = 1) -> list[float]:
    """Seconds of each step from the times its marker and the previous one appeared (step 0 =
    training started); the first ``skip`` steps are left out."""
    return [marks[n] - marks[n - 1] for n in sorted(marks) if n > skip and n - 1 in marks]


@dataclass
class Measurement:
    """One training run watched by ``measure``."""
    name: str
    ok: bool = False
    error: str | None = None
    setup_s: float | None = None                  # process start → training started (load, prepare)
    step_s: list[float] = field(default_factory=list)       # wall seconds per step, first excluded
    cpu_step_s: list[float] = field(default_factory=list)   # CPU seconds of the tree per step, first excluded
    first_step_s: float | None = None
    peak_rss_mb: float | None = None              # process tree, start → last step
    rss_at_start_mb: float | None = None          # … when training started (step 0 marker)
    peak_training_rss_mb: float | None = None     # … from then until the last step
    peak_gpu_mb: float | None = None              # nvidia-smi, cuda only
    log: str | None = None


def measure(name: str, argv: list[str], env: dict, cwd: Path, pattern: re.Pattern, total: int, log: Path, *,
            gpu: bool = False, timeout_s: float = 3600.0, memory_floor_mb: float = 1024.0) -> Measurement:
    """Run ``argv`` as a training run of ``total`` steps: timestamp its step markers (``pattern``),
    sample its tree's memory (and GPU memory with ``gpu``) until the last step's marker, then end
    it. It is ended early, with an error, when it exceeds ``timeout_s`` or the machine's
    available memory falls below ``memory_floor_mb`` (before the kernel picks a process to kill);
    its output goes to ``log``."""
    result = Measurement(name, log=str(log))
    clock = StepClock(pattern)
    cpu_at: dict[int, float] = {}
    rss_at_start: list[float | None] = [None]
    done = threading.Event()
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    rss = PeakRSS(proc.pid, every_s=0.01).start()
    gpu = GpuMemory(rss.pids).start() if gpu else None

    def read():
        with open(log, "wb") as f:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                now = time.monotonic()
                f.write(chunk)
                f.flush()
                for step in clock.feed(chunk.decode("utf-8", "replace"), now):
                    cpu_at[step] = cpu_seconds(proc.pid)
                    if step == 0:
                        rss_at_start[0] = rss.mark()
                    if step >= total:
                        rss.freeze()
                        if gpu:
                            gpu.freeze()
                        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result.error = _watch(proc, done, started, timeout_s, memory_floor_mb, rss)
    finally:
        _stop(proc)
        reader.join(timeout=30)
        rss.stop()
        if gpu:
            gpu.stop()
    marks = clock.seen
    if result.error is None and not done.is_set():
        result.error = f"exited with code {proc.returncode} after step {max(marks, default=None)}: see {log}"
    if result.error is None:
        result.ok = True
        result.setup_s = marks[0] - started if 0 in marks else None
        result.first_step_s = marks[1] - marks[0] if 0 in marks and 1 in marks else None
        result.step_s = step_durations(marks)
        result.cpu_step_s = step_durations(cpu_at)
        result.peak_rss_mb = rss.peak_mb
        result.rss_at_start_mb = rss_at_start[0]
        result.peak_training_rss_mb = rss.peak_since_mark_mb
        result.peak_gpu_mb = gpu.peak_mb if gpu else None
    return result


def _watch(proc, done: threading.Event, started: float, timeout_s: float, floor_mb: float, rss: PeakRSS) -> str | None:
    """Wait for the last step, the process's end, the timeout or the machine's memory to run low."""
    while not done.wait(0.25):
        if proc.poll() is not None:
            done.wait(2.0)                                   # the reader may still hold the last marker
            return None
        if time.monotonic() - started > timeout_s:
            return f"no last step after {timeout_s:.0f} s"
        available = memory_available_mb()
        if available is not None and available < floor_mb:
            return (f"stopped: the machine had {available:.0f} MB available with this run at "
                    f"{rss.now_mb() / 1024:.1f} GiB RSS (peak so far {rss.peak_mb / 1024:.1f} GiB): it does not fit")
    return None


def _stop(proc) -> None:
    """End the run's whole process group: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def memory_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class GpuMemory:
    """Peak GPU memory of a process tree as nvidia-smi reports it (the CUDA context, the
    allocator's cache and tensors), sampled every 0.5 s."""

    def __init__(self, pids):
        self.pids, self.peak_mb, self._frozen = pids, 0.0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _now_mb(self) -> float:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        mine = set(self.pids())
        return sum(float(mb) for pid, mb in (line.split(",") for line in out.splitlines() if "," in line)
                   if int(pid) in mine)

    def _sample(self):
        while not self._stop.wait(0.5):
            if not self._frozen:
                self.peak_mb = max(self.peak_mb, self._now_mb())

    def start(self):
        self._thread.start()
        return self

    def freeze(self):
        self._frozen = True

    def stop(self):
        self._stop.set()
        self._thread.join()
