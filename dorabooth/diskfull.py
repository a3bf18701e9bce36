"""Running out of space: :class:`DiskFull`, the one-line error that names the file being
written, the file system to free space on, what the write needed and how to carry on.

Standard library only (the command line and ``events`` import it before torch loads). The
write helpers (``formats.files``, ``events.EventLog``) turn the operating system's ENOSPC /
EDQUOT, and safetensors' own ``SafetensorError`` that wraps them ("os error 28"), into
``DiskFull`` with :func:`naming`; callers that know more (a checkpoint: the last complete
one is kept, continue with ``--resume``) replace its way out with :meth:`DiskFull.carry_on`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CODES = (errno.ENOSPC, errno.EDQUOT)
AGAIN = "run the command again"


class DiskFull(OSError):
    """No space (or quota) left while writing ``path``. An ``OSError`` with errno ENOSPC or
    EDQUOT, so code that handles OSError still does."""

    def __init__(self, path: str | os.PathLike, needs: int | None = None, way_out: str = AGAIN,
                 code: int = errno.ENOSPC):
        super().__init__(code, os.strerror(code), str(path))
        self.path, self.needs, self.way_out = Path(path), needs, way_out

    def __str__(self) -> str:
        what = "disk full" if self.errno == errno.ENOSPC else "disk quota exceeded"
        needs = f" (needs ~{megabytes(self.needs)})" if self.needs else ""
        return f"{what} while writing {self.path}: free space on {mount_point(self.path)}{needs} and {self.way_out}"

    def __reduce__(self):
        return type(self), (self.path, self.needs, self.way_out, self.errno)

    def carry_on(self, way_out: str, needs: int | None = None, path: str | os.PathLike | None = None) -> DiskFull:
        """The same error with another way out (and what the whole operation needs, or the file's
        name as the caller knows it)."""
        return DiskFull(self.path if path is None else path, needs or self.needs, way_out, self.errno)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the file system is out of space or quota: an OSError with errno
    ENOSPC/EDQUOT, or safetensors' ``SafetensorError`` ("… (os error 28)"), which is no OSError."""
    if isinstance(e, OSError):
        return e.errno in CODES
    return type(e).__name__ == "SafetensorError" and any(f"(os error {c})" in str(e) for c in CODES)


def _code(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno in CODES:
        return e.errno
    return errno.EDQUOT if f"(os error {errno.EDQUOT})" in str(e) else errno.ENOSPC


@contextmanager
def naming(path: str | os.PathLike, needs: int | None = None, *,
           within: str | os.PathLike | None = None) -> Iterator[None]:
    """Re-raise running out of space inside the block as :class:`DiskFull` naming ``path``, or
    the file the failed call names when it lies in the folder ``within``. A ``DiskFull`` from a
    nested write keeps its own, more precise name."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        named = getattr(e, "filename", None)
        inside = within is not None and named is not None and Path(named).is_relative_to(within)
        raise DiskFull(named if inside else path, needs, code=_code(e)) from e


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system holding ``path`` (which need not exist)."""
    p = Path(os.path.realpath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 // 10 else f"{max(n, 1) / 2**10:.0f} KB"
