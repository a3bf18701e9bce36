"""Build (once) and reuse the "compat" virtual environment: the older stack dorabooth supports.

Stock diffusers on the newest stack (transformers 5) drops text-encoder DoRA magnitudes
when loading (docs/upstream-te-dora.md). The text-encoder half of the interop checks is
therefore proven on the older stack pinned below, where the stock round trip is exact.

Usage (from the repository root): ``python tests/compat/make_venv.py`` prints the path of
the venv's python. The venv lives in ``.venv-compat/`` (git-ignored) and is rebuilt only
when ``PINS`` change; a stamp file written last marks a complete build. A build takes
minutes (2.5 on a busy 2-core machine with pip's cache warm, about 10 without); ``ensure_venv`` says what it is doing through
``log`` as it goes, with a line a minute while pip works, so that a test run is never silent.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("DORABOOTH_COMPAT_VENV", ROOT / ".venv-compat"))

# torch first, alone: `pip install torch==2.13.0` takes the local CPU wheel; a plain `torch`
# requirement resolved together with the rest could pull a multi-GB CUDA build instead.
TORCH = "torch==2.13.0"
PINS = [
    "transformers==4.57.6",
    "diffusers==0.39.0",
    "peft==0.21.2",
    "huggingface_hub<1.0",
    "accelerate>=1.0",
    "safetensors>=0.4.3",
    "numpy>=1.24",
    "pillow>=10.0",
    "pytest>=8",
]
STAMP_NAME = "dorabooth-compat-pins.txt"


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


HEARTBEAT_S = 60


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _run(cmd: list[str], what: str, log: Callable[[str], None]) -> None:
    """Run ``cmd``, saying what it does, a line every HEARTBEAT_S seconds while it runs, and how long it took."""
    log(f"compat venv: {what} …")
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    while True:
        try:
            proc.wait(timeout=HEARTBEAT_S)
            break
        except subprocess.TimeoutExpired:
            log(f"compat venv: still {what} ({_clock(time.monotonic() - start)} so far)")
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    log(f"compat venv: {what}: done in {_clock(time.monotonic() - start)}")


def ensure_venv(venv: Path = VENV, log: Callable[[str], None] = _say) -> Path:
    """Return the compat venv's python, building the venv first if it is missing or stale."""
    wanted = "\n".join([TORCH, *PINS]) + "\n"
    stamp = venv / STAMP_NAME
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / f"dorabooth-compat-{hashlib.sha1(str(venv).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"compat venv: another process is building {venv}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait, then reuse
        if stamp.is_file() and stamp.read_text() == wanted and venv_python(venv).exists():
            return venv_python(venv)
        log(f"compat venv: building {venv} once (the older stack: {', '.join(PINS[:3])}); 2–10 min on a "
            f"2-core machine (less with pip's cache warm), reused afterwards. DORABOOTH_SKIP_COMPAT=1 skips the "
            f"compatibility test")
        start = time.monotonic()
        if venv.exists():
            shutil.rmtree(venv)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the venv", log)
        py = str(venv_python(venv))
        _run([py, "-m", "pip", "install", "-q", TORCH], f"installing {TORCH}", log)
        _run([py, "-m", "pip", "install", "-q", *PINS], f"installing {len(PINS)} pinned packages", log)
        stamp.write_text(wanted)
        log(f"compat venv: ready in {_clock(time.monotonic() - start)}")
    return venv_python(venv)


if __name__ == "__main__":
    print(ensure_venv())
