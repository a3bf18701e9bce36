"""The run folder's lock, its checkpoint listing and its leftovers (dorabooth/rundir.py), without
training: files laid out by hand as the trainer (or a killed one) leaves them."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dorabooth import rundir as rd
from dorabooth.rundir import LOCK, RunBusy, run_busy, run_lock

HOST = socket.gethostname()


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# ---- the lock ----------------------------------------------------------------------------------
def test_the_lock_holds_host_and_pid_and_leaves_nothing(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{HOST}:{os.getpid()}"
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]          # no temporary beside it
        assert run_busy(tmp_path) is None                                     # this process's own
        busy = f"being trained by another process \\({HOST}:{os.getpid()}\\)"
        with pytest.raises(RunBusy, match=busy), run_lock(tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_dead_owners_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(f"{HOST}:{dead_pid()}")
    assert run_busy(tmp_path) is None
    with run_lock(tmp_path):
        assert lock.read_text() == f"{HOST}:{os.getpid()}"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{HOST}:{live.pid}")
        assert run_busy(tmp_path) == f"{HOST}:{live.pid}"
        with pytest.raises(RunBusy, match=f"If nothing is training it, delete {lock}"), run_lock(tmp_path):
            pass
        assert lock.read_text() == f"{HOST}:{live.pid}"                        # left as it was
    finally:
        live.kill()
        live.wait()


def test_an_empty_lock_is_stale_after_a_few_seconds(tmp_path):
    """Older versions created the lock, then wrote it: a disk full or a kill in between left an
    empty file that counted as alive forever. Now one is busy only while it may be being written."""
    lock = tmp_path / LOCK
    lock.write_text("")
    with pytest.raises(RunBusy, match="unknown: the lock is empty"), run_lock(tmp_path):
        pass
    assert run_busy(tmp_path) == "unknown"
    old = time.time() - rd.EMPTY_LOCK_GRACE_S - 1
    os.utime(lock, (old, old))
    assert run_busy(tmp_path) is None
    with run_lock(tmp_path):
        assert lock.read_text() == f"{HOST}:{os.getpid()}"
    assert not lock.exists()


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")     # what e.g. a FAT or SMB mount answers
    monkeypatch.setattr(os, "link", no_links)
    with run_lock(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{HOST}:{os.getpid()}"
        with pytest.raises(RunBusy), run_lock(tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte (root only: skipped with the reason otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the full-disk lock case fills a small real file system)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mount / "run").mkdir()
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_lock_that_cannot_be_written_is_not_left_behind(full_disk):
    run = full_disk / "run"
    full = f"cannot write the lock {run / LOCK} .*free space on that disk"
    with pytest.raises(OSError, match=full), run_lock(run):
        pass
    assert list(run.iterdir()) == []                      # neither an empty lock nor its temporary
    (full_disk / "filler").unlink()                       # space freed: the same command works
    with run_lock(run):
        assert run_busy(run) is None and (run / LOCK).read_text() == f"{HOST}:{os.getpid()}"


# ---- checkpoints and leftovers -------------------------------------------------------------------
def checkpoint(run: Path, step: int, *files: str) -> Path:
    folder = run / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    for name in files or (*rd.RESUME_FILES, rd.ADAPTER):
        (folder / name).write_bytes(b"x")
    return folder


def test_only_complete_checkpoints_are_listed(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4, *rd.RESUME_FILES)                                  # no adapter file (method full)
    checkpoint(tmp_path, 6, rd.STATE, rd.ADAPTER, "rng-0.safetensors")          # half deleted: no tensors
    checkpoint(tmp_path, 8, rd.TRAINABLE, rd.OPTIMIZER)                         # no state.json
    assert rd.checkpoint_steps(tmp_path) == [2, 4]
    assert rd.checkpoint_steps(tmp_path, holding=rd.ADAPTER) == [2]
    assert rd.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-4"
    assert rd.has_progress(tmp_path)
    rd.remove_checkpoint(tmp_path, 2)
    rd.remove_checkpoint(tmp_path, 3)                                           # not there: nothing to do
    assert rd.checkpoint_steps(tmp_path) == [4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-6", "step-8"]


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    run, shared = tmp_path / "run", tmp_path / "class"
    checkpoint(run, 4)
    checkpoint(run, 6, rd.STATE)                                                 # incomplete
    (run / "checkpoints" / ".tmp-step-6").mkdir()
    (run / "checkpoints" / ".old-step-2").mkdir()
    dead, mine = dead_pid(), os.getpid()
    stale = [run / f".adapter.safetensors.tmp-{dead}", run / f".config.json.tmp-{dead}", run / f"{LOCK}.tmp-{dead}",
             run / "samples" / "step-4" / f".00.png.tmp-{dead}", run / "class" / f".class-00001.png.tmp-{dead}",
             shared / f".class-00003.png.tmp-{dead}"]
    kept = [run / f".adapter.safetensors.tmp-{mine}", run / "samples" / "step-4" / "00.png", run / ".hidden",
            shared / "class-00000.png", run / "instance" / "manifest.json"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (run / f".unet.old-{dead}").mkdir()                                          # atomic_folder's replaced folder
    removed = rd.remove_stale_temporaries(run, also=(shared,))
    assert sorted(map(str, removed)) == sorted(map(str, [*stale, run / f".unet.old-{dead}",
                                                         *(run / "checkpoints" / n for n in
                                                           (".tmp-step-6", ".old-step-2", "step-6"))]))
    assert all(p.exists() for p in kept) and not any(p.exists() for p in removed)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]


def test_finished_step_comes_from_the_result_and_the_last_done_event(tmp_path):
    events = tmp_path / rd.EVENTS
    events.write_text("".join(json.dumps(e) + "\n" for e in ({"type": "done", "steps": 4}, {"type": "start"},
                                                            {"type": "done", "steps": 6})))
    assert rd.finished_step(tmp_path, "dora") is None                            # no adapter.safetensors
    (tmp_path / rd.ADAPTER).write_bytes(b"x")
    assert rd.finished_step(tmp_path, "dora") == 6
    assert rd.finished_step(tmp_path, "full") is None                             # no unet/config.json
