"""Resident memory of a process, sampled while it runs (benchmarks and the real-scale tests).

``ru_maxrss`` read after the fact is the high-water mark of the whole process, imports and
all, and says nothing about *when* it was reached; :class:`PeakRSS` samples the resident set
size (anonymous and file-backed pages: a memory-mapped weight file counts) of this or another
process every few milliseconds, so a phase's peak can be told apart from the next one's.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def rss_bytes(pid: int | None = None) -> int:
    """The resident set size of process ``pid`` (default: this one) now, bytes; 0 once it is gone."""
    try:
        pages = int(Path(f"/proc/{pid or 'self'}/statm").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The resident set size of a process while the block runs: ``start_mb`` when it began and
    ``peak_mb``, the largest value sampled every ``every_s`` from ``/proc/<pid>/statm`` (spikes
    shorter than that can be missed); ``mark(name)`` records the peak so far under ``name``
    (``marks``, MB). ``pid``: another process (default: this one). Where there is no /proc,
    ``ru_maxrss`` before and after (this process only): the process's high-water mark, which a
    peak reached before the block (imports) can hide."""

    def __init__(self, every_s: float = 0.005, pid: int | None = None):
        self.every_s = every_s
        self.pid = pid
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.proc = Path("/proc/self/statm").is_file()
        if pid is not None and not self.proc:
            raise OSError("sampling another process's memory needs /proc (Linux)")
        self.how = f"sampled every {every_s * 1000:g} ms" if self.proc else "ru_maxrss"
        self.marks: dict[str, float] = {}

    def _now_mb(self) -> float:
        return rss_bytes(self.pid) / 2**20

    @staticmethod
    def _maxrss_mb() -> float:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self):
        while not self._stop.wait(self.every_s):
            now = self._now_mb()
            with self._lock:
                self.peak_mb = max(self.peak_mb, now)

    def mark(self, name: str) -> float:
        """The peak so far (including now), recorded as ``marks[name]``."""
        now = self._now_mb() if self.proc else self._maxrss_mb()
        with self._lock:
            self.peak_mb = max(self.peak_mb, now)
            self.marks[name] = self.peak_mb
        return self.peak_mb

    def __enter__(self):
        self.start_mb = self._now_mb() if self.proc else self._maxrss_mb()
        self.peak_mb = self.start_mb
        if self.proc:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.proc:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._now_mb())
        else:
            self.peak_mb = self._maxrss_mb()
        return False


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
        with PeakRSS(every_s, pid=proc.pid) as rss:
            proc.wait()
        seconds = time.monotonic() - t0
        log.seek(0)
        output = log.read()[-20000:]
    return {"peak_mb": rss.peak_mb, "seconds": seconds, "returncode": proc.returncode, "output": output}
