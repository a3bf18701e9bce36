"""kill -9 at each write point of a run (``DORABOOTH_FAULT``, dorabooth/faults.py), then ``--resume``:
the final adapter is bit-identical to an uninterrupted run's, nothing the killed writer left
remains, and the resume prints no traceback. Also: ``--resume`` of a finished run, and a
checkpoint rotated away.

The runs: the tiny SD 1.5 model, 6 steps, a checkpoint every 2 keeping 1 (so step-2 is rotated
away when step-4 is written), 2 class images drawn into the run. The killed trainers are forked
from this process (no second torch import: a second each instead of ten) except the final-write
case, a real ``python -m dorabooth`` subprocess; the resumes run in this process.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dorabooth import cli, faults
from dorabooth import rundir as rd
from tiny_runs import make_subject, save_model

REPO = Path(__file__).resolve().parent.parent
LEFTOVER = re.compile(r"\.(tmp|old)-")                   # .NAME.tmp-PID, .NAME.old-PID, .tmp-step-N, .old-step-N


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def train_argv(root: Path, run: Path) -> list[str]:
    model = save_model("sd15", root / "model")
    subject = root / "subject" if (root / "subject").is_dir() else make_subject(root / "subject")
    return ["train", "--images", str(subject), "--class-noun", "dog", "--out", str(run), "--model", str(model),
            "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "1", "--rank", "4", "--lr", "1e-3",
            "--num-class-images", "2", "--class-image-steps", "2", "--no-train-text-encoders", "--quiet"]


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """One uninterrupted run, shared by every case (on one thread, as every run here: the
    function-scoped conftest fixture that sets it has not run yet for a module fixture)."""
    torch.set_num_threads(1)
    run = root / "reference"
    assert cli.main(train_argv(root, run)) == 0
    return run


def killed_in_fork(point: str, argv: list[str]) -> None:
    """``dorabooth train`` in a forked child that kills itself (SIGKILL) at ``point``."""
    pid = os.fork()
    if pid == 0:                                       # the child: never returns into pytest
        code = 70
        try:
            os.environ[faults.ENV] = point
            code = cli.main(argv)
        finally:
            os._exit(code)                             # reached only if the point was never reached
    deadline = time.monotonic() + 300
    while not (ended := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    status = ended[1]
    if not ended[0]:                                   # hung (it never should): do not hang the suite
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"{point}: the forked trainer did not finish in 300 s")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point}: exit status {status}"


def killed_in_subprocess(point: str, argv: list[str]) -> None:
    """``python -m dorabooth train`` killed by SIGKILL at ``point``."""
    env = {**os.environ, faults.ENV: point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dorabooth", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if LEFTOVER.search(p.name) or p.name == rd.LOCK)


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / rd.ADAPTER))


CASES = {  # id: (fault point (RUN: the run folder), what the kill leaves, checkpoints then, forked?, then)
    "config": ("rename:RUN/config.json", ".config.json.tmp-", [], True, []),       # no run yet: the same command
    "class-images": ("rename:RUN/class/class-00001.png", ".class-00001.png.tmp-", [], True, ["--resume"]),
    "mid-run": ("step:3", rd.LOCK, [2], True, ["--resume"]),                        # between checkpoints
    "checkpoint-write": ("checkpoint:4", "checkpoints/.tmp-step-4", [2], True, ["--resume"]),
    "rotation": ("rotation:2", "checkpoints/.old-step-2", [4], True, ["--resume"]),
    "samples": ("rename:RUN/samples/step-6/00.png", "samples/step-6/.00.png.tmp-", [4], True, ["--resume"]),
    "final-write": ("rename:RUN/adapter.safetensors", ".adapter.safetensors.tmp-", [4], False, ["--resume"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kill_then_resume_gives_the_uninterrupted_adapter(root, reference, tmp_path, capsys, case):
    point, left, listed, forked, then = CASES[case]
    run = tmp_path / "run"
    argv = train_argv(root, run)
    (killed_in_fork if forked else killed_in_subprocess)(point.replace("RUN", str(run)), argv)
    capsys.readouterr()
    found = leftovers(run)
    assert any(left in f for f in found) and rd.LOCK in found, found       # the kill hit where meant
    assert rd.checkpoint_steps(run) == listed and not (run / rd.ADAPTER).exists()

    assert cli.main([*argv, *then]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
    assert leftovers(run) == []
    assert rd.checkpoint_steps(run) == [4]
    got, want = adapter_tensors(run), adapter_tensors(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def test_resume_of_a_finished_run_says_so_and_trains_nothing(root, reference, capsys):
    adapter = reference / rd.ADAPTER
    before = (adapter.stat().st_mtime_ns, (reference / rd.EVENTS).read_bytes())
    assert cli.main(["train", "--out", str(reference), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert err == (f"{reference} is finished: adapter.safetensors was written at step 6; to train longer pass "
                   f"--resume --steps N with N > 6\n")
    assert out.strip() == str(adapter)
    assert (adapter.stat().st_mtime_ns, (reference / rd.EVENTS).read_bytes()) == before


def test_a_checkpoint_rotated_away_no_longer_exists(reference, tmp_path, capsys):
    gone = reference / "checkpoints" / "step-2" / rd.ADAPTER
    argv = ["generate", "--adapter", str(gone), "--prompt", "a sks dog", "--out", str(tmp_path / "images")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == (f"error: checkpoint step-2 of {reference} no longer exists: the run keeps only its newest "
                   f"checkpoints (--keep-checkpoints) and deleted it; checkpoints with adapters now: step-4. Pass "
                   f"one of those, or the run folder for its final adapter\n")
    with pytest.raises(FileNotFoundError, match="step-9 of .* does not exist: the run never wrote it"):
        rd.checkpoint_adapter(reference, 9)
    assert rd.resolve_adapter(reference / "checkpoints" / "step-4").path == reference / "checkpoints" / "step-4" / \
        rd.ADAPTER


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_finishes_it(root, reference, tmp_path, capsys,
                                                                                signum):
    """A kill (SIGTERM) or Ctrl-C (SIGINT) to ``python -m dorabooth train`` in the middle of a run:
    it finishes the step, writes a checkpoint there (not only at the last --checkpoint-every), says
    so with the way on, exits 128 + the signal; --resume then ends bit-identical to the reference."""
    run = tmp_path / "run"
    argv = [a if a != "--quiet" else "--json" for a in train_argv(root, run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dorabooth", *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:                       # step 3 is done: between the checkpoints at 2 and 4
            if line.startswith("{") and json.loads(line).get("step") == 3:
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "continue with --resume" in err, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    stopped = [e["step"] for e in events if e["type"] == "stopped"]
    assert stopped and stopped[0] >= 3 and stopped[0] in rd.checkpoint_steps(run), (out[-2000:], err)
    assert leftovers(run) == [] and not (run / rd.ADAPTER).exists()

    assert cli.main([*train_argv(root, run), "--resume"]) == 0
    capsys.readouterr()
    got, want = adapter_tensors(run), adapter_tensors(reference)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
