"""A full disk and a busy run folder on the command line (issue 13 #5, #7): one ``error:`` line
naming the file and the way out, no traceback, nothing left behind (no ``*.tmp*``, no
``.tmp-step-N/``, no folder the failed write made), earlier checkpoints intact, and the run
continues with --resume once there is space.

The disk is a real one: a small tmpfs mounted for the test (root only; skipped with the reason
elsewhere), filled with a ballast file at the moment a case needs it and emptied again.
"""

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import diffusers  # noqa: F401  (imported first: cli.main then silences its bars here as in a fresh process)
import pytest
import torch

from dorabooth import cli
from dorabooth import rundir as rd
from dorabooth.diskfull import DiskFull, is_disk_full
from dorabooth.formats.files import atomic_file, atomic_folder, read_safetensors, write_bytes, write_safetensors
from tiny_runs import make_subject

REPO = Path(__file__).resolve().parent.parent
TOY = ["--class-noun", "dog", "--rank", "4", "--lr", "1e-3", "--no-train-text-encoders",
       "--num-class-images", "1", "--class-image-steps", "1", "--quiet"]


class SmallDisk:
    """A mounted 8 MB tmpfs; ``fill(leave)`` leaves ``leave`` bytes free, ``empty()`` frees it."""

    def __init__(self, path: Path):
        self.path = path
        self.ballast = path / "ballast"

    def fill(self, leave: int = 0) -> None:
        self.empty()
        size = shutil.disk_usage(self.path).free - leave
        fd = os.open(self.ballast, os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def empty(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the disk-full cases fill a small real file system)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Subject photos and one class image, on the ordinary disk, shared by the runs here."""
    root = tmp_path_factory.mktemp("diskfull")
    return {"images": make_subject(root / "subject"), "class": root / "class"}


def leftovers(root: Path) -> list[str]:
    """Temporaries and empty folders under ``root`` (the ballast aside)."""
    found = []
    for p in root.rglob("*"):
        if ".tmp" in p.name or (p.is_dir() and not any(p.iterdir())):
            found.append(str(p.relative_to(root)))
    return sorted(found)


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def fill_on(disk: SmallDisk, monkeypatch, when, leave: int) -> None:
    """Fill ``disk`` (leaving ``leave`` bytes) as soon as the trainer reports an event for which
    ``when(event)`` holds: the hook is the command line's own progress callback."""
    def reporter(args):
        def on_event(event):
            if when(event):
                disk.fill(leave)
        return on_event
    monkeypatch.setattr(cli, "_reporter", reporter)


def train(shared, run: Path, *extra: str) -> int:
    return cli.main(["train", "--images", str(shared["images"]), "--out", str(run), "--class-images",
                     str(shared["class"]), *TOY, *extra])


# ---- training --------------------------------------------------------------------------------
def test_a_checkpoint_that_does_not_fit_keeps_the_last_one_and_resume_continues(disk, shared, monkeypatch,
                                                                                capsys):
    """Space for checkpoint step-1 but not step-2 (the toy's checkpoint at rank 4: ~0.9 MB)."""
    run = disk.path / "run"
    fill_on(disk, monkeypatch, lambda e: e["type"] == "checkpoint" and e["step"] == 1, leave=64 * 1024)
    assert train(shared, run, "--steps", "3", "--checkpoint-every", "1") == 1
    line = one_error(capsys.readouterr().err)
    assert re.fullmatch(rf"error: disk full while writing {re.escape(str(run))}/checkpoints/\.tmp-step-2/"
                        rf"\w+(-0)?\.safetensors: free space on {re.escape(str(disk.path))} \(needs ~\d+(\.\d)? MB\) and "
                        rf"continue with --resume; the last complete checkpoint step-1 is kept", line), line
    assert leftovers(run) == [] and rd.checkpoint_steps(run) == [1]
    kept = rd.checkpoint_dir(run, 1)
    assert read_safetensors(kept / rd.OPTIMIZER)[0] and read_safetensors(kept / rd.ADAPTER)[0]

    disk.empty()
    monkeypatch.undo()
    assert train(shared, run, "--resume") == 0
    assert capsys.readouterr().out.strip() == str(run / rd.ADAPTER)
    assert leftovers(run) == [] and rd.checkpoint_steps(run) == [1, 2]


def test_a_sample_image_that_does_not_fit_leaves_no_png_temporary(disk, shared, monkeypatch, capsys):
    """The preview at the last step is the first write after the disk fills."""
    run = disk.path / "run"
    fill_on(disk, monkeypatch, lambda e: e["type"] == "step" and e["step"] == 2, leave=0)
    assert train(shared, run, "--steps", "2", "--checkpoint-every", "1") == 1
    line = one_error(capsys.readouterr().err)
    assert line == (f"error: disk full while writing {run}/samples/step-2/00.png: free space on {disk.path} and "
                    f"continue with --resume; the last complete checkpoint step-1 is kept")
    assert leftovers(run) == [] and not (run / rd.SAMPLES).exists() and not (run / rd.ADAPTER).exists()
    disk.empty()
    monkeypatch.undo()
    assert train(shared, run, "--resume") == 0 and (run / rd.SAMPLES / "step-2" / "00.png").is_file()
    assert leftovers(run) == []


# ---- export and generate ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(shared):
    run = shared["images"].parent / "finished"
    assert train(shared, run, "--steps", "1") == 0
    return run / rd.ADAPTER


def test_an_export_that_does_not_fit_leaves_no_folder_it_made(disk, adapter, capsys):
    disk.fill(leave=0)
    out = disk.path / "new" / "kohya" / "dog.safetensors"
    assert cli.main(["export", "--adapter", str(adapter), "--format", "kohya", "--out", str(out)]) == 1
    assert re.fullmatch(rf"error: disk full while writing {re.escape(str(out))}: free space on "
                        rf"{re.escape(str(disk.path))} \(needs ~[\d.]+ [KM]B\) and run the command again",
                        one_error(capsys.readouterr().err))
    assert leftovers(disk.path) == [] and not (disk.path / "new").exists()

    existing = disk.path / "mine"                                   # a folder that was there stays
    existing.mkdir()
    assert cli.main(["export", "--adapter", str(adapter), "--format", "kohya", "--out",
                     str(existing / "a" / "x.safetensors")]) == 1
    capsys.readouterr()
    assert existing.is_dir() and leftovers(disk.path) == ["mine"]
    existing.rmdir()

    disk.fill(leave=2 * 2**20)                                      # the merged toy needs ~21 MB
    merged = disk.path / "merged"
    assert cli.main(["export", "--adapter", str(adapter), "--format", "merged-diffusers", "--out", str(merged)]) == 1
    line = one_error(capsys.readouterr().err)
    assert re.fullmatch(rf"error: disk full while writing {re.escape(str(merged))}/\w+/[\w.]+\.safetensors: free "
                        rf"space on {re.escape(str(disk.path))} \(needs ~[\d.]+ MB\) and run the command again", line)
    assert leftovers(disk.path) == [] and not merged.exists()


def test_generated_images_that_do_not_fit_leave_no_temporary(disk, capsys):
    disk.fill(leave=0)
    out = disk.path / "images"
    assert cli.main(["generate", "--prompt", "a red star", "--steps", "1", "--out", str(out), "--quiet"]) == 1
    assert one_error(capsys.readouterr().err) == (f"error: disk full while writing {out}/0000-s0.png: free space "
                                                  f"on {disk.path} and run the command again")
    assert leftovers(disk.path) == [] and not out.exists()


# ---- the write helpers ---------------------------------------------------------------------------
def test_every_write_helper_names_the_file_and_cleans_up(disk):
    big = torch.zeros(64 * 1024)                                    # 256 KB

    def folder_write():
        with atomic_folder(disk.path / "d" / "merged") as tmp:
            write_safetensors(tmp / "unet" / "w.safetensors", {"x": big})

    def flushed_at_close():                                         # buffered: ENOSPC comes from close()
        with atomic_file(disk.path / "e" / "f.bin") as tmp, open(tmp, "wb") as f:
            f.write(bytes(4000))

    for write, name, leave in [
        (lambda: write_safetensors(disk.path / "a" / "b.safetensors", {"x": big}), "a/b.safetensors", 16 * 1024),
        (lambda: write_bytes(disk.path / "c.png", bytes(256 * 1024)), "c.png", 16 * 1024),
        (folder_write, "d/merged/unet/w.safetensors", 16 * 1024),
        (flushed_at_close, "e/f.bin", 0),
    ]:
        disk.fill(leave)
        with pytest.raises(DiskFull) as e:
            write()
        assert e.value.errno == errno.ENOSPC and e.value.path == disk.path / name
        assert str(e.value).startswith(f"disk full while writing {disk.path / name}: free space on {disk.path}")
        assert leftovers(disk.path) == [], name


def test_an_overflowing_learning_rate_is_one_error_line(tmp_path, shared, capsys):
    """issue 13 #5: --lr 1e39 overflowed in the optimizer step with a traceback."""
    assert train(shared, tmp_path / "run", "--steps", "1", "--lr", "1e39") == 1
    assert "lr" in one_error(capsys.readouterr().err)


def test_disk_full_is_recognised_in_safetensors_own_error():
    from safetensors import SafetensorError

    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(SafetensorError("Error while deserializing header: HeaderTooLarge"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert str(DiskFull("/x/y", 3 * 2**20, code=errno.EDQUOT)).startswith("disk quota exceeded while writing /x/y: "
                                                                          "free space on / (needs ~3.0 MB)")


def test_errors_without_a_message_of_ours_are_one_line(capsys, monkeypatch):
    """A disk-full error that no helper named, and a number that overflowed (issue 13 #5: --lr 1e39
    reached the optimizer as a RuntimeError), print one line instead of a traceback."""
    from safetensors import SafetensorError

    for raised, expected in [
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
         ("error: disk full (Error while serializing: I/O error: No space left on device (os error 28)): free "
          "space on the output's disk and run the command again")),
        (RuntimeError("value cannot be converted to type float without overflow"),
         ("error: a number overflowed (value cannot be converted to type float without overflow): a value given "
          "(a learning rate, a strength, a scale) is far too large")),
    ]:
        def fail(args, raised=raised):
            raise raised
        monkeypatch.setattr(cli, "_run_generate", fail)
        assert cli.main(["generate", "--prompt", "x", "--out", "o"]) == 1
        assert capsys.readouterr().err == expected + "\n"


# ---- a second trainer ------------------------------------------------------------------------------
def test_a_second_trainer_on_a_busy_run_folder_is_one_error_line(tmp_path, shared):
    """The lock held by this (live) process; the second trainer is a real `python -m dorabooth`."""
    run = tmp_path / "run"
    run.mkdir()
    with rd.run_lock(run):
        done = subprocess.run([sys.executable, "-m", "dorabooth", "train", "--images", str(shared["images"]),
                               "--out", str(run), "--steps", "1", *TOY], cwd=REPO, capture_output=True, text=True,
                              timeout=300, check=False)
    assert done.returncode == 1
    assert one_error(done.stderr) == (f"error: {run} is being trained by another process "
                                      f"({socket.gethostname()}:{os.getpid()}); wait for it to finish or stop it, "
                                      f"then --resume. If nothing is training it, delete {run / rd.LOCK}")
    assert sorted(p.name for p in run.iterdir()) == []
