"""``ui.store``: the app's mirror of a workspace on an object store (a ``file://`` URL here: the same
fsspec calls as ``s3://``, and no file of the store is read through a local path). The store's run
is put there as a worker puts it (``queue.remote.RunMirror.push`` of a scratch run folder)."""

import json
from pathlib import Path

import pytest

from dorabooth.formats.files import write_json
from dorabooth.queue.remote import RunMirror
from ui.store import StoreWorkspace
from ui.workspace import REQUEST_FILE, UserError

REF = "rex/001-dora-quick"


def _scratch_run(folder: Path) -> Path:
    """A run folder as a worker's scratch copy has it mid-training."""
    write_json(folder / "config.json", {"config": {"images": "/scratch/job/images", "out": str(folder),
                                                   "token": "sks", "class_noun": "dog", "steps": 4}})
    (folder / "events.jsonl").write_text(json.dumps({"type": "start", "step": 0, "total": 4}) + "\n")
    (folder / REQUEST_FILE).write_text(json.dumps({"settings": {"preset": "quick"}}))
    for rel, data in {"samples/step-2/00.png": b"png2", "checkpoints/step-2/state.json": b"{}",
                      "checkpoints/step-2/adapter.safetensors": b"a2", "checkpoints/step-2/optimizer.safetensors":
                      b"o2", "class/000.png": b"class", "adapter.safetensors": b"final", ".training.lock": b"1"}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


@pytest.fixture
def store(tmp_path):
    """(URL, the worker's RunMirror, its scratch folder) of a store holding one run of subject rex."""
    url = (tmp_path / "store").as_uri()
    scratch = _scratch_run(tmp_path / "scratch" / "run")
    worker = RunMirror(f"{url}/{REF.replace('/', '/runs/')}", scratch)
    worker.push()
    partial = tmp_path / "store" / "rex" / "runs" / "001-dora-quick" / "checkpoints" / "step-4"
    partial.mkdir(parents=True)                           # an upload cut short: no state.json
    (partial / "adapter.safetensors").write_bytes(b"a4")
    return url, worker, scratch


def _downloads(ws, monkeypatch) -> list[str]:
    got = []
    real = ws.fs.get_file
    monkeypatch.setattr(ws.fs, "get_file", lambda src, dst, **kw: got.append(src.split("001-dora-quick/")[-1])
                        or real(src, dst, **kw))
    return got


def test_the_runs_listed_and_opened_are_the_stores(store, tmp_path, monkeypatch):
    url, worker, scratch = store
    ws = StoreWorkspace(url, tmp_path / "mirror")
    ws.subject("rex", create=True)
    ghost = ws.new_run("rex", "ghost")                    # only in the mirror (its queueing failed)
    (ghost / REQUEST_FILE).write_text("{}")
    assert ghost.name == "002-ghost"                      # numbered after the store's run

    run = ws.root / "rex" / "runs" / "001-dora-quick"
    assert ws.runs() == ws.runs("rex") == [run]           # the ghost is not the store's
    assert {p.name for p in run.iterdir()} == {"config.json", "events.jsonl", REQUEST_FILE}   # small files first
    with pytest.raises(UserError, match="no run called 'rex/002-ghost'"):
        ws.run("rex/002-ghost")

    assert ws.run(REF) == run                             # opened: all the app reads
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert files == sorted(["adapter.safetensors", "checkpoints/step-2/adapter.safetensors",
                            "checkpoints/step-2/state.json", "config.json", "events.jsonl", REQUEST_FILE,
                            "samples/step-2/00.png"])
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["out"], config["images"]) == (str(run), str(ws.root / "rex" / "images"))   # this machine's
    assert ws.url_of(run) == f"{url}/rex/runs/001-dora-quick" and ws.local_of(ws.url_of(run)) == run

    got = _downloads(ws, monkeypatch)
    ws.run(REF)
    ws.runs()
    assert got == []                                      # nothing changed: nothing downloaded
    with (scratch / "events.jsonl").open("a") as f:       # the worker trains on and copies the run up
        f.write(json.dumps({"type": "sample", "step": 4, "paths": []}) + "\n")
    (scratch / "samples" / "step-4").mkdir()
    (scratch / "samples" / "step-4" / "00.png").write_bytes(b"png4")
    worker.push()
    ws.run(REF)
    assert sorted(got) == ["events.jsonl", "samples/step-4/00.png"]
    assert (run / "events.jsonl").read_bytes() == (scratch / "events.jsonl").read_bytes()


def test_a_restarted_app_takes_the_store_over_its_mirror(store, tmp_path):
    url, _, scratch = store
    mirror = tmp_path / "mirror"
    StoreWorkspace(url, mirror).run(REF)
    run = mirror / "rex" / "runs" / "001-dora-quick"
    (run / "events.jsonl").write_text("stale\n")          # a mirror left behind by another version, a crash…
    (run / "samples" / "step-2" / "00.png").unlink()

    again = StoreWorkspace(url, mirror)                   # the app restarted
    assert again.runs() == [run]
    assert (run / "events.jsonl").read_bytes() == (scratch / "events.jsonl").read_bytes()
    again.run(REF)
    assert (run / "samples" / "step-2" / "00.png").read_bytes() == b"png2"

    empty = StoreWorkspace(url, tmp_path / "new-machine")     # or on a machine with no mirror at all
    assert [empty.ref(r) for r in empty.runs()] == [REF]
    empty.subject("rex", create=True)
    assert empty.new_run("rex", "next").name == "002-next"


def test_deleting_a_run_deletes_it_in_the_store(store, tmp_path):
    url, _, _ = store
    ws = StoreWorkspace(url, tmp_path / "mirror")
    run = ws.run(REF)
    with pytest.raises(UserError, match="keep their names"):
        ws.rename_run(run, "better")
    ws.delete_run(run)
    assert not run.exists() and not (tmp_path / "store" / "rex" / "runs" / "001-dora-quick").exists()
    assert ws.runs() == []


def test_each_login_has_a_folder_of_its_own_in_the_store(store, tmp_path):
    """With logins (no --shared-workspace) a user's workspace is ``users/<user>`` in the store and in
    the mirror (``StoreWorkspace.at``, what ``Context.for_user`` uses): another user's runs are not
    theirs, and their job ids keep the user's folder (``ui.cluster.job_id``)."""
    from ui.cluster import job_id
    from ui.users import user_root

    url, _, _ = store
    ws = StoreWorkspace(url, tmp_path / "mirror")
    alice, bob = (ws.at(user_root(ws.root, u)) for u in ("alice", "bob"))
    assert (alice.url, alice.root) == (f"{url}/users/alice", ws.root / "users" / "alice")
    worker = RunMirror(f"{alice.url}/rex/runs/001-dora-quick", _scratch_run(tmp_path / "alice-scratch"))
    worker.push()
    assert [alice.ref(r) for r in alice.runs()] == [REF] and bob.runs() == []
    with pytest.raises(UserError, match="no run called"):
        bob.run(REF)
    run = alice.run(REF)
    assert run == ws.root / "users" / "alice" / "rex" / "runs" / "001-dora-quick"
    assert job_id(run, ws.root) == "users-alice-rex-001-dora-quick"
    assert [ws.ref(r) for r in ws.runs()] == [REF]                # the top level: the store's own rex only
