"""QDoRA (``--quantize-base nf4``, issue 14 #3): the adapted layers' frozen W0 held in NF4.

The tolerance the layer is held to: its output and gradients equal, bit for bit, those of a
plain DoRA layer whose W0 is the dequantised weight; the dequantised weight differs from the
original by NF4's error (relative Frobenius error about 0.09 on Gaussian and Kaiming weights).
torchao is in the ``dev`` extra (``qdora``), so these tests run in CI.
"""

import copy
import json
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_runs import make_subject
from torch import nn

import dorabooth
from dorabooth import cli
from dorabooth.config import TrainConfig
from dorabooth.dora import DoRALinear, axis_norm, dora_weight
from dorabooth.memory import NF4_BYTES
from dorabooth.quantize import NF4Linear, frozen_bytes, quantize_adapted


def _pair(axis, dtype, use_dora=True):
    """A QDoRA layer and a plain DoRA layer on its dequantised W0, with the same non-zero adapter."""
    torch.manual_seed(0)
    base = nn.Linear(320, 640).to(dtype)          # SD's 320-wide blocks: 3200 blocks of 64, grouped by 200
    q = DoRALinear(copy.deepcopy(base), 8, 8.0, magnitude_axis=axis, use_dora=use_dora)
    q.quantize_base(NF4Linear)
    W = q.base_layer.dequantize()
    ref_base = copy.deepcopy(base)
    ref_base.weight.data = W.clone()
    ref = DoRALinear(ref_base, 8, 8.0, magnitude_axis=axis, use_dora=use_dora)
    with torch.no_grad():
        q.lora_B.weight.normal_(0, 0.05)
        if use_dora:
            q.lora_magnitude_vector.mul_(1.05)
    ref.load_adapter_state_dict({k: v.clone() for k, v in q.adapter_state_dict().items()})
    return base, q, ref, W


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_qdora_equals_dora_on_the_dequantised_weight(axis, dtype):
    base, q, ref, W = _pair(axis, dtype)
    W0 = base.weight.detach().float()
    rel = float((W.float() - W0).norm() / W0.norm())
    assert 0.05 < rel < 0.12                                   # NF4's error, not a broken quantiser
    assert W.dtype == dtype and q.base_layer.weight_dtype == dtype
    torch.manual_seed(1)
    fresh = DoRALinear(copy.deepcopy(base), 8, 8.0, magnitude_axis=axis)
    fresh.quantize_base(NF4Linear)                             # the magnitude starts from the dequantised W0
    assert torch.allclose(fresh.lora_magnitude_vector.view(-1), axis_norm(W, axis), rtol=1e-6)
    assert not torch.allclose(fresh.lora_magnitude_vector.view(-1), axis_norm(base.weight, axis), rtol=1e-3)
    x = torch.randn(2, 7, 320, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), ref(x_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    for name in ("lora_A", "lora_B"):
        assert torch.equal(getattr(q, name).weight.grad, getattr(ref, name).weight.grad)
    assert torch.equal(q.lora_magnitude_vector.grad, ref.lora_magnitude_vector.grad)
    assert torch.equal(q.merged_weight(), ref.merged_weight())  # what the adapter means on this base


def test_lora_strength_zero_and_merge_on_a_quantised_base():
    base, q, ref, W = _pair("out", torch.float32, use_dora=False)
    x = torch.randn(5, 320, requires_grad=True)
    assert torch.equal(q(x), ref(x))
    q.set_strength(0.0)
    assert torch.equal(q(x), nn.functional.linear(x, W, base.bias))
    q(x).sum().backward()                                      # through NF4Linear's own dequantising backward
    assert torch.equal(x.grad, torch.ones(5, 640) @ W)
    with pytest.raises(ValueError, match="unquantised base"):
        q.merge()
    assert not q.merged


def _frozen_ratio(pipe):
    dorabooth.attach(pipe, method="dora", rank=4, text_encoders=False)
    before, bf16 = frozen_bytes([pipe.unet])
    assert before == 2 * bf16                                   # fp32 as built
    n = quantize_adapted([pipe.unet], "nf4")
    held, _ = frozen_bytes([pipe.unet])
    return n, held / bf16, held / (bf16 / 2)


def test_conv_targets_keep_their_conv_bases_dense(pipe):
    """LoCon (attn+conv) with --quantize-base nf4: Linear bases go to NF4, conv bases stay as they are
    and the conv layers still equal their base at init."""
    from dorabooth.dora import DoRAConv2d
    dorabooth.attach(pipe, method="dora", rank=4, text_encoders=False, unet_targets="attn+conv")
    n = quantize_adapted([pipe.unet], "nf4")
    layers = [m for m in pipe.unet.modules() if isinstance(m, DoRALinear)]
    convs = [m for m in layers if isinstance(m, DoRAConv2d)]
    assert convs and n == len(layers) - len(convs)
    assert all(isinstance(m.base_layer, nn.Conv2d) and m.quantized_base is None for m in convs)
    assert all(isinstance(m.base_layer, NF4Linear) for m in layers if m not in convs)
    x = torch.randn(1, convs[0].in_features, 8, 8)
    assert torch.allclose(convs[0](x), convs[0].base_layer(x), atol=1e-5)


def test_frozen_weights_of_the_adapted_unet_layers_are_under_0_3_of_bf16(pipe):
    """Tiny SD 1.5 / SDXL test UNets (attn targets): NF4 codes + int8 scales + group factors."""
    n, ratio, per_weight = _frozen_ratio(pipe)
    assert n > 0 and ratio <= 0.3
    assert abs(per_weight - NF4_BYTES) / NF4_BYTES < 0.05       # the memory estimate's constant


def test_toy_unet_frozen_ratio_and_memory_estimate(tmp_path, capsys):
    from dorabooth.models import load_weights, open_pipeline

    pipe, _, weights = open_pipeline(None)
    load_weights(pipe, weights, torch.float32)
    _, ratio, _ = _frozen_ratio(pipe)
    assert ratio <= 0.3
    subject = make_subject(tmp_path / "subject")
    common = ["train", "--images", str(subject), "--class-noun", "dog", "--out", str(tmp_path / "run"), "--dry-run"]
    assert cli.main(common) == 0
    plain = capsys.readouterr().out
    assert cli.main([*common, "--quantize-base", "nf4"]) == 0
    quantised = capsys.readouterr().out
    assert "of them NF4" in quantised and "of them NF4" not in plain

    def frozen_mib(text):
        return float(next(line for line in text.splitlines() if "frozen weights" in line).split()[2])
    assert frozen_mib(quantised) < frozen_mib(plain)


def test_refusals_are_one_line_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="--method dora or lora"):
        TrainConfig(images="i", class_noun="dog", out="o", method="full", quantize_base="nf4")
    subject = make_subject(tmp_path / "subject")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)       # as on a machine without torchao
    argv = ["train", "--images", str(subject), "--class-noun", "dog", "--out", str(tmp_path / "run"),
            "--quantize-base", "nf4", "--steps", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dorabooth[qdora]'" in err
    assert not (tmp_path / "run").exists()


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()   # noqa: SIM118 - safe_open is no dict


@pytest.mark.slow
def test_qdora_run_trains_generates_and_exports_like_dora(tmp_path, capsys):
    """2 steps on CPU through the command line on the toy model, then generate, then every export
    format: the export merges against the unquantised base read from disk."""
    subject = make_subject(tmp_path / "subject")
    run = tmp_path / "run"
    assert cli.main(["train", "--images", str(subject), "--class-noun", "dog", "--out", str(run), "--steps", "2",
                     "--quantize-base", "nf4", "--rank", "4", "--num-class-images", "2",
                     "--class-image-steps", "2", "--targets", "attn"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["quantize_base"] == "nf4"
    tensors, meta = _read(run / "adapter.safetensors")
    assert meta["dorabooth.quantized_base"] == "nf4" and meta["dorabooth.method"] == "dora"
    assert cli.main(["generate", "--adapter", str(run), "--prompt", "a sks dog", "--steps", "2",
                     "--out", str(tmp_path / "images")]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    capsys.readouterr()

    out = tmp_path / "exports"
    for fmt in ("diffusers-lora", "kohya", "merged-diffusers", "merged-single-file"):
        name = fmt + (".safetensors" if fmt in ("kohya", "merged-single-file") else "")
        assert cli.main(["export", "--adapter", str(run), "--format", fmt, "--out", str(out / name)]) == 0
    kohya, _ = _read(out / "kohya.safetensors")
    assert sum(k.endswith(".dora_scale") for k in kohya) == sum(k.endswith("lora_magnitude_vector") for k in tensors)
    exported = next((out / "diffusers-lora").rglob("*.safetensors"))
    again, _ = _read(exported)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert cli.main(["generate", "--adapter", str(exported), "--prompt", "a sks dog", "--steps", "2",
                     "--out", str(tmp_path / "images2")]) == 0

    # The merged UNet holds W'(1) computed on the original W0 from disk, not on its NF4 copy.
    from dorabooth.models import load_weights, open_pipeline
    pipe, _, weights = open_pipeline(None)
    load_weights(pipe, weights, torch.float32)
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("to_q.lora.down.weight"))   # diffusers layout
    module = key.removeprefix("unet.").removesuffix(".lora.down.weight")
    W0 = pipe.unet.get_submodule(module).weight.detach()
    A, B = tensors[key], tensors[key.replace(".down.", ".up.")]
    m = tensors[key.replace("lora.down.weight", "lora_magnitude_vector")]
    scale = float(meta["dorabooth.alpha"]) / A.shape[0]
    expected = dora_weight(W0, A, B, scale, m, "out")
    on_nf4 = dora_weight(NF4Linear(pipe.unet.get_submodule(module)).dequantize(), A, B, scale, m, "out")
    merged, _ = _read(next((out / "merged-diffusers" / "unet").glob("*.safetensors")))
    got = merged[f"{module}.weight"].float()
    assert torch.allclose(got, expected.to(got.dtype).float(), atol=1e-6)
    assert not torch.allclose(got, on_nf4.to(got.dtype).float(), atol=1e-3)
