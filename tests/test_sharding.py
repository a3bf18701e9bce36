"""FSDP (issue 15, "One big run"): a full fine-tune sharded over 2 processes with the shipped
FSDP2 config (``configs/accelerate/fsdp-full-shard.yaml``), on CPU processes over gloo (accelerate
enables FSDP on GPUs only; ``DORABOOTH_FSDP_ON_CPU=1`` runs the same FSDP2 sharding over gloo,
``dorabooth.sharding.enable_on_cpu``). Its checkpoints hold whole tensors and the unsharded
optimizer state: a sharded run resumes exactly, resumes on 1 plain process, and a plain
process's checkpoint resumes sharded."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from dorabooth.config import TrainConfig
from dorabooth.train import train
from tiny_runs import MAKERS, make_subject, save_model

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "accelerate" / "fsdp-full-shard.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    shipped = yaml.safe_load(CONFIG.read_text())
    cpu = {**shipped, "num_processes": 2, "use_cpu": True, "mixed_precision": "no"}    # the shipped config, on CPUs
    (root / "fsdp.yaml").write_text(yaml.safe_dump(cpu))
    return root, make_subject(root / "subject"), save_model("sd15", root / "model")


def _launch(setup, out: Path, *extra: str) -> list[dict]:
    root, subject, model = setup
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "fsdp.yaml"),
           "-m", "dorabooth", "train", "--images", str(subject), "--class-noun", "dog", "--out", str(out),
           "--model", str(model), "--method", "full", "--lr", "1e-4", "--num-class-images", "2",
           "--class-image-steps", "2", "--class-images", str(root / "class"), "--no-train-text-encoders",
           "--sample-every", "0", "--checkpoint-every", "1", "--keep-checkpoints", "10", "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DORABOOTH_FSDP_ON_CPU": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _unet(run: Path) -> dict:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def _unfinished(run: Path, to: Path) -> Path:
    """A copy of ``run`` without its result: --resume continues from its newest checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "unet")
    return to


def test_a_sharded_full_fine_tune_resumes_exactly_and_with_other_process_counts(setup, tmp_path):
    out = tmp_path / "sharded"
    events = _launch(setup, out, "--steps", "2")
    start = next(e for e in events if e["type"] == "start")
    assert (start["processes"], start["sharded"]) == (2, True) and events[-1]["type"] == "done"
    whole = _unet(out)
    reference = MAKERS["sd15"]().unet.state_dict()
    assert {k: tuple(v.shape) for k, v in whole.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    ckpt = load_file(out / "checkpoints" / "step-1" / "trainable.safetensors")      # whole tensors, not shards
    assert {k.removeprefix("unet."): tuple(v.shape) for k, v in ckpt.items()} == \
        {k: tuple(v.shape) for k, v in reference.items()}

    # sharded → sharded, same count: step 2 again from the step-1 checkpoint, bit for bit
    again = _unfinished(out, tmp_path / "again")
    events = _launch(setup, again, "--steps", "2", "--resume")
    assert next(e for e in events if e["type"] == "resume")["step"] == 1
    assert all((_unet(again)[k] == whole[k]).all() for k in whole)

    # sharded (2) → one plain process → sharded (2) again
    mixed = _unfinished(out, tmp_path / "mixed")
    one = TrainConfig.from_dict({**json.loads((mixed / "config.json").read_text())["config"], "resume": True,
                                 "steps": 3, "out": str(mixed)})
    seen = []
    train(one, on_event=seen.append)
    resume = next(e for e in seen if e["type"] == "resume")
    assert (resume["step"], resume["processes_before"], resume["processes"]) == (1, 2, 1)
    assert seen[-1]["type"] == "done"
    shutil.rmtree(mixed / "unet")
    events = _launch(setup, mixed, "--steps", "4", "--resume")
    resume = next(e for e in events if e["type"] == "resume")
    assert (resume["step"], resume["processes_before"], resume["processes"]) == (2, 1, 2)
    assert events[-1]["type"] == "done" and events[-1]["steps"] == 4
    trained = _unet(mixed)
    assert any(not (trained[k] == whole[k]).all() for k in whole)          # it trained on from there


def test_fsdp_is_refused_for_adapters(setup, tmp_path):
    root, subject, model = setup
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "fsdp.yaml"),
           "-m", "dorabooth", "train", "--images", str(subject), "--class-noun", "dog", "--out",
           str(tmp_path / "run"), "--model", str(model), "--steps", "1", "--no-prior-preservation", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "DORABOOTH_FSDP_ON_CPU": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "FSDP shards full fine-tunes (--method full); a dora adapter is small enough for plain DDP" in \
        proc.stdout + proc.stderr
