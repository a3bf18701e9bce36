"""What the app lets in: logins, the address it listens on, and uploaded files.

``dorabooth-ui`` refuses an address other computers can reach unless a login is required
(``--auth`` / ``--auth-file``, gradio's own login) or ``--insecure`` is given; an upload
event takes only files this server received through its own upload endpoint. The rest of
what a request can set is bounded where it is used (``ui.workspace``, ``ui.handlers``,
``dorabooth.config.TrainConfig``). docs/security.md says what is protected and what is not.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

from .workspace import MAX_IMAGES, UserError


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this computer only: localhost, 127.0.0.0/8, ::1."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False                                   # a host name: it may resolve to any address


def read_auth(pair: str | None, file: str | None) -> list[tuple[str, str]]:
    """The logins from ``--auth USER:PASS`` and ``--auth-file FILE`` (one USER:PASS a line; blank
    lines and ``#`` comments skipped); ValueError naming the flag, the line and the fix."""
    logins = [_login(pair, "--auth")] if pair is not None else []
    if file is not None:
        path = Path(file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--auth-file {file}: cannot read it ({e.strerror or e}); give a text file with one "
                             f"USER:PASS a line") from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                logins.append(_login(line.strip(), f"--auth-file {file} line {number}"))
        if not logins:
            raise ValueError(f"--auth-file {file}: no USER:PASS line in it; add one (e.g. alice:a-long-password)")
    return logins


def _login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError(f"{where}: write USER:PASS with a user name and a password, e.g. alice:a-long-password")
    return user.strip(), password


def check_exposure(host: str, logins: list, insecure: bool) -> None:
    """Refuse an address other computers can reach without a login, unless ``--insecure``."""
    if not logins and not insecure and not is_loopback(host):
        raise ValueError(f"--host {host} lets other computers reach the app, and it has no login: add --auth "
                         f"USER:PASS (or --auth-file FILE), or add --insecure to serve it without one anyway")


def private_upload_folder() -> Path | None:
    """Give this app an upload folder of its own (mode 0700) unless ``$GRADIO_TEMP_DIR`` names
    one: gradio's default, ``<tmp>/gradio``, is shared by every gradio app of every user of this
    computer, and each of them serves any file in it. Call before the page is built; the caller
    removes the folder on exit."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        return None
    folder = Path(tempfile.mkdtemp(prefix="dorabooth-ui-uploads-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def received_uploads(demo, files) -> list[str]:
    """``files`` (paths gradio hands to the upload event), each checked to be a file this server
    received through its own upload endpoint; UserError, and nothing taken, otherwise.

    A request names its files by server path. Gradio refuses paths outside its upload folder,
    but that folder also holds copies of the files the app shows (and, when it is gradio's
    shared default, other apps' files); so a path must, with symlinks resolved, lie inside it
    and be one of the files uploaded to this server (``demo.upload_file_set``).
    """
    from gradio.utils import get_upload_folder

    if len(files) > MAX_IMAGES:
        raise UserError(f"{len(files)} files at once: drop at most {MAX_IMAGES} photos (a subject holds at most "
                        f"{MAX_IMAGES})")
    folder = Path(os.path.realpath(get_upload_folder()))
    paths = [str(f) for f in files]
    for path in paths:
        real = Path(os.path.realpath(path))
        if (os.path.abspath(path) not in demo.upload_file_set or os.path.islink(path)
                or not real.is_relative_to(folder) or not real.is_file()):
            raise UserError(f"{Path(path).name} was not uploaded through this page, so it was not taken (nor any "
                            f"file of this drop): drop your photos on the box")
    return paths
