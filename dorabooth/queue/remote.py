"""Workspaces on an object store (issue 15): ``--workspace s3://bucket/ws`` (or ``gs://``, or any
fsspec URL; ``file:///path`` and ``memory://`` in tests).

The queue's records and cancel requests are objects under ``WORKSPACE/queue/`` (each written
whole: one PUT, which object stores make atomic). A run folder cannot be trained in place (the
trainer appends, renames and locks files), so an attempt trains in a local scratch folder and
:class:`RunMirror` keeps ``WORKSPACE/runs/<job>/`` a copy of it, in the same run-folder format:
after each checkpoint, each preview and at the end. Uploads go in an order that keeps what a
reader finds complete: a checkpoint's ``state.json`` after its other files, the result
(``adapter.safetensors`` or ``unet/``) last; checkpoints the trainer pruned are deleted only
after the newer one is up. An attempt on another machine (a retry after a worker died, or a
resume) first downloads the run with its complete checkpoints only, then continues it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .. import rundir as rd

SCRATCH_ENV = "DORABOOTH_SCRATCH"          # where attempts train (default: the system's temp folder)


def is_url(workspace) -> bool:
    return "://" in str(workspace)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of ``url``; a clear error when its package is missing."""
    import fsspec

    local = url.split("://", 1)[0] in ("file", "local")
    try:                                        # a local folder (tests) makes parents as an object store would
        return fsspec.core.url_to_fs(url, **({"auto_mkdir": True} if local else {}))
    except (ImportError, ValueError) as e:
        protocol = url.split("://", 1)[0]
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol)
        hint = f"pip install {extra} on every machine of the cluster" if extra else "use an fsspec URL"
        raise ValueError(f"workspace {url}: cannot open it ({e}); {hint}") from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def scratch_dir(job_id: str) -> Path:
    """The local folder an attempt at ``job_id`` trains in."""
    base = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()) / "dorabooth-scratch"
    return base / job_id


def _markers(rel: str) -> int:
    """Upload order: 0 plain files, 1 a checkpoint's state.json (completes it), 2 the result."""
    parts = rel.split("/")
    if parts[0] == rd.CHECKPOINTS and parts[-1] == rd.STATE:
        return 1
    if rel == rd.ADAPTER or parts[0] == rd.FULL_UNET:
        return 2
    return 0


def skipped(rel: str) -> bool:
    """What is never copied: temporaries, folders being written or deleted, the run's lock."""
    return any(p.startswith((".tmp", ".old-", ".deleted")) or p.endswith(".tmp") for p in rel.split("/")) \
        or rel == rd.LOCK


class RunMirror:
    """A local run folder (``local``) and its copy at ``url`` in the workspace."""

    def __init__(self, url: str, local: Path):
        self.url, self.local = url.rstrip("/"), Path(local)
        self.fs, self.root = filesystem(self.url)
        self.sent: dict[str, tuple[int, int]] = {}     # rel path → (size, mtime_ns) uploaded

    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def remote_files(self) -> list[str]:
        """Relative paths of the files of the copy (none if it does not exist)."""
        if not self.fs.exists(self.root):
            return []
        base = self.root.rstrip("/") + "/"
        return sorted(p[len(base):] for p in self.fs.find(self.root) if p.startswith(base))

    def download(self) -> bool:
        """Fill an empty local folder from the copy: every file but checkpoints without their
        ``state.json`` (an upload cut short). True if there was a run to continue."""
        files = self.remote_files()
        complete = {f.rsplit("/", 1)[0] for f in files if _markers(f) == 1}
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for rel in files:
            parts = rel.split("/")
            if parts[0] == rd.CHECKPOINTS and len(parts) > 2 and "/".join(parts[:2]) not in complete:
                continue
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._remote(rel), str(target))
            stat = target.stat()
            self.sent[rel] = (stat.st_size, stat.st_mtime_ns)
        return bool(files)

    def push(self) -> None:
        """Upload what changed since the last push, in marker order, then delete from the copy the
        checkpoints the trainer removed."""
        changed = []
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            if skipped(rel):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:                  # removed while we walked (a pruned checkpoint)
                continue
            if self.sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                changed.append((rel, (stat.st_size, stat.st_mtime_ns)))
        for rel, key in sorted(changed, key=lambda item: _markers(item[0])):
            try:
                self.fs.put_file(str(self.local / rel), self._remote(rel))
            except FileNotFoundError:
                continue
            self.sent[rel] = key
        kept = set(rd.checkpoint_steps(self.local))
        for rel in list(self.sent):
            parts = rel.split("/")
            if parts[0] == rd.CHECKPOINTS and len(parts) > 2 and not (self.local / rel).exists():
                step = parts[1].removeprefix("step-")
                if not step.isdigit() or int(step) not in kept:
                    self.fs.rm_file(self._remote(rel))
                    del self.sent[rel]


INPUTS_DIR = "inputs"                    # WORKSPACE/inputs/<job>/images/: a job's photos, uploaded at submit


def upload_inputs(root_url: str, job_id: str, config: dict) -> dict:
    """``config`` with its photos uploaded to ``WORKSPACE/inputs/<job>/images/`` (the workers do not
    see the submitter's disk) and ``images`` pointing there."""
    from ..data import list_images

    if config.get("class_images"):
        raise ValueError("in a workspace on an object store each run draws its class images into its own folder: "
                         "leave --class-images out")
    images = config.get("images")
    if not images or is_url(images):
        return config
    target = join(root_url, INPUTS_DIR, job_id, "images")
    fs, base = filesystem(target)
    for photo in list_images(images):
        fs.put_file(str(photo), f"{base}/{Path(photo).name}")
        caption = Path(photo).with_suffix(".txt")                  # a per-photo caption travels with it
        if caption.is_file():
            fs.put_file(str(caption), f"{base}/{caption.name}")
    return {**config, "images": target}


def local_inputs(config: dict, scratch: Path) -> dict:
    """``config`` for an attempt in ``scratch``: photos downloaded, the run folder local (``run/``)."""
    out = {**config, "out": str(scratch / "run")}
    if is_url(config.get("images") or ""):
        fs, base = filesystem(config["images"])
        folder = scratch / "images"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in fs.find(base):
            fs.get_file(path, str(folder / path.rsplit("/", 1)[-1]))
        out["images"] = str(folder)
    return out


def read_text(url: str) -> str | None:
    """A file of the workspace as text (None when it is not there)."""
    fs, path = filesystem(url)
    return fs.cat_file(path).decode() if fs.exists(path) else None


def relocate(run: Path, fields: dict) -> None:
    """A run downloaded onto another machine: its ``config.json`` names this machine's folders (the
    photos and the run are in another scratch folder here), so --resume finds the same recipe."""
    if not rd.is_run(run):
        return
    from ..formats.files import write_json

    data = rd.config_data(run)
    data["config"] = {**data["config"], "images": fields["images"], "out": fields["out"]}
    write_json(run / rd.CONFIG, data, indent=2)
