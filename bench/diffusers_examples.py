"""diffusers' example training scripts, used as they are published: found, never committed.

The examples are not in diffusers' wheel nor its sdist, and this project's policy keeps other
projects' code out of this repository, so a benchmark takes them at run time: a path the
user gives, a cached copy (``~/.cache/dorabooth/diffusers-examples/<tag>/``, or under
``$DORABOOTH_CACHE``), a git clone of huggingface/diffusers (``git show <tag>:<path>``), or
GitHub at the tag of the installed diffusers. ``torchvision_path`` provides the one package
the dreambooth examples need that dorabooth does not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def diffusers_version() -> str:
    from importlib.metadata import version
    return version("diffusers")


def script_cache() -> Path:
    return Path(os.environ.get("DORABOOTH_CACHE") or Path.home() / ".cache" / "dorabooth") / "diffusers-examples"


def find_script(name: str, script: str | None = None, repo: str | None = None, tag: str | None = None) -> Path:
    """``examples/dreambooth/<name>``: ``script`` when given, else the cached copy for ``tag``
    (default: the installed diffusers' ``vX.Y.Z``), else taken from ``repo`` (a clone or mirror:
    ``git show TAG:PATH``) or downloaded from GitHub and kept in the cache."""
    if script:
        path = Path(script).expanduser()
        if not path.is_file():
            raise SystemExit(f"--diffusers-script {path}: no such file")
        return path
    tag = tag or f"v{diffusers_version()}"
    cached = script_cache() / tag / name
    if cached.is_file():
        return cached
    rel = f"examples/dreambooth/{name}"
    text = _from_git(repo, tag, rel) if repo else _from_github(tag, rel)
    if text is None:
        raise SystemExit(
            f"diffusers' {rel} at {tag} (the installed diffusers is {diffusers_version()}) was not found. Give it with "
            f"--diffusers-script PATH, or put it at {cached}, or pass --diffusers-repo GIT_DIR (a clone of "
            f"huggingface/diffusers: `git show {tag}:{rel}`) and, where that tag is missing, --diffusers-tag vX.Y.Z. "
            "The PyPI package and its sdist do not ship the examples.")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(text)
    print(f"diffusers' {name} at {tag} kept in {cached}", flush=True)
    return cached


def _from_git(repo: str, tag: str, rel: str) -> str | None:
    git_dir = Path(repo).expanduser()
    flag = ["--git-dir", str(git_dir / ".git" if (git_dir / ".git").exists() else git_dir)]
    proc = subprocess.run(["git", *flag, "show", f"{tag}:{rel}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout
    tags = subprocess.run(["git", *flag, "tag", "--list", "v0.*"], capture_output=True, text=True).stdout.split()
    print(f"{repo}: no {tag}:{rel} ({proc.stderr.strip()[:200]}); its newest tags: "
          f"{', '.join(sorted(tags, key=_version_key)[-4:])}", flush=True)
    return None


def _from_github(tag: str, rel: str) -> str | None:
    import urllib.request

    url = f"https://raw.githubusercontent.com/huggingface/diffusers/{tag}/{rel}"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.read().decode()
    except OSError as e:
        print(f"could not download {url}: {e}", flush=True)
        return None


def _version_key(tag: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in tag.lstrip("v").split("."))


def script_written_for(script: Path) -> str | None:
    """The diffusers version a script says it needs (``check_min_version("X")``)."""
    m = re.search(r'check_min_version\("([^"]+)"\)', script.read_text())
    return m.group(1) if m else None


def torchvision_path() -> Path | None:
    """Where the diffusers scripts find torchvision: None when this Python has it; else a folder
    it was installed into with pip (--no-deps: the wheel matching this torch; the venv is left
    as it is). The CPU torch cannot load PyPI's CUDA torchvision's C ops: diffusers_launch.py
    handles that."""
    from importlib.util import find_spec

    if find_spec("torchvision") is not None:
        return None
    from importlib.metadata import version

    torch_minor = int(version("torch").split(".")[1])
    folder = script_cache().parent / "real-scale-pydeps"
    if not (folder / "torchvision").is_dir():
        spec = f"torchvision==0.{torch_minor + 15}.*"       # torch 2.N pairs with torchvision 0.(N+15)
        print(f"installing {spec} for diffusers' script into {folder} (not into this environment) …", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), spec],
                       check=True)
    return folder
