"""What the command line says when an import fails, instead of a traceback: which ``dorabooth``
this Python loaded (often the ``dorabooth/`` folder of a checkout in the current directory,
which ``python -m dorabooth`` puts ahead of any installed copy), what it could not import,
whether dorabooth is installed for this Python, and the fix.

Standard library only: it has to work in a Python that has none of dorabooth's dependencies.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = "dorabooth"


def explain_import_error(error: ImportError) -> str:
    """What happened and how to fix it, for an ImportError raised while dorabooth ran."""
    here = Path(os.path.abspath(__file__)).parent         # the dorabooth that is running (links not resolved)
    shadowing = _same(here.parent, Path.cwd())
    installed = _installed()
    missing = error.name or ""
    if missing == PACKAGE or missing.startswith(PACKAGE + "."):
        what = f"the dorabooth package in {here} is incomplete or from another version ({error})"
    else:
        what = f"this Python ({sys.executable}) cannot import {missing.split('.')[0]} ({error}), which dorabooth needs"
    where = f"dorabooth was loaded from {here}"
    if shadowing:
        where += (": the dorabooth/ folder in the current directory, which `python -m dorabooth` puts ahead of "
                  "any installed copy")
    where += f". {installed or 'dorabooth is not installed for this Python'}."
    fixes = []
    if shadowing and installed:
        fixes.append("run it from another folder, or use the `dorabooth` command, to get the installed copy")
    if missing.startswith(PACKAGE):
        fixes.append("update or re-clone the checkout, then `pip install -e .` in it")
    else:
        fixes.append("run it with the Python of the environment you installed dorabooth into (e.g. "
                     "`. .venv/bin/activate`)")
        fixes.append('install it into this one: `pip install torch==2.13.0 && pip install -e ".[ui]"` in the checkout')
    return f"{what}.\n{where}\nFix: {'; or '.join(fixes)}. (DORABOOTH_DEBUG=1 shows the traceback.)"


def _installed() -> str | None:
    """Whether this Python has dorabooth installed, in words ("… 0.1.0 installed (editable,
    from /src)"), or None."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    where = ""
    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        if url.get("dir_info", {}).get("editable"):
            where = f" (editable, from {url['url'].removeprefix('file://')})"
    except (ValueError, KeyError, AttributeError):
        pass
    if not where:
        where = f" (in {dist.locate_file(PACKAGE)})"
    return f"This Python has dorabooth {dist.version} installed{where}"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
