"""A shared deployment (issue 15): each login has a workspace of its own, and limits.

With logins (``--auth`` / ``--auth-file``) every user's subjects, photos and runs live in
``WORKSPACE/users/<user>/``, a :class:`ui.workspace.Workspace` of its own: the handlers see only
that folder, so a user cannot list, open, stop, export or delete another's runs, and the page
serves no file from another user's folder (:class:`OwnFilesOnly`). The training line is shared
(one worker, or the cluster), each user sees their own runs in it (:class:`UserLine`).
``--shared-workspace`` keeps the old behaviour: every login sees one workspace.

:class:`Limits` bound what one workspace (one user's, or the shared one) may hold: runs
training or waiting (``--max-queued``), and bytes on disk (``--disk-quota``), checked before
anything is added (photos, a run, generated images, an export). A run is checked before it
starts, not while it trains: it can go over by its own size (docs/scaling.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .workspace import UserError

USERS_DIR = "users"               # WORKSPACE/users/<user>/: one workspace per login
MAX_QUEUED = 10                   # runs training or waiting at once, per workspace (a script cannot queue thousands)


@dataclass(frozen=True)
class Limits:
    max_queued: int = MAX_QUEUED           # runs training or waiting at once
    disk_bytes: int | None = None          # bytes the workspace may hold (None: no quota)


def user_folder_name(user: str) -> str:
    """The folder of ``user`` under ``WORKSPACE/users``: its name with anything but letters,
    digits, ``.``, ``_`` and ``-`` replaced by ``_`` (``alice``, ``bob_smith``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", user.strip())[:64]
    if not name.strip("._-"):
        raise ValueError(f"login {user!r}: use a user name with a letter or digit")
    return name


def user_root(workspace: str | os.PathLike, user: str) -> Path:
    return Path(workspace).expanduser().resolve() / USERS_DIR / user_folder_name(user)


def check_logins(logins: list[tuple[str, str]]) -> None:
    """ValueError if two logins would share a folder (``bob smith`` and ``bob_smith``) or repeat."""
    seen: dict[str, str] = {}
    for user, _ in logins:
        folder = user_folder_name(user)
        if folder in seen:
            raise ValueError(f"logins {seen[folder]!r} and {user!r} would share the folder users/{folder}: give "
                             f"them names that differ in letters or digits")
        seen[folder] = user


def used_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:                          # removed while we walked
                pass
    return total


def check_disk(folder: Path, limits: Limits, adding: int = 0, *, what: str = "this") -> None:
    """UserError if the workspace at ``folder`` holds its quota already (or would, with ``adding``
    bytes more), naming what it holds and what to delete."""
    if limits.disk_bytes is None:
        return
    used = used_bytes(folder)
    if used + adding > limits.disk_bytes:
        more = f" and {what} needs {_size(adding)} more" if adding else ""
        raise UserError(f"your workspace holds {_size(used)} of its {_size(limits.disk_bytes)} quota{more}: delete "
                        f"runs you no longer need (Train tab → Delete) or ask the operator for a larger --disk-quota, "
                        f"then try again")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class UserLine:
    """One user's view of the shared in-process training line: the same worker, but ``line``
    lists only the runs in the user's folder (positions stay those of the whole line)."""

    def __init__(self, worker, root: Path):
        self.worker, self.root = worker, Path(root)

    def submit(self, run, config) -> int:
        return self.worker.submit(run, config)

    def position(self, run) -> int | None:
        return self.worker.position(run)

    def events(self, run) -> list[dict] | None:
        return self.worker.events(run)

    def stop(self, run) -> str:
        return self.worker.stop(run)

    def line(self) -> list[Path]:
        return [run for run in self.worker.line() if run.is_relative_to(self.root)]

    @property
    def busy(self) -> bool:
        return bool(self.line())

    def close(self, timeout: float = 30.0) -> None:    # the app closes the shared worker once
        pass


class OwnFilesOnly:
    """ASGI middleware: a file under ``WORKSPACE/users/`` is served only to the user whose folder
    it is in (gradio serves every file of ``allowed_paths`` to any logged-in user)."""

    def __init__(self, app, workspace: str | os.PathLike):
        self.app = app
        self.users = Path(workspace).expanduser().resolve() / USERS_DIR

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "/file=" in scope.get("path", ""):
            target = Path(os.path.realpath(scope["path"].split("/file=", 1)[1]))
            if target.is_relative_to(self.users):
                user = _logged_in_user(scope)
                if user is None or not target.is_relative_to(self.users / user_folder_name(user)):
                    from starlette.responses import PlainTextResponse

                    await PlainTextResponse("not your file", status_code=403)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _logged_in_user(scope) -> str | None:
    """The user gradio's login cookie names (as gradio's own ``/user`` route reads it)."""
    from starlette.requests import Request

    app = scope.get("app")
    cookie_id = getattr(app, "cookie_id", None)
    if cookie_id is None:
        return None
    cookies = Request(scope).cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return app.tokens.get(token) if token else None
