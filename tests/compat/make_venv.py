"""Build (once) and reuse the "compat" virtual environment: the older stack dorabooth supports.

Stock diffusers on the newest stack (transformers 5) drops text-encoder DoRA magnitudes
when loading (docs/upstream-te-dora.md). The text-encoder half of the interop checks is
therefore proven on the older stack pinned below, where the stock round trip is exact.

Usage (from the repository root): ``python tests/compat/make_venv.py`` prints the path of
the venv's python. The venv lives in ``.venv-compat/`` (git-ignored) and is rebuilt only
when ``PINS`` change; a stamp file written last marks a complete build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
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


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def ensure_venv(venv: Path = VENV) -> Path:
    """Return the compat venv's python, building the venv first if it is missing or stale."""
    wanted = "\n".join([TORCH, *PINS]) + "\n"
    stamp = venv / STAMP_NAME
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / f"dorabooth-compat-{hashlib.sha1(str(venv).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait, then reuse
        if stamp.is_file() and stamp.read_text() == wanted and venv_python(venv).exists():
            return venv_python(venv)
        if venv.exists():
            shutil.rmtree(venv)
        _run([sys.executable, "-m", "venv", str(venv)])
        py = str(venv_python(venv))
        _run([py, "-m", "pip", "install", "-q", TORCH])
        _run([py, "-m", "pip", "install", "-q", *PINS])
        stamp.write_text(wanted)
    return venv_python(venv)


if __name__ == "__main__":
    print(ensure_venv())
