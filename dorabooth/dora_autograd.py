"""The fused DoRA forward/backward and the low-rank norm: the fast path of ``dora.DoRALinear``.

Torch only. Notation and the forward formulas are in :mod:`dorabooth.dora`'s docstring; x, x_d
are 2-D (T, in), T = all leading dims; g = m / ‖V‖ : (out,) for axis "out", (in,) for "in".

Low-rank norm (never forms the (out, in) matrix V; ‖W0‖² is cached, W0 is frozen)::

    ‖V_i:‖² = ‖W0_i:‖² + 2s·Σ_k B_ik (W0·Aᵀ)_ik + s²·Σ_k B_ik (B·(A·Aᵀ))_ik
              W0·Aᵀ : (out, r),  A·Aᵀ : (r, r)            — axis "out"
    ‖V_:j‖² = ‖W0_:j‖² + 2s·Σ_k A_kj (Bᵀ·W0)_kj + s²·Σ_k A_kj ((Bᵀ·B)·A)_kj
              Bᵀ·W0 : (r, in),   Bᵀ·B : (r, r)            — axis "in"

Both cost O(out·in·r) time and (out + in)·r memory instead of out·in.

Backward (custom autograd functions below; G = ∂L/∂y : (T, out), u = A·x : (T, r))::

    axis "out":  h = W0·x + s·B·u,  Gg = G ⊙ g
        ∂L/∂g = Σ_t G ⊙ h      (h recovered from the saved output: h = (y − bias) / g)
        ∂L/∂B = s·Ggᵀ·u        ∂L/∂A = s·(Gg·B)ᵀ·x        ∂L/∂x = Gg·W0 + s·(Gg·B)·A
    axis "in":   Gx̃ = G·W0 + s·(G·B)·A
        ∂L/∂g = Σ_t Gx̃ ⊙ x     ∂L/∂B = s·Gᵀ·u             ∂L/∂A = s·(G·B)ᵀ·x̃
        ∂L/∂x = Gx̃ ⊙ g

Saved for backward: x and u (what LoRA saves) plus, for axis "out", the layer's own output
(which attention keeps anyway for q/k/v). ∂L/∂m then follows from g = m / ‖V‖ by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conventions import NORM_EPS


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, the same tensor when it already is (no call into ``.to``)."""
    return t if t.dtype == dtype else t.to(dtype)


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """W0 as a tensor in ``dtype``. ``weight`` is a tensor, or a quantised base layer (QDoRA,
    :class:`dorabooth.quantize.NF4Linear`) that is dequantised here, on every call: the autograd
    functions below keep the quantised layer, not a dense copy, between forward and backward."""
    return cast(weight, dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


def dora_forward(x, x_d, weight, bias, lora_A, lora_B, g, scale, axis):
    """y : (T, out) for 2-D x, x_d : (T, in), all in one dtype; g : (out,) or (in,) by ``axis``;
    ``weight`` a tensor in that dtype or a quantised base layer (:func:`dense`).

    Without a gradient to compute this is the plain formula; with one, the fused autograd
    function (outside autocast: its inputs are already in the compute dtype)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or g.requires_grad or lora_A.requires_grad)):
        y, _ = (_out_axis if axis == "out" else _in_axis)(x, x_d, weight, bias, lora_A, lora_B, g, scale)
        return y
    function = _DoRAOutAxis if axis == "out" else _DoRAInAxis
    return _apply_outside_autocast(function, x, x_d, weight, bias, lora_A, lora_B, g, scale)


def _apply_outside_autocast(function, x, *args):
    """``function.apply(x, *args)`` with autocast off: the inputs are already in the compute dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return function.apply(x, *args)
    return function.apply(x, *args)


def _out_axis(x, x_d, weight, bias, lora_A, lora_B, g, scale):
    """y = g ⊙ (W0·x + s·B·(A·x_d)) + bias for 2-D x, x_d : (T, in); g : (out,). Returns (y, u)."""
    u = F.linear(x_d, lora_A)                                 # (T, r)
    y = F.linear(x, dense(weight, x.dtype)).addmm_(u, lora_B.t(), alpha=scale).mul_(g)   # (T, out)
    if bias is not None:
        y.add_(bias)
    return y, u


def _in_axis(x, x_d, weight, bias, lora_A, lora_B, g, scale):
    """y = W0·x̃ + s·B·(A·x̃_d) + bias, x̃ = x ⊙ g, for 2-D x, x_d : (T, in); g : (in,)."""
    xt = x * g                                                # (T, in)
    u = F.linear(xt if x_d is x else x_d * g, lora_A)         # (T, r)
    y = F.linear(xt, dense(weight, xt.dtype), bias).addmm_(u, lora_B.t(), alpha=scale)   # (T, out)
    return y, u


class _DoRAOutAxis(torch.autograd.Function):
    """``_out_axis`` with a backward that saves x, u and the output only.

    The frozen weight, bias and the (small) adapter matrices ride on ``ctx`` directly: they
    are not activations, and packing them as saved tensors costs time in every layer.
    """

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_A, lora_B, g, scale):
        y, u = _out_axis(x, x_d, weight, bias, lora_A, lora_B, g, scale)
        ctx.scale, ctx.same_input = scale, x_d is x
        ctx.weight, ctx.bias, ctx.lora_A, ctx.lora_B, ctx.g = weight, bias, lora_A, lora_B, g.detach()
        ctx.save_for_backward(x, x_d, u, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_d, u, y = ctx.saved_tensors
        s, weight, bias, lora_A, lora_B, g = ctx.scale, ctx.weight, ctx.bias, ctx.lora_A, ctx.lora_B, ctx.g
        need_x, need_xd, _, _, need_A, need_B, need_g, _ = ctx.needs_input_grad
        grad_x = grad_xd = grad_A = grad_B = grad_g = None

        Gg = grad_y * g                                       # (T, out)
        GgB = Gg @ (lora_B * s)                               # s·Gg·B : (T, r)
        if need_B:
            grad_B = (Gg.t() @ u).mul_(s)                     # (out, r)
        if need_A:
            grad_A = GgB.t() @ x_d                            # (r, in)
        if need_g:
            # Σ_t G·h with h = (y − bias)/g, without a (T, out) copy of h.
            Gy = torch.linalg.vecdot(grad_y, y, dim=0)        # (out,)
            if bias is not None:
                Gy.sub_(grad_y.sum(0).mul_(bias))
            if bool(g.all()):
                grad_g = Gy.div_(g)
            else:                                             # g = 0 hides h: recompute those rows
                rows = (g == 0).nonzero().squeeze(1)
                grad_g = Gy.div_(torch.where(g == 0, torch.ones_like(g), g))
                h = x @ dense(weight, x.dtype)[rows].t() + s * (u @ lora_B[rows].t())  # (T, k)
                grad_g[rows] = (grad_y[:, rows] * h).sum(0)
        if need_x or need_xd:
            W = dense(weight, Gg.dtype)
            if ctx.same_input:
                grad_x = (Gg @ W).addmm_(GgB, lora_A)         # (T, in)
            else:
                grad_x = Gg @ W if need_x else None
                grad_xd = GgB @ lora_A if need_xd else None
        return grad_x, grad_xd, None, None, grad_A, grad_B, grad_g, None


class _DoRAInAxis(torch.autograd.Function):
    """``_in_axis`` with a backward that saves x and u only (frozen tensors ride on ``ctx``)."""

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_A, lora_B, g, scale):
        y, u = _in_axis(x, x_d, weight, bias, lora_A, lora_B, g, scale)
        ctx.scale, ctx.same_input = scale, x_d is x
        ctx.weight, ctx.lora_A, ctx.lora_B, ctx.g = weight, lora_A, lora_B, g.detach()
        ctx.save_for_backward(x, x_d, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_d, u = ctx.saved_tensors
        s, weight, lora_A, lora_B, g = ctx.scale, ctx.weight, ctx.lora_A, ctx.lora_B, ctx.g
        need_x, need_xd, _, _, need_A, need_B, need_g, _ = ctx.needs_input_grad
        grad_x = grad_xd = grad_A = grad_B = grad_g = None

        GB = grad_y @ (lora_B * s)                            # s·G·B : (T, r)
        if need_B:
            grad_B = (grad_y.t() @ u).mul_(s)                 # (out, r)
        if need_A:
            grad_A = GB.t() @ (x_d * g)                       # (r, in)
        W = dense(weight, grad_y.dtype)
        if ctx.same_input:
            dxt = (grad_y @ W).addmm_(GB, lora_A)             # ∂L/∂x̃ : (T, in)
            if need_g:
                grad_g = torch.linalg.vecdot(dxt, x, dim=0)
            if need_x or need_xd:
                grad_x = dxt.mul_(g)
        else:
            dxt = grad_y @ W                                  # base path, input x
            dxt_d = GB @ lora_A                               # low-rank path, input x_d
            if need_g:
                grad_g = torch.linalg.vecdot(dxt, x, dim=0) + torch.linalg.vecdot(dxt_d, x_d, dim=0)
            grad_x = dxt.mul_(g) if need_x else None
            grad_xd = dxt_d.mul_(g) if need_xd else None
        return grad_x, grad_xd, None, None, grad_A, grad_B, grad_g, None


def low_rank_norm(weight, lora_A, lora_B, scale, axis, w0_sq=None, eps=NORM_EPS, group=1):
    """‖W0 + s·B·A‖ along ``axis`` ("out": per row → (out,), "in": per column → (in,)), fp32.

    ``group`` > 1: a conv's flattened matrices W0 : (out, in·k), A : (r, in·k), k = kh·kw;
    axis "in" then sums the squared column norms of each input channel's k columns → (in,)
    (``w0_sq`` is (in,) then). Axis "out" needs nothing: a row is already in×kh×kw.

    ``w0_sq`` is ‖W0‖² along the axis if already known. See the module docstring for the
    formula; cross and square terms share one (out, r) or (r, in) matrix:
    ‖V_i:‖² = ‖W0_i:‖² + Σ_k B_ik·(2s·W0·Aᵀ + s²·B·A·Aᵀ)_ik. The result is clamped at
    ``eps`` so zero rows give g = 0, never NaN.
    """
    A, B = cast(lora_A, torch.float32), cast(lora_B, torch.float32)
    if axis == "out":
        if w0_sq is None:
            w0_sq = weight.float().square().sum(1)
        WA = cast(weight @ cast(lora_A, weight.dtype).t(), torch.float32)    # (out, r)
        M = torch.addmm(WA, B, A @ A.t(), beta=2.0 * scale, alpha=scale * scale)
        n2 = torch.linalg.vecdot(B, M, dim=1)                                 # (out,)
    else:
        if w0_sq is None:
            w0_sq = weight.float().square().sum(0).view(-1, group).sum(1)
        BW = cast(cast(lora_B, weight.dtype).t() @ weight, torch.float32)    # (r, in)
        M = torch.addmm(BW, B.t() @ B, A, beta=2.0 * scale, alpha=scale * scale)
        n2 = torch.linalg.vecdot(A, M, dim=0)                                 # (in·group,)
        if group > 1:
            n2 = n2.view(-1, group).sum(1)                                    # (in,)
    return n2.add_(w0_sq).clamp_min_(eps * eps).sqrt_()


def naive_norm(weight, lora_A, lora_B, scale, axis, eps=NORM_EPS):
    """Reference for ``low_rank_norm``: forms V = W0 + s·B·A explicitly (fp32)."""
    V = weight.float() + scale * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(V, dim=1 if axis == "out" else 0).clamp_min(eps)


# ---- Conv2d, axis "out" -------------------------------------------------------------------------
# A LoCon layer (A : Conv2d(in, r, kh×kw), B : 1×1 Conv2d(r, out)) is a conv whose weight is
# V = W0 + s·B·A (the (out, r)·(r, in·kh·kw) product): one weight-sized matmul, small beside an
# activation-sized convolution, and its row norms come with it. So the forward convolves once
# with W' = g ⊙ V, g = m / ‖V‖ (bias in the call), and the backward takes ∂L/∂x from that one
# weight (formed again rather than kept: a conv weight per adapted layer would otherwise live from
# forward to backward); only u = A(x) is convolved besides, for the adapter's gradients. With
# P = the output pixels, G = ∂L/∂y : (N, out, P), u : (N, r, P)::
#
#     ∂L/∂x = conv_backward_input(G, W')       ∂L/∂B = s·g ⊙ Σ_n G·uᵀ          : (out, r)
#     ∂L/∂A = conv_backward_weight(s·(g ⊙ B)ᵀ·G, x)
#     ∂L/∂m = Σ G ⊙ h / ‖V‖ = Σ G ⊙ (y − bias) / m   (g·‖V‖ = m; from the saved output)
#
# The small matrices absorb g and s, so no activation-sized tensor is scaled. The layer passes
# m(t) and s·t (strength t); dropout on the low-rank input takes the layer's own path.

def conv_direction(weight, lora_A, lora_B, scale, m, eps=NORM_EPS):
    """(W', g): W' = g ⊙ V per output channel in ``weight``'s dtype and shape, V = W0 + s·B·A and
    g = m / ‖V‖ (clamped at ``eps``; fp32, no grad) formed in fp32."""
    out = weight.shape[0]
    V = torch.addmm(cast(weight, torch.float32).reshape(out, -1), cast(lora_B, torch.float32).reshape(out, -1),
                    cast(lora_A, torch.float32).reshape(lora_A.shape[0], -1), alpha=scale)
    g = cast(m.detach(), torch.float32) / torch.linalg.vector_norm(V, dim=1).clamp_min_(eps)
    return cast(V.mul_(g.view(-1, 1)), weight.dtype).view_as(weight), g


def conv_dora_forward(x, weight, bias, lora_A, lora_B, m, scale, conv):
    """y = g ⊙ (conv(x, W0) + s·B(A(x))) + bias, g = m / ‖W0 + s·B·A‖ per output channel, for
    x : (N, in, H, W) in the dtype of ``weight``, ``lora_A``, ``lora_B`` and ``bias``; m : (out,)
    fp32; ``conv`` = the base's (stride, padding, dilation). An unbatched x : (in, H, W) gives
    (out, H', W')."""
    if x.dim() == 3:
        return conv_dora_forward(x.unsqueeze(0), weight, bias, lora_A, lora_B, m, scale, conv).squeeze(0)
    if not (torch.is_grad_enabled() and (x.requires_grad or m.requires_grad or lora_A.requires_grad)):
        return F.conv2d(x, conv_direction(weight, lora_A, lora_B, scale, m)[0], bias, *conv)
    return _apply_outside_autocast(_ConvDoRAOutAxis, x, weight, bias, lora_A, lora_B, m, scale, conv)


class _ConvDoRAOutAxis(torch.autograd.Function):
    """Saves x, u = A(x) and the output; the frozen weight and the small tensors ride on ``ctx``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, m, scale, conv):
        Wg, g = conv_direction(weight, lora_A, lora_B, scale, m)
        y = F.conv2d(x, Wg, bias, *conv)
        u = F.conv2d(x, lora_A, None, *conv)
        ctx.scale, ctx.conv = scale, conv
        ctx.weight, ctx.bias, ctx.lora_A, ctx.lora_B, ctx.m, ctx.g = weight, bias, lora_A, lora_B, m.detach(), g
        ctx.save_for_backward(x, u, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, u, y = ctx.saved_tensors
        s, conv, bias, lora_A, lora_B, g = ctx.scale, ctx.conv, ctx.bias, ctx.lora_A, ctx.lora_B, ctx.g
        need_x, _, _, need_A, need_B, need_m, _, _ = ctx.needs_input_grad
        grad_x = grad_A = grad_B = grad_m = None
        n, out = grad_y.shape[:2]
        G = grad_y.reshape(n, out, -1)                                       # (N, out, P)
        sg = cast(g * s, grad_y.dtype).view(-1, 1)                           # (out, 1)
        if need_B:
            grad_B = torch.matmul(G, u.reshape(n, u.shape[1], -1).transpose(1, 2)).sum(0)     # (out, r)
            grad_B = grad_B.mul_(sg).view_as(lora_B)
        if need_A:
            Gu = torch.matmul((lora_B.reshape(out, -1) * sg).t(), G).view_as(u)   # ∂L/∂u : (N, r, H', W')
            grad_A = torch.ops.aten.convolution_backward(Gu, x, lora_A, None, *conv, False, [0, 0], 1,
                                                         [False, True, False])[1]
        if need_m:
            Gy = (grad_y * y).sum((0, 2, 3)).float()                          # Σ G ⊙ (g ⊙ h + bias)
            if bias is not None:
                Gy.sub_(grad_y.sum((0, 2, 3)).float().mul_(bias.float()))
            m = ctx.m                                                         # g·‖V‖ = m: Σ G ⊙ h / ‖V‖ = Gy / m
            if bool(m.all()):
                grad_m = Gy.div_(m)
            else:                                                             # m = 0 hides h: recompute those channels
                rows = (m == 0).nonzero().squeeze(1)
                ones = torch.ones(len(rows), dtype=torch.float32, device=m.device)
                V = conv_direction(ctx.weight[rows], lora_A, lora_B[rows], s, ones)[0]   # V / ‖V‖, those rows
                grad_m = Gy.div_(torch.where(m == 0, 1.0, m))
                grad_m[rows] = (grad_y[:, rows] * F.conv2d(x, V, None, *conv)).sum((0, 2, 3)).float()
        if need_x:
            Wg = conv_direction(ctx.weight, lora_A, lora_B, s, ctx.m)[0]
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, Wg, None, *conv, False, [0, 0], 1,
                                                         [True, False, False])[0]
        return grad_x, None, None, grad_A, grad_B, grad_m, None, None
