"""A test hook: kill this process with SIGKILL at a named write point (fault-injection tests).

``DORABOOTH_FAULT=<point>`` (or ``<point>:<detail>``) makes the process kill itself, as ``kill
-9`` would, the first time it reaches that point; unset (always, outside tests) it does nothing.
The points, in the order a run reaches them:

    rename:<path>       a file written by ``formats.files.atomic_file`` is complete under its
                        temporary name and about to be renamed onto <path> (class images,
                        samples, config.json, the final adapter.safetensors, ...)
    step:<step>         optimizer step <step> is taken, nothing written for it yet
    checkpoint:<step>   checkpoints/.tmp-step-<step>/ holds some of its files, not all
    rotation:<step>     checkpoints/step-<step>/ was renamed away to be deleted, not yet deleted

tests/test_faults.py kills a trainer at each and checks that ``--resume`` finishes with the
adapter an uninterrupted run writes, leaving no temporary behind.
"""

from __future__ import annotations

import os
import signal

ENV = "DORABOOTH_FAULT"


def reach(point: str, detail: object = "") -> None:
    """Die here (SIGKILL) when ``DORABOOTH_FAULT`` names this point (with or without its detail)."""
    wanted = os.environ.get(ENV)
    if wanted and wanted in (point, f"{point}:{detail}"):
        os.kill(os.getpid(), signal.SIGKILL)
