"""DoRA and plain LoRA as one layer wrapping a frozen ``nn.Linear``.

DoRA: Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024, arXiv:2402.09353.
This module imports torch only and owns the layer math; finding modules to wrap lives in
``inject.py``, file formats in ``formats/``.

Notation (shapes)::

    W0 : (out, in)   frozen base weight          bias : (out,)   not rescaled
    A  : (r, in)     Kaiming-uniform at init     B    : (out, r) zeros at init
    s  = alpha / r   (alpha / sqrt(r) with rsLoRA)
    V  = W0 + s·B·A  : (out, in)                 x    : (T, in)  T = all leading dims

Magnitude axis ``"out"`` (default; NVlabs, PEFT and diffusers): m : (out,), m0 = ‖W0‖_row::

    W' = diag(m / ‖V‖_row) · V
    y  = g ⊙ (W0·x + s·B·(A·x)) + bias,        g = m / ‖V‖_row : (out,)

Magnitude axis ``"in"`` (the paper's Eq. 5 as written, kohya ``dora_scale (1, in)``);
m : (1, in), m0 = ‖W0‖_col::

    W' = V · diag(m / ‖V‖_col)
    y  = W0·x̃ + s·B·(A·x̃) + bias,              x̃ = x ⊙ g,  g = m / ‖V‖_col : (in,)

The norm is a constant in backward (paper §4.3), computed in fp32 and clamped at ``eps``
so rows/columns of zero norm give g = 0 instead of NaN (peft #2049).

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

Strength t (DESIGN §3) interpolates both deltas: m(t) = m0 + t·(m − m0), V(t) = W0 + t·s·B·A,
so t = 0 is exactly the base layer and t = 1 exactly the trained adapter.

Dropout (``dropout > 0``, training only) applies to the low-rank path's input, x_d = drop(x):
y = g ⊙ (W0·x + s·B·(A·x_d)) + bias. PEFT instead computes W0 twice, once on x_d; at eval
time (no dropout) the two agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conventions import MAGNITUDE_AXES, NORM_EPS



def _out_axis(x, x_d, weight, bias, lora_A, lora_B, g, scale):
    """y = g ⊙ (W0·x + s·B·(A·x_d)) + bias for 2-D x, x_d : (T, in); g : (out,). Returns (y, u)."""
    u = F.linear(x_d, lora_A)                                 # (T, r)
    y = F.linear(x, weight).addmm_(u, lora_B.t(), alpha=scale).mul_(g)   # (T, out)
    if bias is not None:
        y.add_(bias)
    return y, u


def _in_axis(x, x_d, weight, bias, lora_A, lora_B, g, scale):
    """y = W0·x̃ + s·B·(A·x̃_d) + bias, x̃ = x ⊙ g, for 2-D x, x_d : (T, in); g : (in,)."""
    xt = x * g                                                # (T, in)
    u = F.linear(xt if x_d is x else x_d * g, lora_A)         # (T, r)
    y = F.linear(xt, weight, bias).addmm_(u, lora_B.t(), alpha=scale)   # (T, out)
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
                h = x @ weight[rows].t() + s * (u @ lora_B[rows].t())  # (T, k)
                grad_g[rows] = (grad_y[:, rows] * h).sum(0)
        if need_x or need_xd:
            if ctx.same_input:
                grad_x = (Gg @ weight).addmm_(GgB, lora_A)    # (T, in)
            else:
                grad_x = Gg @ weight if need_x else None
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
        if ctx.same_input:
            dxt = (grad_y @ weight).addmm_(GB, lora_A)        # ∂L/∂x̃ : (T, in)
            if need_g:
                grad_g = torch.linalg.vecdot(dxt, x, dim=0)
            if need_x or need_xd:
                grad_x = dxt.mul_(g)
        else:
            dxt = grad_y @ weight                             # base path, input x
            dxt_d = GB @ lora_A                               # low-rank path, input x_d
            if need_g:
                grad_g = torch.linalg.vecdot(dxt, x, dim=0) + torch.linalg.vecdot(dxt_d, x_d, dim=0)
            grad_x = dxt.mul_(g) if need_x else None
            grad_xd = dxt_d.mul_(g) if need_xd else None
        return grad_x, grad_xd, None, None, grad_A, grad_B, grad_g, None


def low_rank_norm(weight, lora_A, lora_B, scale, axis, w0_sq=None, eps=NORM_EPS):
    """‖W0 + s·B·A‖ along ``axis`` ("out": per row → (out,), "in": per column → (in,)), fp32.

    ``w0_sq`` is ‖W0‖² along the axis if already known. See the module docstring for the
    formula; cross and square terms share one (out, r) or (r, in) matrix:
    ‖V_i:‖² = ‖W0_i:‖² + Σ_k B_ik·(2s·W0·Aᵀ + s²·B·A·Aᵀ)_ik. The result is clamped at
    ``eps`` so zero rows give g = 0, never NaN.
    """
    A, B = _as(lora_A, torch.float32), _as(lora_B, torch.float32)
    if axis == "out":
        if w0_sq is None:
            w0_sq = weight.float().square().sum(1)
        WA = _as(weight @ _as(lora_A, weight.dtype).t(), torch.float32)      # (out, r)
        M = torch.addmm(WA, B, A @ A.t(), beta=2.0 * scale, alpha=scale * scale)
        n2 = torch.linalg.vecdot(B, M, dim=1)                                  # (out,)
    else:
        if w0_sq is None:
            w0_sq = weight.float().square().sum(0)
        BW = _as(_as(lora_B, weight.dtype).t() @ weight, torch.float32)      # (r, in)
        M = torch.addmm(BW, B.t() @ B, A, beta=2.0 * scale, alpha=scale * scale)
        n2 = torch.linalg.vecdot(A, M, dim=0)                                  # (in,)
    return n2.add_(w0_sq).clamp_min_(eps * eps).sqrt_()


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def naive_norm(weight, lora_A, lora_B, scale, axis, eps=NORM_EPS):
    """Reference for ``low_rank_norm``: forms V = W0 + s·B·A explicitly (fp32)."""
    V = weight.float() + scale * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(V, dim=1 if axis == "out" else 0).clamp_min(eps)


class DoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a DoRA (or, with ``use_dora=False``, LoRA) adapter.

    State-dict names are PEFT's on-disk names: ``lora_A.weight`` (r, in),
    ``lora_B.weight`` (out, r), ``lora_magnitude_vector`` ((out,) for axis "out",
    (1, in) for axis "in"), and ``base_layer.*`` for the wrapped layer.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, use_dora: bool = True,
                 magnitude_axis: str = "out", rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"DoRALinear wraps nn.Linear, got {type(base).__name__}")
        if magnitude_axis not in MAGNITUDE_AXES:
            raise ValueError(f"magnitude_axis must be 'out' or 'in', got {magnitude_axis!r}")
        out_f, in_f = base.weight.shape
        if not 1 <= rank <= min(in_f, out_f):
            raise ValueError(f"rank {rank} must be between 1 and min(in, out) = {min(in_f, out_f)} "
                             f"for a Linear({in_f}, {out_f}); lower --rank")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        base.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha = int(rank), float(alpha)
        self.use_dora, self.magnitude_axis, self.rslora = bool(use_dora), magnitude_axis, bool(rslora)
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.strength = 1.0
        self.merged = False

        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(in_f, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, out_f, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT
        nn.init.zeros_(self.lora_B.weight)
        self._w0_sq = self._base_sq_norm()                  # fp32 cache, not a buffer: .to(fp16) must not touch it
        self._w0_backup = None
        self._g_cache = None
        if self.use_dora:
            shape = (out_f,) if magnitude_axis == "out" else (1, in_f)
            self.lora_magnitude_vector = nn.Parameter(torch.empty(shape, **factory))
            self.init_magnitude()
        else:
            self.lora_magnitude_vector = None

    # ---- magnitude -------------------------------------------------------------------
    def _base_sq_norm(self) -> torch.Tensor:
        """‖W0‖² along the magnitude axis, fp32: (out,) or (in,)."""
        W = self.base_layer.weight.detach().float()
        return W.square().sum(1 if self.magnitude_axis == "out" else 0)

    def _w0_sq_on(self, device) -> torch.Tensor:
        if self._w0_sq.device != device:
            self._w0_sq = self._w0_sq.to(device)
        return self._w0_sq

    def base_magnitude(self) -> torch.Tensor:
        """m0 = ‖W0‖ along the axis, fp32, flat: (out,) or (in,)."""
        return self._w0_sq_on(self.base_layer.weight.device).sqrt()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """m ← ‖W0‖ along the axis, so that with B = 0 the layer equals its base exactly."""
        m0 = self.base_magnitude()
        self.lora_magnitude_vector.copy_(m0.view_as(self.lora_magnitude_vector))

    def magnitude(self, strength: float | None = None) -> torch.Tensor:
        """m(t) = m0 + t·(m − m0), fp32, flat: (out,) or (in,)."""
        t = self.strength if strength is None else strength
        m = _as(self.lora_magnitude_vector, torch.float32)
        if self.magnitude_axis == "in":
            m = m.view(-1)                                    # (1, in) → (in,)
        if t == 1.0:
            return m
        m0 = self.base_magnitude()
        return m0 + t * (m - m0)

    def weight_norm(self, strength: float | None = None) -> torch.Tensor:
        """‖V(t)‖ along the axis (fp32, no grad), by the low-rank formula."""
        t = self.strength if strength is None else strength
        W = self.base_layer.weight
        with torch.no_grad():
            return low_rank_norm(W, self.lora_A.weight, self.lora_B.weight, t * self.scale,
                                 self.magnitude_axis, w0_sq=self._w0_sq_on(W.device))

    def _scale_vector(self, dtype) -> torch.Tensor:
        """g = m(t) / ‖V(t)‖ (the norm detached, paper §4.3) in ``dtype``: (out,) or (in,).

        Without gradients (inference) g is cached until A, B, m or the strength change."""
        params = (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._g_cache = None
            return _as(self.magnitude() / self.weight_norm(), dtype)
        key = (tuple((p.data_ptr(), p._version) for p in params), self.strength, dtype)
        if self._g_cache is None or self._g_cache[0] != key:
            self._g_cache = (key, _as(self.magnitude() / self.weight_norm(), dtype))
        return self._g_cache[1]

    # ---- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.strength == 0.0:
            return self.base_layer(x)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        W, bias = _as(self.base_layer.weight, dtype), self.base_layer.bias
        bias = None if bias is None else _as(bias, dtype)
        A, B = _as(self.lora_A.weight, dtype), _as(self.lora_B.weight, dtype)
        lead = x.shape[:-1]
        x2 = _as(x.reshape(-1, self.in_features), dtype)     # (T, in)
        x_d = self.dropout(x2) if self.training and isinstance(self.dropout, nn.Dropout) else x2
        s = self.strength * self.scale
        if not self.use_dora:                                 # plain LoRA: autograd is enough
            y = F.linear(x2, W, bias).addmm_(x_d @ A.t(), B.t(), alpha=s)
        else:
            g = self._scale_vector(dtype)
            if not (torch.is_grad_enabled() and (x2.requires_grad or g.requires_grad or A.requires_grad)):
                y, _ = (_out_axis if self.magnitude_axis == "out" else _in_axis)(x2, x_d, W, bias, A, B, g, s)
            elif autocast:
                with torch.autocast(device_type, enabled=False):
                    y = self._function.apply(x2, x_d, W, bias, A, B, g, s)
            else:
                y = self._function.apply(x2, x_d, W, bias, A, B, g, s)
        return y.reshape(*lead, self.out_features)            # (..., out)

    @property
    def _function(self):
        return _DoRAOutAxis if self.magnitude_axis == "out" else _DoRAInAxis

    # ---- merge -----------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, strength: float | None = None) -> torch.Tensor:
        """t·s·B·A in fp32: (out, in)."""
        t = self.strength if strength is None else strength
        return (t * self.scale) * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merged_weight(self, strength: float | None = None) -> torch.Tensor:
        """W'(t) in fp32: (out, in). ``strength`` defaults to the layer's current strength."""
        W0 = (self._w0_backup if self.merged else self.base_layer.weight).float()
        V = W0 + self.delta_weight(strength)                  # (out, in)
        if not self.use_dora:
            return V
        m = self.magnitude(strength)
        if self.magnitude_axis == "out":
            n = torch.linalg.vector_norm(V, dim=1).clamp_min(NORM_EPS)
            return V * (m / n)[:, None]
        n = torch.linalg.vector_norm(V, dim=0).clamp_min(NORM_EPS)
        return V * (m / n)[None, :]

    @torch.no_grad()
    def merge(self) -> None:
        """Write W'(strength) into the base layer in place; W0 is kept for ``unmerge``."""
        if self.merged:
            return
        W = self.merged_weight()
        if not torch.isfinite(W).all():
            raise ValueError("merged weight is not finite; the adapter is broken (NaN/inf in A, B or m)")
        base_w = self.base_layer.weight
        self._w0_backup = base_w.data
        base_w.data = W.to(base_w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 bit-exactly (the original tensor, not a subtraction)."""
        if not self.merged:
            return
        self.base_layer.weight.data = self._w0_backup
        self._w0_backup = None
        self.merged = False

    def set_strength(self, t: float) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before changing strength of a merged adapter")
        self.strength = float(t)

    # ---- adapter state -----------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}
        if self.use_dora:
            sd["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return sd

    @torch.no_grad()
    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise KeyError(f"adapter keys do not match this layer: missing {missing}, unexpected {unexpected}")
        for k, shape in expected.items():
            if tuple(sd[k].shape) != tuple(shape):
                raise ValueError(f"{k}: file has shape {tuple(sd[k].shape)}, layer expects {tuple(shape)} "
                                 f"(rank, magnitude axis or base model differ)")
        was_merged = self.merged
        self.unmerge()
        self.lora_A.weight.copy_(sd["lora_A.weight"])
        self.lora_B.weight.copy_(sd["lora_B.weight"])
        if self.use_dora:
            self.lora_magnitude_vector.copy_(sd["lora_magnitude_vector"])
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        kind = f"dora(axis={self.magnitude_axis})" if self.use_dora else "lora"
        return (f"in={self.in_features}, out={self.out_features}, {kind}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, strength={self.strength:g}, merged={self.merged}")


def dora_layers(module: nn.Module):
    """(qualified name, DoRALinear) for every adapter layer under ``module``."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, DoRALinear)]
