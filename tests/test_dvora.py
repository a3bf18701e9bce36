"""DVoRA, DoRA on VeRA (dorabooth/dvora.py, formats/dvora_file.py, ``--method dvora``).

Oracles: PEFT's VeRA (``VeraConfig``) for the frozen projections and ΔV = diag(b)·B·diag(d)·A;
our DoRA layer with lora_A = diag(d)·A, lora_B = diag(b)·B for everything DoRA adds (forward and
gradients); stock diffusers ``load_lora_weights`` for the exported file. Then the run's small file
(d, b, m and the seed) against its exports (diffusers-lora, kohya, merged), and the command line.
"""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

import dorabooth
from dorabooth import cli, inject
from dorabooth.config import TrainConfig
from dorabooth.dora import DoRALinear, dora_weight
from dorabooth.dvora import DVoRALinear, projection_key, vera_projection
from dorabooth.export import export
from dorabooth.families import dvora_rank
from dorabooth.specs import model_spec, trainable_parameters
from tiny_models import rel_err, text_encoder_names, text_encoder_output, unet_output
from tiny_runs import make_subject, save_model

peft = pytest.importorskip("peft")


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def randomize_vera(model: nn.Module, seed: int) -> None:
    """d ~ N(0, 1), b ~ N(0, 0.3²), magnitudes ±10 %: a non-trivial DVoRA adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("vera_lambda_d"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("vera_lambda_b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


class Net(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


# ---- the layer against its oracles ------------------------------------------------------------
def test_projections_and_delta_equal_peft_vera():
    seed, out_f, in_f, r = 3, 20, 24, 8
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f)
    peft_base = nn.Linear(in_f, out_f)
    peft_base.load_state_dict(base.state_dict())
    model = peft.get_peft_model(Net(peft_base), peft.VeraConfig(
        r=r, target_modules=["lin"], projection_prng_key=projection_key(seed, out_f, in_f), d_initial=0.1))
    theirs = model.base_model.model.lin
    ours = DVoRALinear(base, r, r, seed=seed)                          # alpha = r: scale 1, as VeRA
    # the same frozen projections without copying (one adapted shape: PEFT's largest shape is it)
    assert torch.equal(theirs.vera_A["default"], ours.projection.A)
    assert torch.equal(theirs.vera_B["default"], ours.projection.B)
    assert (ours.projection.A.shape, ours.projection.B.shape) == ((r, in_f), (out_f, r))
    # the same init: d = d_initial, b = 0 (so ΔV = 0 and m = ‖W0‖: the base layer exactly)
    assert torch.equal(theirs.vera_lambda_d["default"].detach(), ours.vera_lambda_d.detach())
    assert torch.equal(theirs.vera_lambda_b["default"].detach(), ours.vera_lambda_b.detach())
    x = torch.randn(5, in_f)
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
        randomize_vera(ours, seed=1)
        theirs.vera_lambda_d["default"].copy_(ours.vera_lambda_d)
        theirs.vera_lambda_b["default"].copy_(ours.vera_lambda_b)
        A, B = ours.factors()
        torch.testing.assert_close(ours.scale * B @ A, theirs.get_delta_weight("default"), rtol=0, atol=1e-6)
        delta_theirs = model(x) - base(x)                              # VeRA's ΔV·x
        V = dora_weight(base.weight, A, B, ours.scale)                 # ours with the magnitude removed
        torch.testing.assert_close(x @ (V - base.weight).T, delta_theirs, rtol=1e-5, atol=1e-6)
        assert ours(x).sub(base(x)).abs().max() > 1e-2                 # the adapter does something


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dvora_is_dora_with_scaled_factors(axis):
    """Forward equal to the DoRA layer with lora_A = diag(d)·A, lora_B = diag(b)·B; gradients by the chain rule."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    ours = DVoRALinear(base, 8, 4.0, seed=5, magnitude_axis=axis)
    randomize_vera(ours, seed=2)
    dora = DoRALinear(base, 8, 4.0, magnitude_axis=axis)
    A, B = ours.factors()
    with torch.no_grad():
        dora.lora_A.weight.copy_(A)
        dora.lora_B.weight.copy_(B)
        dora.lora_magnitude_vector.copy_(ours.lora_magnitude_vector)
    x = torch.randn(3, 7, 24)
    y_ours, y_dora = ours(x), dora(x)
    assert torch.equal(y_ours, y_dora)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_dora.backward(grad)
    torch.testing.assert_close(ours.lora_magnitude_vector.grad, dora.lora_magnitude_vector.grad)
    P_A, P_B = ours.projection.A, ours.projection.B
    torch.testing.assert_close(ours.vera_lambda_d.grad, (dora.lora_A.weight.grad * P_A).sum(1))
    torch.testing.assert_close(ours.vera_lambda_b.grad, (dora.lora_B.weight.grad * P_B).sum(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.merged_weight(0.5), dora.merged_weight(0.5), rtol=0, atol=0)


def test_only_d_b_m_train_and_projections_are_shared(make_pipe):
    pipe = make_pipe()
    dorabooth.attach(pipe, method="dvora", rank=8, vera_seed=1)
    layers = inject.dora_modules(pipe.unet)
    trainable = {n.rsplit(".", 1)[-1] for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_d", "vera_lambda_b", "lora_magnitude_vector"}
    assert all(isinstance(m, DVoRALinear) for _, m in layers)
    same = [m for _, m in layers if (m.out_features, m.in_features) == (layers[0][1].out_features,
                                                                         layers[0][1].in_features)]
    assert len(same) > 1 and all(m.projection is same[0].projection for m in same)   # one (A, B) per shape
    assert not any("vera_A" in k or "projection" in k for k in pipe.unet.state_dict())
    # another seed draws other projections; the same seed, shape and rank the same ones
    assert not torch.equal(vera_projection(1, 16, 16, 8)[0], vera_projection(2, 16, 16, 8)[0])
    assert torch.equal(vera_projection(1, 16, 16, 8)[1], vera_projection(1, 16, 16, 8)[1])


def unet(widths):
    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=widths)))


def test_default_rank_is_256_capped_at_the_narrowest_block():
    assert dvora_rank(unet((320, 640, 1280, 1280))) == 256          # SD 1.x / 2.x
    assert dvora_rank(unet((320, 640, 1280))) == 256                # SDXL
    assert dvora_rank(unet((32, 64, 128))) == 32                    # the toy model
    assert dvora_rank(unet((16, 32))) == 16                         # tiny test models


# ---- files -----------------------------------------------------------------------------------
def test_run_file_is_small_and_every_export_is_the_same_adapter(make_pipe, tmp_path):
    pipe = make_pipe()
    dorabooth.attach(pipe, method="dvora", rank=8, alpha=8, text_encoders=True, vera_seed=7)
    for c in ["unet", *text_encoder_names(pipe)]:
        randomize_vera(getattr(pipe, c), seed=3)
    with torch.no_grad():
        live = unet_output(pipe)
        live_te = {c: text_encoder_output(pipe, c) for c in text_encoder_names(pipe)}
    assert rel_err(live, unet_output(make_pipe())) > 1e-2            # non-trivial

    path = dorabooth.save_adapter(pipe, tmp_path / "adapter.safetensors")
    tensors, meta = read(path)
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"vera_lambda_d", "vera_lambda_b", "lora_magnitude_vector"}
    assert meta["dorabooth.method"] == "dvora" and meta["dorabooth.vera_seed"] == "7"
    assert sum(t.numel() for t in tensors.values()) == sum(
        p.numel() for c in ["unet", *text_encoder_names(pipe)] for p in getattr(pipe, c).parameters() if p.requires_grad)

    def loaded(file):
        fresh = make_pipe()
        dorabooth.load_adapter(fresh, file)
        return fresh

    from_run = loaded(path)                                           # what generate does with the run
    with torch.no_grad():
        assert torch.equal(unet_output(from_run), live)
        for c, y in live_te.items():
            assert torch.equal(text_encoder_output(from_run, c), y)

    diffusers_file = export(path, format="diffusers-lora", out=tmp_path / "d.safetensors", pipe=make_pipe()).path
    d_tensors, d_meta = read(diffusers_file)
    assert d_meta["dorabooth.method"] == "dora" and not any("vera" in k for k in [*d_tensors, *d_meta])
    assert json.loads(d_meta["lora_adapter_metadata"])["unet.use_dora"] is True
    with torch.no_grad():
        assert torch.equal(unet_output(loaded(diffusers_file)), live)       # exact: the same A', B', m
        stock = make_pipe()
        stock.load_lora_weights(diffusers_file)                             # stock diffusers + PEFT DoRA
        assert rel_err(unet_output(stock), live) <= 1e-5

    kohya_file = export(path, format="kohya", out=tmp_path / "k.safetensors", pipe=make_pipe()).path
    assert any(k.endswith(".dora_scale") for k in read(kohya_file)[0])
    with torch.no_grad():
        assert rel_err(unet_output(loaded(kohya_file)), live) <= 1e-6

    merged = export(path, format="merged-diffusers", out=tmp_path / "merged", pipe=make_pipe()).path
    with torch.no_grad():
        assert rel_err(unet_output(type(pipe).from_pretrained(merged)), live) <= 1e-5


def test_damaged_run_file_is_refused_naming_it(tmp_path):
    from safetensors.torch import save_file

    from dorabooth.formats.adapter_files import read_adapter_file

    path = tmp_path / "adapter.safetensors"
    save_file({"unet.a.to_q.vera_lambda_d": torch.ones(4)}, str(path), metadata={"dorabooth.method": "dora"})
    with pytest.raises(ValueError, match=rf"{path}: has vera_lambda_d tensors but its header lacks"):
        read_adapter_file(path)


# ---- the command line ------------------------------------------------------------------------
def test_cli_train_generate_export_info(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dorabooth"])
    model = str(save_model("sd15", tmp_path / "model"))
    subject = make_subject(tmp_path / "subject")
    run = tmp_path / "run"
    common = ["--model", model, "--num-class-images", "2", "--class-image-steps", "2", "--lr", "1e-2", "--targets", "attn",
              "--pivotal", "0"]
    assert cli.main(["train", "--method", "dvora", "--images", str(subject), "--class-noun", "dog", "--out", str(run),
                     "--steps", "2", *common]) == 0
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["method"], config["rank"]) == ("dvora", 16)       # 256 capped at the tiny UNet's width
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    tensors, _ = read(run / "adapter.safetensors")
    assert start["trainable"] == sum(t.numel() for t in tensors.values())   # d, b, m: not the frozen A, B
    planned = trainable_parameters(model_spec(model), TrainConfig.from_dict(config))   # what --dry-run counts
    assert sum(planned.values()) == start["trainable"] == 2432
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(run), "--prompt", "a photo of sks dog", "--out",
                     str(tmp_path / "images"), "--n", "1", "--steps", "2"]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    assert cli.main(["export", "--adapter", str(run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert cli.main(["adapter-info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "method         dvora" in out and f"{start['trainable']:,} trained numbers" in out
    assert cli.main(["adapter-info", str(tmp_path / "k.safetensors")]) == 0
    assert "method         dora" in capsys.readouterr().out
