"""What the app lets in (issue 13 #1, #2): logins, the address it listens on, uploads only from
this server's own upload endpoint, and the bounds on what a request can set, checked against a
live ``dorabooth-ui`` on loopback through ``gradio_client`` (docs/security.md)."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from ui_fixtures import call_event as _call
from ui_fixtures import make_photos, serve_app
from ui_fixtures import upload_files as _upload

from ui import app
from ui.security import is_loopback, read_auth
from ui.workspace import UserError, Workspace

gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
LOGIN = ("alice", "correct horse battery")


# ---- the command line: refused before anything is loaded, made or served -------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com"])
def test_an_open_address_without_a_login_is_refused(tmp_path, capsys, host):
    workspace = tmp_path / "ws"
    assert app.main(["--host", host, "--workspace", str(workspace), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --host {host} lets other computers reach the app")
    assert "--auth USER:PASS (or --auth-file FILE)" in err and "--insecure" in err
    assert not workspace.exists()                                   # no context, no server


def test_an_object_store_workspace_needs_a_cluster(capsys):
    assert app.main(["--workspace", "s3://bucket/ws"]) == 2
    assert "trained by a cluster's workers; add --cluster ADDR" in capsys.readouterr().err


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.9.8.7", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("10.0.0.1", False), ("myhost", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_logins_from_the_flag_and_the_file(tmp_path, capsys):
    file = tmp_path / "logins"
    file.write_text("# who may log in\nalice:pw:with:colons\n\n  bob:secret  \n")
    assert read_auth("carol:x", str(file)) == [("carol", "x"), ("alice", "pw:with:colons"), ("bob", "secret")]
    file.write_text("alice\n")
    for argv, message in [(["--auth", "alice"], "error: --auth: write USER:PASS"),
                          (["--auth", ":pw"], "error: --auth: write USER:PASS"),
                          (["--auth-file", str(file)], f"error: --auth-file {file} line 1: write USER:PASS"),
                          (["--auth-file", str(tmp_path / "none")],
                           f"error: --auth-file {tmp_path / 'none'}: cannot read it")]:
        assert app.main([*argv, "--workspace", str(tmp_path / "ws")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "ws").exists()


def test_the_upload_box_is_the_only_input_that_takes_files(tmp_path):
    """Every file-taking input goes through ``received_uploads``: today only the upload box does
    (a new gr.File / gr.Image / UploadButton input must be checked the same way, then listed here)."""
    import gradio as gr

    from ui import handlers as h

    ctx = h.make_context(tmp_path / "ws")
    try:
        demo = app.build(ctx)
    finally:
        ctx.close()
    kinds = (gr.File, gr.Image, gr.Gallery, gr.UploadButton, gr.Video, gr.Audio, gr.Model3D, gr.MultimodalTextbox,
             gr.ImageEditor, gr.Dataframe)
    taking = {(c.elem_id, fn.name) for fn in demo.fns.values() for c in fn.inputs if isinstance(c, kinds)}
    assert taking == {("db-upload", "on_upload")}


# ---- what the workspace holds ------------------------------------------------------------------
def test_uploads_and_subjects_are_bounded(tmp_path, monkeypatch):
    """Per subject (count, bytes), in the whole workspace (bytes, subjects), and texts: each
    refused with the limit in the message, nothing stored for it."""
    ws = Workspace(tmp_path / "ws")
    photos = make_photos(tmp_path / "up", n=4, size=64)
    size = photos[0].stat().st_size
    monkeypatch.setattr("ui.workspace.MAX_SUBJECT_BYTES", 2 * size + size // 2)
    results = ws.add_photos("rex", photos[:3])
    assert [r.stored for r in results[:2]] == ["photo-0.png", "photo-1.png"]
    assert "a subject's photos hold at most 0 MiB together" in results[2].problem
    monkeypatch.setattr("ui.workspace.MAX_SUBJECT_BYTES", 10**9)
    monkeypatch.setattr("ui.workspace.MAX_WORKSPACE_BYTES", ws.photo_bytes() + size // 2)
    [result] = ws.add_photos("other", photos[3:])
    assert "the workspace's photos hold at most" in result.problem and not list((ws.root / "other" / "images").iterdir())
    monkeypatch.setattr("ui.workspace.MAX_SUBJECTS", 2)
    with pytest.raises(UserError, match="the workspace holds at most 2 subjects"):
        ws.subject("third", create=True)
    assert sorted(ws.subjects()) == ["other", "rex"]
    with pytest.raises(UserError, match="the class noun is 501 characters long; use at most 500"):
        ws.save_subject("rex", token="sks", class_noun="d" * 501)


# ---- a live app with a login ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``dorabooth-ui --host 127.0.0.1 --auth alice:…`` with the toy model (starts in ~10 s)."""
    tmp = tmp_path_factory.mktemp("secure-app")
    with serve_app(tmp, "toy", "--auth", ":".join(LOGIN)) as (url, workspace):
        yield url, workspace / "users" / LOGIN[0], tmp            # a login's subjects and runs: tests/ui/test_users.py
    folders = list(Path(tempfile.gettempdir()).glob("dorabooth-ui-uploads-*"))
    assert not [f for f in folders if f in UPLOAD_FOLDERS], "the app's upload folder outlived it"


UPLOAD_FOLDERS: list[Path] = []             # the app's private upload folder, once seen


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[0], auth=LOGIN, verbose=False)


def _previews(outputs) -> list[str]:
    """Server paths of the crops an on_upload reply shows (copies in the app's upload folder)."""
    return [item["image"]["path"] for item in outputs[4]]


def _note(outputs) -> str:
    """The subject note: the last output of on_upload."""
    return outputs[-1] if isinstance(outputs[-1], str) else ""


def test_without_the_login_nothing_is_served(served):
    url, _, tmp = served
    with pytest.raises(ValueError, match="Could not login"):
        gradio_client.Client(url, auth=("alice", "wrong"), verbose=False)
    with pytest.raises(ValueError, match="credentials were not provided"):
        gradio_client.Client(url, verbose=False)
    assert httpx.get(url + "config").status_code == 401
    photo = make_photos(tmp / "anon", n=1)[0]
    with open(photo, "rb") as f:
        upload = httpx.post(url + "gradio_api/upload", files=[("files", (photo.name, f))])
    assert upload.status_code == 401
    assert httpx.post(url + "gradio_api/call/on_upload", json={"data": ["x", [], "sks", "dog"]}).status_code == 401


@pytest.fixture
def cache_file(served, client):
    """A photo inside the app's upload folder that this server never received (as a file another
    session's request left there would be): gradio's own check lets it through, ours must not."""
    _, outputs = _call(client, "/on_upload", ["cache-probe", _upload(client, make_photos(served[2] / "p", n=1)),
                                              "sks", "dog"])
    folder = Path(_previews(outputs)[0]).parent.parent / f"not-uploaded-{uuid.uuid4().hex}"
    yield make_photos(folder, n=1, seed=7)[0]
    shutil.rmtree(folder, ignore_errors=True)


def test_the_app_starts_without_the_libraries_chatter(served):
    """Like the command line, dorabooth-ui shows the libraries' errors only (--verbose: all); a
    new user's terminal showed 7 lines of bitsandbytes/torchao/torch warnings before the URL."""
    log = (served[2] / "app.log").read_text()
    assert "Running on local URL" in log
    noise = [line for line in log.splitlines()
             if any(w in line for w in ("bitsandbytes", "torchao", "_pytree", "FutureWarning", "DeprecationWarning"))]
    assert not noise, noise


def test_the_app_keeps_uploads_in_a_folder_of_its_own(served, client):
    """gradio's default upload folder, <tmp>/gradio, is shared by every gradio app on the computer
    (and each serves any file in it); the app uses a private one, removed when it stops."""
    _, outputs = _call(client, "/on_upload", ["own", _upload(client, make_photos(served[2] / "own", n=1, seed=41)),
                                              "sks", "dog"])
    folder = Path(_previews(outputs)[0]).parent.parent                  # <upload folder>/<hash>/crop.png
    assert folder.name.startswith("dorabooth-ui-uploads-") and (folder.stat().st_mode & 0o777) == 0o700
    UPLOAD_FOLDERS.append(folder)


@pytest.mark.parametrize("where", ["outside", "in-cache", "symlink-in-cache"])
def test_a_path_that_was_never_uploaded_is_refused(served, client, cache_file, where):
    """issue 13 #1: the upload event copied any server image named in the request into the
    workspace, which then served it. Now: refused with a note, nothing copied, nothing served."""
    url, workspace, tmp = served
    foreign = make_photos(tmp / f"secret-{where}", n=1, seed=11)[0]
    path = {"outside": foreign, "in-cache": cache_file, "symlink-in-cache": cache_file.parent / "link.png"}[where]
    if where == "symlink-in-cache":
        path.symlink_to(foreign)
    subject = f"victim-{where}"
    file_data = {"path": str(path), "orig_name": "holiday.png", "meta": {"_type": "gradio.FileData"}}
    kind, outputs = _call(client, "/on_upload", [subject, [file_data], "sks", "dog"])
    refused = kind == "error" and "not uploaded by a user" in outputs["error"]     # gradio's own check
    assert refused or "was not uploaded through this page" in _note(outputs), outputs
    assert not (workspace / subject).exists()                          # nothing copied, no subject made
    assert not any(p.read_bytes() == foreign.read_bytes() for p in workspace.rglob("*.png"))
    if where == "in-cache":
        assert not refused                                             # the case gradio alone lets through
    else:                           # (gradio serves its upload folder, which is the app's own, to a logged-in user)
        served_file = httpx.get(url + f"gradio_api/file={path}", cookies=client.cookies, timeout=30)
        assert served_file.status_code == 403                          # and not served


def test_genuine_uploads_work_and_the_apps_own_files_cannot_be_resubmitted(served, client):
    _, workspace, tmp = served
    photos = make_photos(tmp / "mine", n=3, seed=21)
    kind, outputs = _call(client, "/on_upload", ["rex", _upload(client, photos), "sks", "dog"])
    assert kind == "complete" and "Added 3 photos" in outputs[3]
    assert sorted(p.name for p in (workspace / "rex" / "images").iterdir()) == [f"photo-{i}.png" for i in range(3)]
    crop = _previews(outputs)[0]                     # a file the app put in its upload folder to show it
    assert os.path.isfile(crop)
    kind, outputs = _call(client, "/on_upload", ["rex", [{"path": crop, "meta": {"_type": "gradio.FileData"}}],
                                                 "sks", "dog"])
    assert kind == "complete" and "was not uploaded through this page" in _note(outputs)
    assert len(list((workspace / "rex" / "images").iterdir())) == 3
    kind, outputs = _call(client, "/on_upload", ["rex", _upload(client, make_photos(tmp / "many", n=21)), "sks",
                                                 "dog"])
    assert "21 files at once: drop at most 20 photos" in _note(outputs)


FORM = {"preset": "balanced", "method": "DoRA (recommended)", "use": "Not sure", "rank": 4, "steps": 10,
        "lr": 1e-3, "prior_preservation": True, "class_images": 10, "train_text_encoders": True, "seed": 0,
        "instance_prompt": "", "precision": "auto", "checkpointing": "auto", "optimizer": "auto", "buckets": False,
        "targets": "attn", "quantize_base": "none", "pivotal": False}                  # ui/app.py's c.form, in its order


@pytest.mark.parametrize("change, message", [
    ({"steps": 10**9}, "steps 1000000000: train at most 100000 steps (the range is 1–100000"),
    ({"rank": 10**6}, "rank 1000000: use a rank of at most 1024 (the range is 1–1024"),
    ({"class_images": 10**7}, "num_class_images 10000000: use at least 1 and at most 10000"),
    ({"lr": 1e300}, "lr 1e+300: use a positive number of at most 1 (the range is (0, 1]"),
    ({"lr": 0}, "lr 0.0: use a positive number of at most 1 (the range is (0, 1]"),
])
def test_training_settings_out_of_range_are_refused_in_the_note(served, client, change, message):
    """issue 13 #2: the probe queued 1e9 steps, rank 1e6, 1e7 class images, lr 1e300 (and lr 0
    is no preset's value in disguise): each is refused, the note states the range, nothing queued."""
    _, workspace, tmp = served
    if not (workspace / "bounds" / "images").is_dir():
        _call(client, "/on_upload", ["bounds", _upload(client, make_photos(tmp / "b", n=3, seed=31)), "sks", "dog"])
    kind, outputs = _call(client, "/on_start", ["bounds", "sks", "dog", *{**FORM, **change}.values()])
    assert kind == "complete" and message in outputs[-1], outputs
    assert not (workspace / "bounds" / "runs").exists() or not list((workspace / "bounds" / "runs").iterdir())
