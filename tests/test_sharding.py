"""Sharded full fine-tunes (issue 15, "One big run") over 2 CPU processes with the shipped
configs: FSDP2 (``configs/accelerate/fsdp-full-shard.yaml``; accelerate enables FSDP on GPUs only,
``DORABOOTH_FSDP_ON_CPU=1`` runs the same FSDP2 sharding over gloo, ``dorabooth.sharding.enable_on_cpu``)
and DeepSpeed ZeRO-2 and ZeRO-3 (``deepspeed-zero{2,3}.yaml``: the real engine, whose CPU
accelerator joins the processes over gloo). All three train the same steps as each other; their
checkpoints hold whole tensors and the unsharded optimizer state: a sharded run resumes exactly,
resumes on 1 plain process, and a plain process's checkpoint resumes sharded."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dorabooth.config import TrainConfig
from dorabooth.train import train
from tiny_runs import MAKERS, make_subject, save_model

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"fsdp": "fsdp-full-shard.yaml", "zero2": "deepspeed-zero2.yaml", "zero3": "deepspeed-zero3.yaml"}
NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None
KINDS = ["fsdp"] + [pytest.param(k, marks=pytest.mark.skipif(NO_DEEPSPEED, reason="pip install deepspeed"))
                    for k in ("zero2", "zero3")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    for kind, name in CONFIGS.items():
        shipped = yaml.safe_load((REPO / "configs" / "accelerate" / name).read_text())
        # the shipped config, on 2 CPU processes (DeepSpeed's own CPU accelerator: not accelerate's use_cpu)
        cpu = {**shipped, "num_processes": 2, "use_cpu": kind == "fsdp", "mixed_precision": "no"}
        (root / f"{kind}.yaml").write_text(yaml.safe_dump(cpu))
    return root, make_subject(root / "subject"), save_model("sd15", root / "model")


def _launch(setup, out: Path, *extra: str, kind: str = "fsdp") -> list[dict]:
    root, subject, model = setup
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / f"{kind}.yaml"),
           "-m", "dorabooth", "train", "--images", str(subject), "--class-noun", "dog", "--out", str(out),
           "--model", str(model), "--method", "full", "--lr", "1e-4", "--num-class-images", "2",
           "--class-image-steps", "2", "--class-images", str(root / "class"), "--no-train-text-encoders",
           "--sample-every", "0", "--checkpoint-every", "1", "--keep-checkpoints", "10", "--optimizer", "adamw",
           "--json", *extra]
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


@pytest.fixture(scope="module")
def first(setup, tmp_path_factory):
    """Each kind's 2-step run on 2 processes, made once: {kind: (run folder, its events)}."""
    made = {}

    def run(kind):
        if kind not in made:
            out = tmp_path_factory.mktemp(f"first-{kind}") / "run"
            made[kind] = (out, _launch(setup, out, "--steps", "2", kind=kind))
        return made[kind]
    return run


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_full_fine_tune_resumes_exactly_and_with_other_process_counts(setup, first, tmp_path, kind):
    out, events = first(kind)
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
    events = _launch(setup, again, "--steps", "2", "--resume", kind=kind)
    assert next(e for e in events if e["type"] == "resume")["step"] == 1
    assert all((_unet(again)[k] == whole[k]).all() for k in whole)

    # sharded (2) → one plain process → sharded (2) again (ZeRO-3 saves and loads through the same
    # functions as the same-count resume above, as ZeRO-2 does: once for the two is enough for CI's time)
    if kind == "zero3":
        return
    mixed = _unfinished(out, tmp_path / "mixed")
    one = TrainConfig.from_dict({**json.loads((mixed / "config.json").read_text())["config"], "resume": True,
                                 "steps": 3, "out": str(mixed)})
    seen = []
    train(one, on_event=seen.append)
    resume = next(e for e in seen if e["type"] == "resume")
    assert (resume["step"], resume["processes_before"], resume["processes"]) == (1, 2, 1)
    assert seen[-1]["type"] == "done"
    shutil.rmtree(mixed / "unet")
    events = _launch(setup, mixed, "--steps", "4", "--resume", kind=kind)
    resume = next(e for e in events if e["type"] == "resume")
    assert (resume["step"], resume["processes_before"], resume["processes"]) == (2, 1, 2)
    assert events[-1]["type"] == "done" and events[-1]["steps"] == 4
    trained = _unet(mixed)
    assert any(not (trained[k] == whole[k]).all() for k in whole)          # it trained on from there


@pytest.mark.skipif(NO_DEEPSPEED, reason="pip install deepspeed")
def test_fsdp_and_deepspeed_zero2_and_zero3_train_the_same_steps(first):
    """The same two steps sharded three ways: the same UNet (up to the order of float sums)."""
    unets = {kind: _unet(first(kind)[0]) for kind in CONFIGS}
    for kind in ("zero2", "zero3"):
        assert all(torch.allclose(unets[kind][k], unets["fsdp"][k], rtol=1e-4, atol=1e-6) for k in unets["fsdp"]), kind
    base = MAKERS["sd15"]().unet.state_dict()
    assert any(not torch.allclose(unets["fsdp"][k], base[k]) for k in base)          # they trained


@pytest.mark.skipif(NO_DEEPSPEED, reason="pip install deepspeed")
def test_gradient_accumulation_under_deepspeed_steps_as_fsdp_does(setup, tmp_path):
    """--grad-accum 2: the engine steps once per two micro-batches (the trainer marks the boundary)
    and the loss is divided once: the same step as FSDP's."""
    unets, moments = {}, {}
    for kind in ("fsdp", "zero2"):
        events = _launch(setup, tmp_path / kind, "--steps", "2", "--grad-accum", "2",
                         "--max-grad-norm", "1e6", kind=kind)         # clipping would hide a gradient's scale
        assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]
        unets[kind] = _unet(tmp_path / kind)
        moments[kind] = load_file(tmp_path / kind / "checkpoints" / "step-1" / "optimizer.safetensors")
    assert all(torch.allclose(unets["zero2"][k], unets["fsdp"][k], rtol=1e-4, atol=1e-6) for k in unets["fsdp"])
    # AdamW's update hardly sees a gradient's scale; its first moment (0.1 × the gradient) does
    assert sorted(moments["zero2"]) == sorted(moments["fsdp"])
    assert all(torch.allclose(moments["zero2"][k], moments["fsdp"][k], rtol=1e-3, atol=1e-9) for k in moments["fsdp"])


@pytest.mark.parametrize("kind", ["fsdp", KINDS[1]])
def test_fsdp_and_deepspeed_are_refused_for_adapters(setup, tmp_path, kind):
    root, subject, model = setup
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / f"{kind}.yaml"),
           "-m", "dorabooth", "train", "--images", str(subject), "--class-noun", "dog", "--out",
           str(tmp_path / "run"), "--model", str(model), "--steps", "1", "--no-prior-preservation", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "DORABOOTH_FSDP_ON_CPU": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    name = "FSDP" if kind == "fsdp" else "DeepSpeed"
    assert f"{name} shards full fine-tunes (--method full); a dora adapter is small enough for plain DDP" in \
        proc.stdout + proc.stderr
