"""``dorabooth-ui --cluster ADDR --workspace s3://bucket/ws`` (issue 15): the app on a workspace in an
object store (any fsspec URL: ``gs://``, ``file:///path`` in tests), through a local mirror of it.

The store holds the app's layout (``<subject>/runs/<run>/``: the usual run folders) beside the
queue's (``queue/``, ``inputs/``). The cluster's workers train each run in a scratch folder of
their own and copy it there (``dorabooth.queue.remote.RunMirror``). The app never reads the
store's files in place: it works in a local folder, the *mirror* (``--mirror DIR``, default
``~/.cache/dorabooth/workspaces/<hash of the URL>``), an ordinary :class:`~ui.workspace.Workspace`
in which

- subjects and their photos live (each queued run sends its photos to the store:
  ``remote.upload_inputs``, as ``dorabooth queue submit`` does);
- a new run's folder is made, and its request goes to the store when it is queued
  (:meth:`StoreWorkspace.submitting`): from then on the store has the run;
- the runs listed are the store's (:meth:`~StoreWorkspace.runs` brings down their small top-level
  files), and the run opened (:meth:`~StoreWorkspace.run`: on open and on each page tick) is
  brought down whole but for what only training reads (checkpoints' optimizer state, class
  images); a file is downloaded only when the store's copy is new or changed, under a temporary
  name then renamed, and ``config.json`` is pointed at the mirror's folders (``remote.relocate``).

The store is the truth: a folder only in the mirror (a run whose queueing failed, one deleted from
the store) is never listed or opened, and a mirror that is stale or empty after a restart is filled
again from the store (what was brought down is remembered per process: after a restart each run
is downloaded once more when first listed or opened).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.formats.files import atomic_file
from dorabooth.queue.remote import filesystem, is_url, join, relocate, skipped

from .workspace import REQUEST_FILE, Subject, UserError, Workspace, sanitize_name

TRAINING_ONLY = (rd.OPTIMIZER, rd.TRAINABLE)     # a checkpoint's files that only resuming reads (on a worker)


def default_mirror(url: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dorabooth" / "workspaces" / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]


def open_workspace(workspace: str | os.PathLike, *, cluster: str | None = None,
                   mirror: str | os.PathLike | None = None) -> Workspace:
    """The app's workspace: a folder, or (with a cluster to train there) a store's URL through a mirror."""
    if not is_url(workspace):
        return Workspace(workspace)
    check_store(workspace, cluster)
    return StoreWorkspace(str(workspace), mirror or default_mirror(str(workspace)))


def check_store(workspace: str | os.PathLike, cluster: str | None) -> None:
    """UserError for a workspace on an object store without a cluster: nothing would train there."""
    if is_url(workspace) and not cluster:
        raise UserError(f"--workspace {workspace}: runs in a workspace on an object store are trained by a "
                        f"cluster's workers; add --cluster ADDR (docs/scaling.md), or give a folder")


class StoreWorkspace(Workspace):
    """The workspace at ``url``, read and written through the local folder ``mirror``."""

    def __init__(self, url: str, mirror: str | os.PathLike):
        super().__init__(mirror)
        self.url = url.rstrip("/")
        self.fs, base = filesystem(self.url)
        self.base = base.rstrip("/")
        self._pulled: dict[str, tuple] = {}       # path in the mirror → the store's (size, time) of the copy here
        self._lock = threading.Lock()             # page ticks of several tabs at once

    def at(self, folder: str | os.PathLike) -> StoreWorkspace:
        """The workspace of a folder inside this one (a login's ``users/<user>``), in the store and here."""
        return StoreWorkspace(self.url_of(folder), folder)

    # ---- paths -----------------------------------------------------------------------------
    def url_of(self, path: str | os.PathLike) -> str:
        """The store's URL of a file or folder of the mirror."""
        inside = self._inside(path)
        return join(self.url, inside) if inside != "." else self.url

    def _inside(self, path: str | os.PathLike) -> str:
        """``path`` (in the mirror) relative to the workspace, as the store names it."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def local_of(self, url: str) -> Path:
        """The mirror's path of a URL in the store (a job's run folder)."""
        if not str(url).startswith(self.url + "/"):
            raise ValueError(f"{url} is not in the workspace {self.url}")
        return self.root / str(url)[len(self.url) + 1:]

    def _rel(self, store_path: str) -> str:
        return store_path[len(self.base) + 1:]

    # ---- runs --------------------------------------------------------------------------------
    def runs(self, name: str | None = None) -> list[Path]:
        """The store's run folders (of one subject, or of all), newest first, with their small
        top-level files (request, config, events) brought down."""
        subject = sanitize_name(name, "subject name") if name else "*"
        files = {p: i for p, i in self.fs.glob(f"{self.base}/{subject}/runs/*/*", detail=True).items()
                 if i.get("type") == "file"}
        listed = {p.rsplit("/", 1)[0] for p in files if p.rsplit("/", 1)[1] in (REQUEST_FILE, rd.CONFIG)}
        self._fetch({p: i for p, i in files.items() if p.rsplit("/", 1)[0] in listed
                     and not p.endswith("/" + rd.ADAPTER)})
        found = sorted((self.root / self._rel(r) for r in listed), key=lambda p: p.name, reverse=True)
        order = {s: k for k, s in enumerate(self.subjects())}       # as Workspace.runs: subjects changed last first
        return sorted(found, key=lambda p: (order.get(p.parent.parent.name, len(order)), p.parent.parent.name))

    def run(self, ref: str) -> Path:
        """The run folder for ``subject/run``, brought up to date from the store."""
        path = self.run_path(ref)
        if not self.pull(path):
            raise UserError(f"no run called {ref!r} in the workspace {self.url}")
        return path

    def pull(self, run: Path) -> bool:
        """Bring down what changed in the store's copy of ``run`` (not a checkpoint's optimizer state,
        not one whose upload is unfinished, not class images); False if the store has no such run."""
        rel_run = self._inside(run)
        files = {p: i for p, i in self.fs.find(f"{self.base}/{rel_run}", detail=True).items()
                 if i.get("type") == "file"}
        inside = {p: p[len(self.base) + len(rel_run) + 2:] for p in files}       # path inside the run folder
        if not any(rel in (REQUEST_FILE, rd.CONFIG) for rel in inside.values()):
            return False
        complete = {rel.rsplit("/", 1)[0] for rel in inside.values()
                    if rel.startswith(rd.CHECKPOINTS + "/") and rel.endswith("/" + rd.STATE)}
        self._fetch({p: i for p, i in files.items() if _wanted(inside[p], complete)})
        return True

    def _fetch(self, files: dict[str, dict]) -> None:
        """Download each of ``files`` (store path → its info) that is not here as the store has it."""
        with self._lock:
            for path, info in sorted(files.items(), key=lambda item: _result(item[0])):    # the result last
                rel = self._rel(path)
                stamp = (info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("updated")
                                                or info.get("ETag") or info.get("created")))
                target = self.root / rel
                if self._pulled.get(rel) == stamp and target.is_file():
                    continue
                with atomic_file(target) as tmp:
                    self.fs.get_file(path, str(tmp))
                self._pulled[rel] = stamp
                if target.name == rd.CONFIG and len(rel.split("/")) == 4:     # <subject>/runs/<run>/config.json
                    relocate(target.parent, {"images": str(target.parents[2] / "images"), "out": str(target.parent)})

    def _run_names(self, subject: Subject) -> list[str]:
        """The mirror's and the store's: a new run never takes the number of one the mirror lacks."""
        stored = [p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.base}/{subject.name}/runs/*")]
        return super()._run_names(subject) + stored

    def submitting(self, run: Path, fields: dict) -> dict:
        """A queued run's job fields (``fields``: its TrainConfig's): its request put in the store (the
        store has the run from now on), its folder the store's; it draws its class images into that
        folder (the workers do not see the mirror's)."""
        request = Path(run) / REQUEST_FILE
        self.push(request)
        return {**fields, "out": self.url_of(run), "class_images": None}

    def push(self, path: Path) -> None:
        """One file of the mirror to the store (an event the app writes itself)."""
        self.fs.put_file(str(path), f"{self.base}/{self._inside(path)}")

    def rename_run(self, run: Path, name: str) -> Path:
        raise UserError(f"runs in a workspace on an object store ({self.url}) keep their names: an object store "
                        f"cannot rename a folder")

    def delete_run(self, run: Path) -> None:
        """Out of the store first (its request and config before the rest: it is no longer listed), then here."""
        base = f"{self.base}/{self._inside(run)}"
        for marker in (REQUEST_FILE, rd.CONFIG):
            if self.fs.exists(f"{base}/{marker}"):
                self.fs.rm_file(f"{base}/{marker}")
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)
        super().delete_run(run)


def _wanted(rel: str, complete: set[str]) -> bool:
    """Whether the app needs the file ``rel`` of a run folder (``complete``: the checkpoints uploaded whole)."""
    parts = rel.split("/")
    if skipped(rel) or parts[0] == rd.CLASS:
        return False
    if parts[0] == rd.CHECKPOINTS:
        return "/".join(parts[:2]) in complete and parts[-1] not in TRAINING_ONLY and not parts[-1].startswith("rng-")
    return True


def _result(path: str) -> bool:
    return path.endswith("/" + rd.ADAPTER) or f"/{rd.FULL_UNET}/" in path
