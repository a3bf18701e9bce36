"""Invariants of the DoRA/LoRA layer and parity with PEFT (axis out) and LyCORIS (axis in)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dorabooth.dora import DoRALinear
from dorabooth.dora_autograd import low_rank_norm, naive_norm

AXES = ["out", "in"]


def make_layer(axis="out", use_dora=True, in_f=24, out_f=16, rank=4, alpha=8.0, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = DoRALinear(base, rank, alpha, use_dora=use_dora, magnitude_axis=axis, **kw)
    return layer


def randomise(layer, seed=1):
    """Non-trivial A, B and m, so merge/gradient tests exercise every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
        if layer.use_dora:
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
    return layer


def reference_forward(layer, x):
    """The DESIGN §3 formula written naively: form W' with the norm detached, then F.linear."""
    t, s = layer.strength, layer.scale
    W0 = layer.base_layer.weight
    V = W0 + t * s * (layer.lora_B.weight @ layer.lora_A.weight)
    if not layer.use_dora:
        return F.linear(x, V, layer.base_layer.bias)
    m = layer.lora_magnitude_vector.reshape(-1)
    m0 = layer.base_magnitude()
    m_t = m0 + t * (m - m0)
    if layer.magnitude_axis == "out":
        n = V.norm(dim=1).detach()
        W = V * (m_t / n)[:, None]
    else:
        n = V.norm(dim=0).detach()
        W = V * (m_t / n)[None, :]
    return F.linear(x, W, layer.base_layer.bias)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("use_dora", [True, False])
def test_equals_base_at_init(axis, use_dora):
    layer = make_layer(axis, use_dora)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-6, atol=1e-6)
    if use_dora:
        m0 = layer.base_magnitude()
        assert torch.equal(layer.lora_magnitude_vector.reshape(-1), m0)
        expected_shape = (16,) if axis == "out" else (1, 24)
        assert tuple(layer.lora_magnitude_vector.shape) == expected_shape


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.5, 1.3])
def test_forward_and_grads_match_reference(axis, use_dora, strength):
    layer = randomise(make_layer(axis, use_dora))
    layer.set_strength(strength)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 7, 24, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = layer(x), reference_forward(ref, xr)
    assert rel_err(y, yr) < 1e-5
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yr * w).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-5
    pairs = [(layer.lora_A.weight, ref.lora_A.weight), (layer.lora_B.weight, ref.lora_B.weight)]
    if use_dora:
        pairs.append((layer.lora_magnitude_vector, ref.lora_magnitude_vector))
    for p, q in pairs:
        assert rel_err(p.grad, q.grad) < 1e-5


@pytest.mark.parametrize("axis", AXES)
def test_only_adapter_parameters_get_gradients(axis):
    layer = randomise(make_layer(axis))
    layer(torch.randn(4, 24)).square().sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert not layer.base_layer.weight.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("axis", AXES)
def test_input_without_grad_and_dropout_path(axis):
    layer = randomise(make_layer(axis, dropout=0.5))
    layer.train()
    x = torch.randn(5, 24)                 # no grad on the input: first layer of a frozen stack
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None
    layer.eval()                           # dropout off at eval: same as the reference
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_merged_equals_unmerged_and_unmerge_restores_w0(axis, use_dora, strength):
    layer = randomise(make_layer(axis, use_dora))
    layer.set_strength(strength)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 24)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(layer.base_layer.weight, w0)
        y_merged = layer(x)
        layer.unmerge()
    assert rel_err(y_merged, y) < 1e-5
    assert torch.equal(layer.base_layer.weight, w0)          # bit-exact, not subtracted
    with pytest.raises(RuntimeError):
        layer.merge()
        layer.set_strength(0.3)


@pytest.mark.parametrize("axis", AXES)
def test_strength_zero_is_base_and_one_is_adapter(axis):
    layer = randomise(make_layer(axis))
    x = torch.randn(4, 24)
    layer.set_strength(0.0)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.allclose(layer.merged_weight(), layer.base_layer.weight, rtol=1e-6, atol=1e-7)
    # both deltas interpolate: m(t) = m0 + t(m - m0) and V(t) = W0 + t s B A
    t = 0.25
    W = layer.merged_weight(t)
    V = layer.base_layer.weight + t * layer.scale * layer.lora_B.weight @ layer.lora_A.weight
    m_t = layer.base_magnitude() + t * (layer.lora_magnitude_vector.reshape(-1) - layer.base_magnitude())
    dim = 1 if axis == "out" else 0
    torch.testing.assert_close(W.norm(dim=dim), m_t, rtol=1e-5, atol=1e-6)
    cos = F.cosine_similarity(W, V.detach(), dim=dim)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)


@pytest.mark.parametrize("axis", AXES)
def test_low_rank_norm_equals_naive_norm(axis):
    torch.manual_seed(3)
    for out_f, in_f, r in [(16, 24, 4), (64, 32, 8), (7, 300, 5)]:
        W = torch.randn(out_f, in_f)
        A, B = torch.randn(r, in_f), torch.randn(out_f, r)
        for s in (0.0, 0.1, 2.0):
            fast = low_rank_norm(W, A, B, s, axis)
            slow = naive_norm(W, A, B, s, axis)
            assert rel_err(fast, slow) < 1e-5, (out_f, in_f, r, s)


@pytest.mark.parametrize("axis", AXES)
def test_zero_norm_rows_give_no_nan_and_correct_grads(axis):
    layer = make_layer(axis)
    with torch.no_grad():
        if axis == "out":
            layer.base_layer.weight[3].zero_()
        else:
            layer.base_layer.weight[:, 5].zero_()
    layer._w0_sq = layer._base_sq_norm()
    layer.init_magnitude()
    x = torch.randn(4, 24)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, layer.base_layer(x))
    # a non-zero B makes the zero row/column trainable; its magnitude gradient must be exact
    randomise(layer)
    with torch.no_grad():
        if axis == "out":
            layer.lora_magnitude_vector[3] = 0.0
        else:
            layer.lora_magnitude_vector[0, 5] = 0.0
    ref = copy.deepcopy(layer)
    layer(x).square().sum().backward()
    reference_forward(ref, x).square().sum().backward()
    g, gr = layer.lora_magnitude_vector.grad, ref.lora_magnitude_vector.grad
    assert torch.isfinite(g).all()
    assert rel_err(g, gr) < 1e-5


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(axis, dtype):
    layer = randomise(make_layer(axis, in_f=64, out_f=48, rank=8))
    layer.base_layer.to(dtype)
    x = torch.randn(3, 10, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, x):
        assert torch.isfinite(p.grad).all()
    assert layer.lora_A.weight.grad.dtype == torch.float32   # adapters stay fp32
    ref_layer = copy.deepcopy(layer)
    ref_layer.base_layer.float()
    ref = reference_forward(ref_layer, x.detach().float())
    assert rel_err(y.float(), ref) < 3e-2


def test_autocast_bf16():
    layer = randomise(make_layer("out", in_f=64, out_f=48, rank=8))
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(layer.lora_magnitude_vector.grad).all()


def test_eval_cache_invalidates_on_parameter_change():
    layer = randomise(make_layer("out"))
    x = torch.randn(3, 24)
    with torch.no_grad():
        y1 = layer(x)
        layer.lora_magnitude_vector.mul_(1.5)
        y2 = layer(x)
    torch.testing.assert_close(y2, reference_forward(layer, x).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y1, y2)


def test_errors_say_what_to_change():
    with pytest.raises(ValueError, match="rank 32 must be between 1 and min"):
        DoRALinear(nn.Linear(24, 16), 32, 32)
    with pytest.raises(ValueError, match="magnitude_axis"):
        DoRALinear(nn.Linear(24, 16), 4, 4, magnitude_axis="row")
    with pytest.raises(TypeError, match="nn.Linear"):
        DoRALinear(nn.Conv2d(3, 3, 1), 1, 1)
    layer = make_layer("out")
    bad = layer.adapter_state_dict() | {"lora_A.weight": torch.zeros(3, 24)}
    with pytest.raises(ValueError, match="lora_A.weight: file has shape"):
        layer.load_adapter_state_dict(bad)
    with pytest.raises(KeyError, match="missing"):
        layer.load_adapter_state_dict({"lora_A.weight": torch.zeros(4, 24)})


def test_rslora_scale():
    layer = make_layer("out", rank=4, alpha=8.0, rslora=True)
    assert layer.scale == pytest.approx(8.0 / 2.0)


# ---- oracles --------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 16)


@pytest.mark.parametrize("use_dora", [True, False])
def test_parity_with_peft(use_dora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = _Net()
    pnet = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["lin"], use_dora=use_dora, lora_dropout=0.0))
    plin = pnet.base_model.model.lin
    ours = randomise(DoRALinear(net.lin, 4, 8.0, use_dora=use_dora))
    with torch.no_grad():
        plin.lora_A["default"].weight.copy_(ours.lora_A.weight)
        plin.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if use_dora:
            plin.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    x = torch.randn(3, 9, 24, requires_grad=True)
    xp = x.detach().clone().requires_grad_(True)
    y, yp = ours(x), plin(xp)
    assert rel_err(y, yp) < 1e-5
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yp * w).sum().backward()
    assert rel_err(x.grad, xp.grad) < 1e-5
    assert rel_err(ours.lora_A.weight.grad, plin.lora_A["default"].weight.grad) < 1e-5
    assert rel_err(ours.lora_B.weight.grad, plin.lora_B["default"].weight.grad) < 1e-5
    if use_dora:
        assert rel_err(ours.lora_magnitude_vector.grad, plin.lora_magnitude_vector["default"].weight.grad) < 1e-5
    with torch.no_grad():                     # PEFT's merge agrees with ours
        plin.merge(safe_merge=True)
    assert rel_err(ours.merged_weight(), plin.get_base_layer().weight) < 1e-5


@pytest.mark.parametrize("wd_on_out", [False, True])
def test_parity_with_lycoris(wd_on_out):
    lycoris = pytest.importorskip("lycoris.modules.locon")
    axis = "out" if wd_on_out else "in"
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    ly = lycoris.LoConModule("lin", copy.deepcopy(base), 1.0, lora_dim=4, alpha=8,
                             weight_decompose=True, wd_on_out=wd_on_out)
    ly.apply_to()
    ours = randomise(DoRALinear(base, 4, 8.0, magnitude_axis=axis))
    with torch.no_grad():
        ly.lora_down.weight.copy_(ours.lora_A.weight)
        ly.lora_up.weight.copy_(ours.lora_B.weight)
        ly.dora_scale.copy_(ours.lora_magnitude_vector.reshape(ly.dora_scale.shape))
    x = torch.randn(5, 24)
    y_ly = ly(x)
    y = ours(x)
    assert rel_err(y, y_ly) < 1e-5
    # LyCORIS does not detach the norm; its merged weight equals ours, and our gradients equal
    # the detached formula (checked against reference_forward above), so compare the weights.
    W_ly, _ = ly.get_merged_weight()
    assert rel_err(ours.merged_weight(), W_ly) < 1e-5
    # strength: LyCORIS scales only the magnitude factor and applies ΔW in full, we interpolate
    # both deltas (DESIGN §3); at t = 1 they agree, at t != 1 they must differ.
    W_ly_half, _ = ly.get_merged_weight(multiplier=0.5)
    assert rel_err(ours.merged_weight(0.5), W_ly_half) > 1e-3
