"""Resident memory of a process (tree), sampled while it runs: benchmarks and the real-scale tests.

``ru_maxrss`` read after the fact is the high-water mark of the whole process, imports and
all, and says nothing about *when* it was reached; :class:`PeakRSS` samples the resident set
size (anonymous and file-backed pages: a memory-mapped weight file counts) of this process,
or of another one and every process below it, every few milliseconds, so a phase's peak can
be told apart from the next one's. Linux ``/proc`` is read directly; where there is none,
only this process's ``ru_maxrss`` is available.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class PeakRSS:
    """The resident set size of a process tree while it is watched: ``start_mb`` when watching
    began and ``peak_mb``, the largest sum sampled every ``every_s`` (spikes shorter than that
    can be missed). ``pid=None`` is this process alone; a ``pid`` includes its descendants
    (found again every ``tree_every_s``). Use as a context manager or ``start()``/``stop()``;
    ``mark()`` starts ``peak_since_mark_mb`` (the peak of a later phase, such as training after
    loading) and, given a name, records the peak so far in ``marks[name]``; ``freeze()`` keeps the
    peaks reached so far and ignores what comes after. Where there is no
    /proc (``pid=None`` only): ``ru_maxrss`` before and after, the process's high-water mark,
    which a peak reached before the block (imports) can hide."""

    def __init__(self, pid: int | None = None, every_s: float = 0.005, tree_every_s: float = 0.5):
        self.pid = pid
        self.every_s = every_s
        self.tree_every_s = tree_every_s
        self._stop = threading.Event()
        self._frozen = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.proc = Path("/proc/self/statm").is_file()
        if pid is not None and not self.proc:
            raise RuntimeError("watching another process needs Linux /proc")
        what = "this process" if pid is None else "the process tree"
        self.how = f"{what}, sampled every {every_s * 1000:g} ms" if self.proc else "ru_maxrss"
        self._pids = [pid or os.getpid()]
        self._tree_at = 0.0
        self.marks: dict[str, float] = {}

    # ---- reading /proc -------------------------------------------------------------------
    def pids(self) -> list[int]:
        """The watched process and its descendants (refreshed at most every ``tree_every_s``)."""
        if self.pid is not None and time.monotonic() - self._tree_at >= self.tree_every_s:
            self._pids = [self.pid, *descendants(self.pid)]
            self._tree_at = time.monotonic()
        return self._pids

    def now_mb(self) -> float:
        return sum(rss_bytes(p) for p in self.pids()) / 2**20

    @staticmethod
    def _maxrss_mb() -> float:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self):
        while not self._stop.wait(self.every_s):
            self._record(self.now_mb())

    def _record(self, value: float) -> None:
        if not self._frozen:
            self.peak_mb = max(self.peak_mb, value)
            if self.peak_since_mark_mb is not None:
                self.peak_since_mark_mb = max(self.peak_since_mark_mb, value)

    # ---- control ---------------------------------------------------------------------------
    def start(self) -> PeakRSS:
        self.start_mb = self.now_mb() if self.proc else self._maxrss_mb()
        self.peak_mb = self.start_mb
        self.peak_since_mark_mb = None
        if self.proc:
            self._thread.start()
        return self

    def mark(self, name: str | None = None) -> float:
        """Start ``peak_since_mark_mb`` from the resident size now; with ``name``, record the
        peak so far (now included) as ``marks[name]``. Returns the size now."""
        now = self.now_mb() if self.proc else self._maxrss_mb()
        self.peak_since_mark_mb = now
        self._record(now)
        if name is not None:
            self.marks[name] = self.peak_mb
        return now

    def freeze(self) -> float:
        """Keep the peak reached until now; later samples no longer count. Returns it."""
        if self.proc:
            self._record(self.now_mb())
        self._frozen = True
        return self.peak_mb

    def stop(self) -> None:
        if self.proc:
            self._stop.set()
            self._thread.join()
            self._record(self.now_mb())
        else:
            self.peak_mb = self._maxrss_mb()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def rss_bytes(pid: int) -> int:
    """Resident bytes of one process (0 once it has gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants alive now, plus the children
    each of them has already reaped (0 for a process that has gone)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        fields = _stat_fields(p)
        if fields:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICK    # utime stime cutime cstime
    return total


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, …) found in /proc now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, …] (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rfind(")") + 2:].split()


def run_sampled(command: list[str], every_s: float = 0.005, **popen) -> dict:
    """Run ``command`` to its end, sampling its resident memory from its start: ``peak_mb``,
    ``seconds`` (wall clock), ``returncode`` and ``output`` (stdout and stderr, the last 20,000
    characters)."""
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
        with PeakRSS(proc.pid, every_s=every_s) as rss:
            proc.wait()
        seconds = time.monotonic() - t0
        log.seek(0)
        output = log.read()[-20000:]
    return {"peak_mb": rss.peak_mb, "seconds": seconds, "returncode": proc.returncode, "output": output}
