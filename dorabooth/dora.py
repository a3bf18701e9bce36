"""DoRA and plain LoRA as one layer wrapping a frozen ``nn.Linear`` (or ``nn.Conv2d``: :class:`DoRAConv2d`).

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

The layer's forward and backward run fused (:mod:`dorabooth.dora_autograd`, with the
low-rank norm that never forms V and the backward formulas); merges and exports compute W'(t)
with the pure :func:`dora_weight` below, in fp32.

Strength t (DESIGN §3) interpolates both deltas: m(t) = m0 + t·(m − m0) (:func:`magnitude_at`),
V(t) = W0 + t·s·B·A, so t = 0 is exactly the base layer and t = 1 exactly the trained adapter.

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
from .dora_autograd import cast, conv_dora_forward, dora_forward, low_rank_norm


class DoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a DoRA (or, with ``use_dora=False``, LoRA) adapter.

    State-dict names are PEFT's on-disk names: ``lora_A.weight`` (r, in),
    ``lora_B.weight`` (out, r), ``lora_magnitude_vector`` ((out,) for axis "out",
    (1, in) for axis "in"), and ``base_layer.*`` for the wrapped layer. Everything reads the
    low-rank factors through :meth:`factors`; :class:`dorabooth.dvora.DVoRALinear` overrides it
    (and ``_init_factors``) to feed DoRA the factors of a VeRA update.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, use_dora: bool = True,
                 magnitude_axis: str = "out", rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        self._check_base(base)
        if magnitude_axis not in MAGNITUDE_AXES:
            raise ValueError(f"magnitude_axis must be 'out' or 'in', got {magnitude_axis!r}")
        out_f, in_f = base.weight.shape[:2]
        if not 1 <= rank <= max_rank(base):
            raise ValueError(f"rank {rank} must be between 1 and {self._rank_bound(base)}; lower --rank")
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

        factory = {"device": base.weight.device, "dtype": torch.float32}
        self._init_factors(factory)
        self._w0_sq = self._base_sq_norm()                  # fp32 cache, not a buffer: .to(fp16) must not touch it
        self._w0_backup = None
        self._g_cache = None
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self._magnitude_shape(), **factory))
            self.init_magnitude()
        else:
            self.lora_magnitude_vector = None

    @staticmethod
    def _check_base(base: nn.Module) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"DoRALinear wraps nn.Linear, got {type(base).__name__}")

    @staticmethod
    def _rank_bound(base: nn.Module) -> str:
        out_f, in_f = base.weight.shape
        return f"min(in, out) = {min(in_f, out_f)} for a Linear({in_f}, {out_f})"

    def _magnitude_shape(self) -> tuple[int, ...]:
        """PEFT's shape of m: (out,) for axis "out", (1, in) for "in"."""
        return (self.out_features,) if self.magnitude_axis == "out" else (1, self.in_features)

    def _init_factors(self, factory: dict) -> None:
        """The trainable low-rank factors: A Kaiming-uniform, B zeros (as PEFT)."""
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, **factory)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT
        nn.init.zeros_(self.lora_B.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A : (r, in), B : (out, r)) in fp32, as the layer applies them (V = W0 + s·B·A)."""
        return self.lora_A.weight, self.lora_B.weight

    def adapter_parameters(self) -> tuple[torch.Tensor, ...]:
        """The tensors that train (what the inference cache of g watches)."""
        return (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector)

    # ---- magnitude -------------------------------------------------------------------
    def _base_sq_norm(self) -> torch.Tensor:
        """‖W0‖² along the magnitude axis, fp32: (out,) or (in,)."""
        W = self._dense_base().detach().float()
        return W.square().sum(1 if self.magnitude_axis == "out" else 0)

    def _dense_base(self) -> torch.Tensor:
        """W0 : (out, in) in its storage dtype; a quantised base (QDoRA) dequantised now."""
        base = self.base_layer
        return base.dequantize() if getattr(base, "quantized", None) else base.weight

    @property
    def quantized_base(self) -> str | None:
        """"nf4" when W0 is held quantised (:meth:`quantize_base`), else None."""
        return getattr(self.base_layer, "quantized", None)

    @torch.no_grad()
    def quantize_base(self, make) -> None:
        """QDoRA: hold W0 quantised, ``make(base_layer)`` → a module with ``dequantize(dtype)``
        (:class:`dorabooth.quantize.NF4Linear`). Forward, norm and magnitude then use the
        dequantised W0; the magnitude restarts from it (call right after attaching)."""
        if self.merged or self.quantized_base:
            raise RuntimeError("quantize_base() on a merged or already quantised layer")
        self.base_layer = make(self.base_layer)
        self._w0_sq = self._base_sq_norm()
        self._g_cache = None
        if self.use_dora:
            self.init_magnitude()

    def _w0_sq_on(self, device) -> torch.Tensor:
        if self._w0_sq.device != device:
            self._w0_sq = self._w0_sq.to(device)
        return self._w0_sq

    def base_magnitude(self) -> torch.Tensor:
        """m0 = ‖W0‖ along the axis, fp32, flat: (out,) or (in,)."""
        return self._w0_sq_on(self.adapter_parameters()[0].device).sqrt()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """m ← ‖W0‖ along the axis, so that with B = 0 the layer equals its base exactly."""
        m0 = self.base_magnitude()
        self.lora_magnitude_vector.copy_(m0.view_as(self.lora_magnitude_vector))

    def magnitude(self, strength: float | None = None) -> torch.Tensor:
        """m(t) = m0 + t·(m − m0), fp32, flat: (out,) or (in,)."""
        t = self.strength if strength is None else strength
        m = cast(self.lora_magnitude_vector, torch.float32)
        if self.magnitude_axis == "in":
            m = m.view(-1)                                    # (1, in) → (in,)
        return magnitude_at(m, self.base_magnitude(), t)

    def weight_norm(self, strength: float | None = None, factors=None) -> torch.Tensor:
        """‖V(t)‖ along the axis (fp32, no grad), by the low-rank formula; ``factors`` = (A, B) if at hand."""
        t = self.strength if strength is None else strength
        W = self._dense_base()
        with torch.no_grad():
            A, B = self.factors() if factors is None else factors
            return low_rank_norm(W, A.detach(), B.detach(), t * self.scale, self.magnitude_axis,
                                 w0_sq=self._w0_sq_on(W.device))

    def _scale_vector(self, dtype, factors=None) -> torch.Tensor:
        """g = m(t) / ‖V(t)‖ (the norm detached, paper §4.3) in ``dtype``: (out,) or (in,).

        Without gradients (inference) g is cached until the adapter's tensors or the strength change."""
        params = self.adapter_parameters()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._g_cache = None
            return cast(self.magnitude() / self.weight_norm(factors=factors), dtype)
        key = (tuple((p.data_ptr(), p._version) for p in params), self.strength, dtype)
        if self._g_cache is None or self._g_cache[0] != key:
            self._g_cache = (key, cast(self.magnitude() / self.weight_norm(factors=factors), dtype))
        return self._g_cache[1]

    # ---- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.strength == 0.0:
            return self.base_layer(x)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        base = self.base_layer                                # a quantised base is dequantised per call
        W, bias = (cast(base.weight, dtype) if isinstance(base, nn.Linear) else base), base.bias
        bias = None if bias is None else cast(bias, dtype)
        A32, B32 = self.factors()
        A, B = cast(A32, dtype), cast(B32, dtype)
        lead = x.shape[:-1]
        x2 = cast(x.reshape(-1, self.in_features), dtype)     # (T, in)
        x_d = self.dropout(x2) if self.training and isinstance(self.dropout, nn.Dropout) else x2
        s = self.strength * self.scale
        if not self.use_dora:                                 # plain LoRA: autograd is enough
            y = (F.linear(x2, W, bias) if W is not base else base(x2)).addmm_(x_d @ A.t(), B.t(), alpha=s)
        else:
            y = dora_forward(x2, x_d, W, bias, A, B, self._scale_vector(dtype, (A32, B32)), s, self.magnitude_axis)
        return y.reshape(*lead, self.out_features)            # (..., out)

    # ---- merge -----------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        """W0 : (out, in), also while the adapter is merged into the base layer (detached)."""
        return (self._w0_backup if self.merged else self._dense_base()).detach()

    @torch.no_grad()
    def merged_weight(self, strength: float | None = None) -> torch.Tensor:
        """W'(t) in fp32: (out, in) (:func:`dora_weight`). ``strength`` defaults to the layer's current strength."""
        A, B = self.factors()
        return dora_weight(self.base_weight, A, B, self.scale, self.lora_magnitude_vector,
                           self.magnitude_axis, t=self.strength if strength is None else strength)

    @torch.no_grad()
    def merge(self) -> None:
        """Write W'(strength) into the base layer in place; W0 is kept for ``unmerge``."""
        if self.merged:
            return
        if self.quantized_base:
            raise ValueError(f"the base weight is held in {self.quantized_base} (QDoRA training): merge the adapter "
                             f"into the unquantised base model (load it from its files, or dorabooth export)")
        base_w = self.base_layer.weight
        W = self.merged_weight().to(base_w.dtype)      # checked in the dtype it runs in: fp16 overflows at 65504
        if not torch.isfinite(W).all():
            raise ValueError(f"the merged weight at strength {self.strength:g} is not finite (NaN/inf) in "
                             f"{str(W.dtype).removeprefix('torch.')}: lower the strength, generate in fp32/bf16, or "
                             f"the adapter is broken")
        self._w0_backup = base_w.data
        base_w.data = W
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


class DoRAConv2d(DoRALinear):
    """A frozen ``nn.Conv2d`` plus a DoRA (or LoRA) adapter: LoCon, as PEFT and kohya build it.

    Shapes (k = kh·kw)::

        W0 : (out, in, kh, kw)     A = Conv2d(in, r, (kh, kw), stride, padding, dilation) : (r, in, kh, kw)
                                   B = Conv2d(r, out, 1×1)                                : (out, r, 1, 1)
        V  = W0 + s·B·A            (the (out, r)·(r, in·k) product, reshaped to W0's shape)

    Axis ``"out"`` (PEFT's conv DoRA): g = m / ‖V‖ per output channel over in×kh×kw,
    y = g ⊙ (conv(x, W0) + s·B(A(x))) + bias. Axis ``"in"`` (LyCORIS ``wd_on_out=False``,
    ComfyUI's ``weight_decompose`` with a (1, in, 1, 1) ``dora_scale``): g per input channel
    over out×kh×kw, y = conv(x̃, W0) + s·B(A(x̃)) + bias with x̃ = x ⊙ g per channel (zero
    padding commutes with the channel scale). The norm is detached. Axis "out" without dropout
    runs fused (:func:`dorabooth.dora_autograd.conv_dora_forward`: V formed once per call, one
    base-sized convolution with g ⊙ V, the backward's formulas there); axis "in", dropout and
    plain LoRA use the low-rank norm (never forming V) and autograd.

    ``lora_magnitude_vector``: (1, out, 1, 1) for axis "out" (PEFT's shape), (1, in) for "in".
    Grouped convolutions and padding modes other than zeros are refused (SD UNets have none).
    """

    @staticmethod
    def _check_base(base: nn.Module) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"DoRAConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"DoRAConv2d needs groups=1 and zero padding, got groups={base.groups}, "
                             f"padding_mode={base.padding_mode!r}; leave this conv out of --targets")

    @staticmethod
    def _rank_bound(base: nn.Module) -> str:
        out_f, in_f, kh, kw = base.weight.shape
        return f"min(out, in·kh·kw) = {conv_max_rank(base)} for a Conv2d({in_f}, {out_f}, {(kh, kw)})"

    def _magnitude_shape(self) -> tuple[int, ...]:
        """PEFT's conv shape (1, out, 1, 1) for axis "out"; (1, in) for "in" (kohya/ComfyUI reshape it)."""
        return (1, self.out_features, 1, 1) if self.magnitude_axis == "out" else (1, self.in_features)

    def _init_factors(self, factory: dict) -> None:
        """A : Conv2d(in, r, k×k, the base's stride/padding/dilation) Kaiming-uniform, B : 1×1 zeros (as PEFT)."""
        base = self.base_layer
        self.lora_A = nn.Conv2d(self.in_features, self.rank, base.kernel_size, base.stride, base.padding,
                                base.dilation, bias=False, **factory)
        self.lora_B = nn.Conv2d(self.rank, self.out_features, 1, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT
        nn.init.zeros_(self.lora_B.weight)

    @property
    def kernel(self) -> int:
        """kh·kw: the group size of the low-rank norm's flattened columns."""
        kh, kw = self.base_layer.kernel_size
        return kh * kw

    def _base_sq_norm(self) -> torch.Tensor:
        W = self.base_layer.weight.detach().float()
        return W.square().sum((1, 2, 3) if self.magnitude_axis == "out" else (0, 2, 3))

    def magnitude(self, strength: float | None = None) -> torch.Tensor:
        t = self.strength if strength is None else strength
        m = cast(self.lora_magnitude_vector, torch.float32).reshape(-1)
        return magnitude_at(m, self.base_magnitude(), t)

    def weight_norm(self, strength: float | None = None, factors=None) -> torch.Tensor:
        """‖V(t)‖ per output or input channel (fp32, no grad), by the low-rank formula; ``factors`` = (A, B) if at hand."""
        t = self.strength if strength is None else strength
        W = self.base_layer.weight
        A, B = self.factors() if factors is None else factors
        with torch.no_grad():
            return low_rank_norm(W.reshape(self.out_features, -1), A.detach().reshape(self.rank, -1),
                                 B.detach().reshape(self.out_features, self.rank), t * self.scale,
                                 self.magnitude_axis, w0_sq=self._w0_sq_on(W.device), group=self.kernel)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        b = self.base_layer
        return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.strength == 0.0:
            return self.base_layer(x)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        W, bias = cast(self.base_layer.weight, dtype), self.base_layer.bias
        bias = None if bias is None else cast(bias, dtype)
        A, B = cast(self.lora_A.weight, dtype), cast(self.lora_B.weight, dtype)
        x = cast(x, dtype)                                    # (N, in, H, W) or (in, H, W)
        drop = self.training and isinstance(self.dropout, nn.Dropout)
        s = self.strength * self.scale
        if not self.use_dora:
            x_d = self.dropout(x) if drop else x
            return self._conv(x, W, bias).add_(F.conv2d(self._conv(x_d, A), B), alpha=s)
        if self.magnitude_axis == "out" and not drop and not isinstance(self.base_layer.padding, str):
            b = self.base_layer
            return conv_dora_forward(x, W, bias, A, B, self.magnitude(), s, (b.stride, b.padding, b.dilation))
        g = self._scale_vector(dtype).view(-1, 1, 1)          # (C, 1, 1): broadcasts over channels
        if self.magnitude_axis == "out":
            x_d = self.dropout(x) if drop else x
            h = self._conv(x, W).add_(F.conv2d(self._conv(x_d, A), B), alpha=s)   # (N, out, H', W')
            y = h * g
            return y if bias is None else y.add_(bias.view(-1, 1, 1))
        xt = x * g                                            # x̃ = x ⊙ g per input channel
        xt_d = self.dropout(xt) if drop else xt
        return self._conv(xt, W, bias).add_(F.conv2d(self._conv(xt_d, A), B), alpha=s)

    @torch.no_grad()
    def merged_weight(self, strength: float | None = None) -> torch.Tensor:
        """W'(t) in fp32: (out, in, kh, kw) (:func:`dora_weight`)."""
        return super().merged_weight(strength)

    def extra_repr(self) -> str:
        kind = f"dora(axis={self.magnitude_axis})" if self.use_dora else "lora"
        kh, kw = self.base_layer.kernel_size
        return (f"in={self.in_features}, out={self.out_features}, kernel=({kh}, {kw}), {kind}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, strength={self.strength:g}, merged={self.merged}")


def conv_max_rank(conv: nn.Conv2d) -> int:
    """The largest LoCon rank of ``conv``: min(out, in·kh·kw), the rank of its flattened weight."""
    out_f, in_f, kh, kw = conv.weight.shape
    return min(out_f, in_f * kh * kw)


def max_rank(module: nn.Module) -> int:
    """The largest adapter rank of a Linear (min(in, out)) or Conv2d (min(out, in·kh·kw))."""
    if isinstance(module, nn.Conv2d):
        return conv_max_rank(module)
    return min(module.weight.shape)


def adapter_layer(base: nn.Module, rank: int, alpha: float, **kwargs) -> DoRALinear:
    """The adapter layer for ``base``: :class:`DoRALinear` for a Linear, :class:`DoRAConv2d` for a Conv2d."""
    return (DoRAConv2d if isinstance(base, nn.Conv2d) else DoRALinear)(base, rank, alpha, **kwargs)


# ---- pure functions ------------------------------------------------------------------------
def magnitude_at(m: torch.Tensor, m0: torch.Tensor, t: float, start: torch.Tensor | None = None) -> torch.Tensor:
    """m(t) = m0 + t·(m − m0) (DESIGN §3): m0 at t = 0, m itself at t = 1. Flat (out,) or (in,).

    ``start``: the norm of the weight the adapter is applied to when that is not the base it
    was trained on (several adapters merged one after another, ``export``):
    m(t) = start + t·(m − m0), each adapter adding its own magnitude change.
    """
    if start is not None:
        return start + t * (m - m0)
    return m if t == 1.0 else m0 + t * (m - m0)


def axis_norm(W: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖ along ``axis`` in fp32, clamped at NORM_EPS: per row (out,) for "out", per column (in,) for "in".

    A conv weight (out, in, kh, kw): per output channel over in×kh×kw ("out"), per input
    channel over out×kh×kw ("in"), as PEFT and LyCORIS/ComfyUI ``weight_decompose`` do."""
    others = tuple(d for d in range(W.ndim) if d != (0 if axis == "out" else 1))
    return torch.linalg.vector_norm(W.detach().float(), dim=others).clamp_min(NORM_EPS)


def _axis_view(g: torch.Tensor, axis: str, ndim: int) -> torch.Tensor:
    """g (out,) or (in,) shaped to broadcast over a weight of ``ndim`` dims along ``axis``."""
    return g.view(-1, *[1] * (ndim - 1)) if axis == "out" else g.view(1, -1, *[1] * (ndim - 2))


@torch.no_grad()
def dora_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, m: torch.Tensor | None = None,
                axis: str | None = None, *, t: float = 1.0, m0: torch.Tensor | None = None) -> torch.Tensor:
    """W'(t) in fp32: (out, in) or, for a conv, (out, in, kh, kw). The one definition of what an
    adapter does to a weight::

        V(t) = W + t·s·B·A
        m(t) = ‖W‖ + t·(m − m0)                    (norms along ``axis``)
        W'   = diag(m(t) / ‖V(t)‖_row) · V(t)      axis "out"
        W'   = V(t) · diag(m(t) / ‖V(t)‖_col)      axis "in"
        W'   = V(t)                                 plain LoRA (``m`` None)

    ``W`` : (out, in), the weight the adapter is applied to (any dtype); ``A`` : (r, in);
    ``B`` : (out, r); ``scale`` : s = alpha / r (alpha / sqrt(r) with rsLoRA); ``m`` : (out,)
    or (in,) by ``axis`` (any shape with that many entries, e.g. (1, in)). ``m0`` : ‖W0‖ of
    the base the adapter was trained on; default ‖W‖, a single adapter on its own base, where
    m(t) = m0 + t·(m − m0) as in the live layer. ``t = 0`` returns ``W`` unchanged (bit for
    bit, as a copy in fp32). Norms are clamped at NORM_EPS.

    Conv (LoCon): ``W`` (out, in, kh, kw), ``A`` (r, in, kh, kw), ``B`` (out, r, 1, 1);
    B·A is the product of the flattened (out, r) and (r, in·kh·kw) matrices, and the norms
    are :func:`axis_norm`'s (per output channel over in×kh×kw, or per input channel over out×kh×kw).
    """
    W = W.detach().float()
    shape = (B.shape[0], A.shape[1], *A.shape[2:])
    if tuple(W.shape) != shape:
        raise ValueError(f"adapter is for a {shape} weight, the base weight is {tuple(W.shape)}; "
                         f"it was made for another model")
    if m is not None and axis not in MAGNITUDE_AXES:
        raise ValueError(f"magnitude axis must be 'out' or 'in', got {axis!r}")
    if t == 0.0:
        return W.clone()
    delta = B.float().reshape(B.shape[0], -1) @ A.float().reshape(A.shape[0], -1)    # (out, in·kh·kw)
    V = W + (t * scale) * delta.view_as(W)                                            # W's shape
    if m is None:
        return V
    n = axis_norm(W, axis)                                                            # (out,) or (in,)
    m_t = magnitude_at(m.float().reshape(-1), n if m0 is None else m0.float().reshape(-1), t, start=n)
    g = m_t / axis_norm(V, axis)
    return V * _axis_view(g, axis, V.ndim)


def dora_layers(module: nn.Module):
    """(qualified name, DoRALinear or DoRAConv2d) for every adapter layer under ``module``."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, DoRALinear)]
