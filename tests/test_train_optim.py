"""Training with the optimizer choices (issue 14 #5, #6): LoRA+, Prodigy, 8-bit AdamW and the EMA
of the adapter weights, each resumed bit-identically; the EMA's result checked against the
trajectory recomputed here."""

import importlib
import json
from pathlib import Path

import pytest
import tiny_runs
import torch
from safetensors.torch import load_file
from tiny_runs import MAKERS, make_subject, quick, save_model

import dorabooth
from dorabooth.config import TrainConfig
from dorabooth.optim import optimizer_problem
from dorabooth.train import train


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    make_subject(root / "subject")
    save_model("sd15", root / "model")
    return root


def config(root, out, **kw):
    return TrainConfig(images=str(root / "subject"), out=str(out), model=str(root / "model"),
                       **quick(**{"prior_preservation": False, "steps": 5, "checkpoint_every": 2,
                                  "keep_checkpoints": 5, **kw}))


def result_tensors(run: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "full":
        return load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    return load_file(str(run / "adapter.safetensors"))


def straight_and_resumed(root, tmp_path, **kw):
    """5 steps straight, and 2 steps + stop + --resume 3 more (checkpoints at 2 and 4): both run folders."""
    return tiny_runs.straight_and_resumed(lambda out: config(root, out, **kw), tmp_path / "a", tmp_path / "b")


def _8bit_problem():
    return optimizer_problem("adamw8bit")


VARIANTS = {   # name: the config fields
    "loraplus+ema": {"loraplus_ratio": 16.0, "ema_decay": 0.5},
    "prodigy": {"optimizer": "prodigy", "lr": None},
    "adamw8bit": {"optimizer": "adamw8bit", "method": "full"},   # full: tensors ≥ 4096 elements get 8-bit moments
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_is_bit_identical(root, tmp_path, variant):
    fields = VARIANTS[variant]
    if variant == "adamw8bit" and _8bit_problem():
        pytest.skip(f"8-bit AdamW cannot run here: {_8bit_problem()}")
    a, b = straight_and_resumed(root, tmp_path, **fields)
    method = fields.get("method", "dora")
    ta, tb = result_tensors(a, method), result_tensors(b, method)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), variant
    recorded = json.loads((b / "config.json").read_text())["config"]
    state = [json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())["optimizer"] for run in (a, b)]
    assert state[0] == state[1]                                 # scalars and groups (Prodigy's d, …) restored exactly
    groups = state[0]["param_groups"]
    if variant == "loraplus+ema":
        assert (recorded["loraplus_ratio"], recorded["ema_decay"]) == (16.0, 0.5)
        assert sorted({g["lr"] for g in groups}) == [pytest.approx(1e-3), pytest.approx(1.6e-2)]
        ema = [load_file(str(run / "checkpoints" / "step-4" / "ema.safetensors")) for run in (a, b)]
        assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    if variant == "prodigy":
        assert (recorded["optimizer"], recorded["lr"]) == ("prodigy", 1.0)
        assert groups[0]["k"] == 4 and groups[0]["d_numerator"] > 0 and groups[0]["d_hat"] > 0   # Prodigy's estimate ran
    if variant == "adamw8bit":
        moments = load_file(str(a / "checkpoints" / "step-4" / "optimizer.safetensors"))
        assert any(t.dtype == torch.uint8 for t in moments.values())     # real 8-bit state went through resume


def test_ema_result_is_the_ema_of_the_trajectory(root, tmp_path, monkeypatch):
    """With --ema-decay D the final adapter (and the checkpoint's adapter file) hold
    e_1 = θ_1, e_n = d_n e_{n-1} + (1 − d_n) θ_n with d_n = min(D, n / (n + 9)), from the raw
    weights θ_n after each step recorded here; the raw weights keep training."""
    trainer = importlib.import_module("dorabooth.train")
    params, real = {}, trainer.setup_method
    monkeypatch.setattr(trainer, "setup_method", lambda pipe, c: params.update(real(pipe, c)) or params)
    trajectory = []

    def record(event):
        if event["type"] == "step":
            trajectory.append({n: p.detach().clone() for n, p in params.items()})

    decay = 0.2                                                   # d_2 = 2/11 < 0.2 < d_3 = 3/12: both branches
    train(config(root, tmp_path / "run", ema_decay=decay, sample_every=2), on_event=record)
    assert len(trajectory) == 5
    ema = dict(trajectory[0])
    for n, theta in enumerate(trajectory[1:], start=2):
        d = min(decay, n / (n + 9))
        ema = {k: d * ema[k] + (1 - d) * theta[k] for k in ema}
    pipe = MAKERS["sd15"]()
    dorabooth.load_adapter(pipe, tmp_path / "run" / "adapter.safetensors")
    final = {f"unet.{n}": p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert final.keys() == ema.keys()
    for k in ema:
        torch.testing.assert_close(final[k], ema[k], rtol=0, atol=1e-6)
    raw = trajectory[-1]
    assert max((final[k] - raw[k]).abs().max().item() for k in raw) > 1e-4       # not the raw weights
    assert all(torch.equal(params[k], raw[k]) for k in raw)                       # the model keeps its raw weights
    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "ema.safetensors"))
    d2 = min(decay, 2 / 11)
    for k in checkpoint:
        torch.testing.assert_close(checkpoint[k], d2 * trajectory[0][k] + (1 - d2) * trajectory[1][k], rtol=0, atol=1e-6)
    assert (tmp_path / "run" / "samples" / "step-2" / "00.png").is_file()
