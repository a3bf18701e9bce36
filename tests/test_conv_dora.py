"""DoRA on Conv2d (LoCon): the layer's math, merge/strength/unmerge, and parity with PEFT's conv
DoRA (axis "out") and LyCORIS' LoCon DoRA (both axes) on copied weights.

Tolerance: relative max error < 1e-5 in fp32 (the layers compute the same formula in a
different order: our low-rank norm never forms V)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dorabooth.dora import DoRAConv2d, adapter_layer, axis_norm, dora_weight
from dorabooth.dora_autograd import low_rank_norm

AXES = ["out", "in"]
TOL = 1e-5


def make_conv(axis="out", use_dora=True, in_c=6, out_c=10, k=3, rank=4, alpha=8.0, stride=1, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Conv2d(in_c, out_c, k, stride=stride, padding=k // 2)
    return DoRAConv2d(base, rank, alpha, use_dora=use_dora, magnitude_axis=axis, **kw)


def randomise(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
        if layer.use_dora:
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
    return layer


def reference_forward(layer, x):
    """W' formed naively (norm detached) and one F.conv2d."""
    t, s, b = layer.strength, layer.scale, layer.base_layer
    W0 = b.weight
    V = W0 + t * s * (layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1)).view_as(W0)
    if layer.use_dora:
        dims = (1, 2, 3) if layer.magnitude_axis == "out" else (0, 2, 3)
        m = layer.lora_magnitude_vector.reshape(-1)
        m0 = torch.linalg.vector_norm(W0, dim=dims)
        g = (m0 + t * (m - m0)) / torch.linalg.vector_norm(V, dim=dims).detach()
        V = V * (g.view(-1, 1, 1, 1) if layer.magnitude_axis == "out" else g.view(1, -1, 1, 1))
    return F.conv2d(x, V, b.bias, b.stride, b.padding, b.dilation)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("use_dora", [True, False])
def test_equals_base_at_init(axis, use_dora):
    layer = make_conv(axis, use_dora)
    x = torch.randn(2, 6, 7, 7)
    assert rel_err(layer(x), layer.base_layer(x)) < 1e-6
    shape = {"out": (1, 10, 1, 1), "in": (1, 6)}[axis]                # PEFT's (1, out, 1, 1); (1, in) for "in"
    if use_dora:
        assert tuple(layer.lora_magnitude_vector.shape) == shape
    assert tuple(layer.lora_A.weight.shape) == (4, 6, 3, 3) and tuple(layer.lora_B.weight.shape) == (10, 4, 1, 1)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("stride", [1, 2])
def test_forward_and_grads_match_reference(axis, use_dora, strength, stride):
    layer = randomise(make_conv(axis, use_dora, stride=stride))
    layer.set_strength(strength)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = layer(x), reference_forward(ref, xr)
    assert rel_err(y, yr) < TOL
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yr * w).sum().backward()
    assert rel_err(x.grad, xr.grad) < TOL
    for name in ("lora_A", "lora_B"):
        assert rel_err(getattr(layer, name).weight.grad, getattr(ref, name).weight.grad) < TOL
    if use_dora:
        assert rel_err(layer.lora_magnitude_vector.grad, ref.lora_magnitude_vector.grad) < TOL
    assert layer.base_layer.weight.grad is None


def grads_against_reference(layer, x, w=None):
    """Backward through the layer and through ``reference_forward`` on a copy; their gradients
    (input, A, B, magnitude) as pairs."""
    ref = copy.deepcopy(layer)
    x, xr = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    y, yr = layer(x), reference_forward(ref, xr)
    w = torch.randn_like(yr) if w is None else w
    (y * w).sum().backward()
    (yr * w).sum().backward()
    pairs = [(x.grad, xr.grad)] + [(getattr(layer, n).weight.grad, getattr(ref, n).weight.grad)
                                   for n in ("lora_A", "lora_B")]
    return y, yr, pairs + [(layer.lora_magnitude_vector.grad, ref.lora_magnitude_vector.grad)]


def test_fused_backward_with_zero_magnitude_channels_and_unbatched_input():
    """Axis "out" trains through one fused function that recovers h = (y − bias)/g from its output;
    a channel with m = 0 (so g = 0) hides h and is recomputed; an unbatched (in, H, W) input works."""
    layer = randomise(make_conv("out", stride=2))
    with torch.no_grad():
        layer.lora_magnitude_vector[0, [1, 4]] = 0.0
    y, yr, pairs = grads_against_reference(layer, torch.randn(2, 6, 9, 9))
    assert rel_err(y, yr) < TOL and torch.equal(y[:, 1], layer.base_layer.bias[1].expand_as(y[:, 1]))
    for got, want in pairs:
        assert rel_err(got, want) < TOL
    assert layer.lora_magnitude_vector.grad[0, 1] != 0        # the recomputed channels still learn
    layer.zero_grad()
    y, yr, pairs = grads_against_reference(randomise(make_conv("out")), torch.randn(6, 9, 9))
    assert y.shape == (10, 9, 9) and rel_err(y, yr) < TOL
    assert all(rel_err(got, want) < TOL for got, want in pairs)


def test_conv_dora_half_precision_autocast_dropout_and_frozen_input():
    layer = randomise(make_conv("out", in_c=16, out_c=24, rank=4))
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.weight.grad).all()
    assert rel_err(y.float(), reference_forward(layer, x).detach()) < 3e-2
    half = copy.deepcopy(layer)
    half.base_layer.to(torch.bfloat16)
    xh = x.to(torch.bfloat16).requires_grad_(True)
    yh = half(xh)
    yh.float().square().mean().backward()
    assert yh.dtype == torch.bfloat16 and torch.isfinite(xh.grad).all() and torch.isfinite(half.lora_B.weight.grad).all()
    drop = randomise(make_conv("out", dropout=0.5))             # dropout: the layer's unfused path
    drop.train()
    drop(torch.randn(2, 6, 7, 7)).sum().backward()
    assert drop.lora_A.weight.grad is not None and drop.lora_magnitude_vector.grad is not None
    drop.eval()
    x = torch.randn(2, 6, 7, 7)
    assert rel_err(drop(x), reference_forward(drop, x)) < TOL


@pytest.mark.parametrize("axis", AXES)
def test_low_rank_norm_equals_formed_norm(axis):
    layer = randomise(make_conv(axis, in_c=5, out_c=7, rank=3))
    V = layer.base_layer.weight + layer.scale * (layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1)
                                                 ).view_as(layer.base_layer.weight)
    torch.testing.assert_close(layer.weight_norm(), axis_norm(V, axis), rtol=1e-5, atol=1e-6)
    W = layer.base_layer.weight
    n = low_rank_norm(W.flatten(1), layer.lora_A.weight.flatten(1), layer.lora_B.weight.flatten(1), layer.scale,
                      axis, group=9)                       # w0_sq computed inside
    torch.testing.assert_close(n, axis_norm(V, axis), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_merged_equals_unmerged_and_unmerge_restores_w0(axis, use_dora, strength):
    layer = randomise(make_conv(axis, use_dora))
    layer.set_strength(strength)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(layer.base_layer.weight, w0)
        y_merged = layer(x)
        layer.unmerge()
    assert rel_err(y_merged, y) < TOL
    assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("axis", AXES)
def test_strength_zero_is_base_and_norms_follow_magnitude(axis):
    layer = randomise(make_conv(axis))
    x = torch.randn(1, 6, 5, 5)
    layer.set_strength(0.0)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.equal(layer.merged_weight(), layer.base_layer.weight.float())
    t = 0.25
    W = layer.merged_weight(t)
    m0 = layer.base_magnitude()
    torch.testing.assert_close(axis_norm(W, axis), m0 + t * (layer.lora_magnitude_vector.reshape(-1) - m0),
                               rtol=1e-5, atol=1e-6)
    # the pure function merges and exports use is the layer's merged weight
    torch.testing.assert_close(dora_weight(layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight,
                                           layer.scale, layer.lora_magnitude_vector, axis, t=t), W)


def test_adapter_layer_picks_the_class_and_errors_name_the_fix():
    assert isinstance(adapter_layer(nn.Conv2d(4, 4, 1), 2, 2.0), DoRAConv2d)
    with pytest.raises(ValueError, match=r"min\(out, in·kh·kw\) = 4.*lower --rank"):
        DoRAConv2d(nn.Conv2d(4, 4, 1), 5, 5.0)
    with pytest.raises(ValueError, match="groups=1"):
        DoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 2.0)
    assert DoRAConv2d(nn.Conv2d(2, 8, 3), 8, 8.0).rank == 8          # rank up to min(out, in·kh·kw) = 8 > in


class _Net(nn.Module):
    def __init__(self, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(6, 10, 3, stride=stride, padding=1)


@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_parity_with_peft_conv_dora(use_dora, stride):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = _Net(stride)
    pnet = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["conv"], use_dora=use_dora, lora_dropout=0.0))
    pconv = pnet.base_model.model.conv
    ours = randomise(DoRAConv2d(net.conv, 4, 8.0, use_dora=use_dora))
    with torch.no_grad():
        pconv.lora_A["default"].weight.copy_(ours.lora_A.weight)
        pconv.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if use_dora:   # same shape on both sides: (1, out, 1, 1)
            pconv.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    xp = x.detach().clone().requires_grad_(True)
    y, yp = ours(x), pconv(xp)
    assert rel_err(y, yp) < TOL
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yp * w).sum().backward()
    assert rel_err(x.grad, xp.grad) < TOL
    assert rel_err(ours.lora_A.weight.grad, pconv.lora_A["default"].weight.grad) < TOL
    assert rel_err(ours.lora_B.weight.grad, pconv.lora_B["default"].weight.grad) < TOL
    if use_dora:
        assert rel_err(ours.lora_magnitude_vector.grad, pconv.lora_magnitude_vector["default"].weight.grad) < TOL
    with torch.no_grad():
        pconv.merge(safe_merge=True)
    assert rel_err(ours.merged_weight(), pconv.get_base_layer().weight) < TOL


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_parity_with_lycoris_conv_dora(wd_on_out):
    """LyCORIS' LoCon with ``weight_decompose``: ``wd_on_out`` True is our axis "out" (dora_scale
    (out, 1, 1, 1)), False our axis "in" (dora_scale (1, in, 1, 1), norm per input channel over
    out×kh×kw). LyCORIS keeps the norm in the graph (not detached, unlike the paper §4.3, PEFT
    and us), so the gradients of lora_down/lora_up differ by design; the output, the input's
    gradient and the magnitude's gradient (∂(m/‖V‖)/∂m = 1/‖V‖ either way) must agree."""
    lycoris = pytest.importorskip("lycoris.modules.locon")
    axis = "out" if wd_on_out else "in"
    torch.manual_seed(0)
    base = nn.Conv2d(6, 10, 3, padding=1)
    ly = lycoris.LoConModule("conv", copy.deepcopy(base), 1.0, lora_dim=4, alpha=8,
                             weight_decompose=True, wd_on_out=wd_on_out)
    ly.apply_to()
    ours = randomise(DoRAConv2d(base, 4, 8.0, magnitude_axis=axis))
    assert tuple(ly.dora_scale.shape) == ((10, 1, 1, 1) if wd_on_out else (1, 6, 1, 1))
    with torch.no_grad():
        ly.lora_down.weight.copy_(ours.lora_A.weight)
        ly.lora_up.weight.copy_(ours.lora_B.weight)
        ly.dora_scale.copy_(ours.lora_magnitude_vector.reshape(ly.dora_scale.shape))
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    xl = x.detach().clone().requires_grad_(True)
    y, y_ly = ours(x), ly(xl)
    assert rel_err(y, y_ly) < TOL
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ly * w).sum().backward()
    assert rel_err(x.grad, xl.grad) < TOL
    assert rel_err(ours.lora_magnitude_vector.grad.reshape(-1), ly.dora_scale.grad.reshape(-1)) < TOL
    W_ly, _ = ly.get_merged_weight()
    assert rel_err(ours.merged_weight(), W_ly) < TOL
