"""QDoRA: the frozen base weight W0 of every adapted layer held in NF4 (``--quantize-base nf4``).

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314): blocks of 64
weights share one absmax scale, each weight is the index of the nearest of 16 levels spaced
as quantiles of N(0, 1), and the block scales are themselves quantised to int8 in groups
("double quantisation"). Storage: 0.5 byte per weight + 1 byte per 64 weights + a few bytes
per group, about 0.26 × bf16.

The quantiser is torchao's ``to_nf4`` (pure torch: the same code and numbers on CPU, CUDA and
MPS, so CI tests what a GPU runs). bitsandbytes' ``Linear4bit`` runs on CPU too (0.50.2),
but keeps its quantisation state in a Python object outside the module's buffers and
quantises when moved to CUDA, device-dependent paths the trainer would need to special-case.

:class:`NF4Linear` replaces the ``base_layer`` of a :class:`~dorabooth.dora.DoRALinear`; it
keeps the NF4 tensors as buffers (they move with the module, never change dtype) and
dequantises W0 on every call, in the compute dtype, in forward and again in backward, so no
dense copy of W0 lives between the two. The adapter layer computes its magnitude init and its
norm against that dequantised W0 (:meth:`DoRALinear.quantize_base`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import QUANTIZE_BASE  # noqa: F401 - the choices, kept where the config checks them

BLOCK = 64              # weights per absmax scale (QLoRA)
SCALER_BLOCK = 256      # scales per double-quantisation group (QLoRA); a divisor of the block count is used
EXTRA_HINT = "pip install 'dorabooth[qdora]' (torchao)"


def require_torchao():
    """torchao's ``to_nf4`` and ``NF4Tensor``; a ValueError (one line on the command line, as for a
    missing bitsandbytes) naming the extra to install when it is not there."""
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(max(level, logging.ERROR))      # "Failed to load _C_…so" for GPU-only kernels
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as e:
        raise ValueError(f"--quantize-base nf4 needs torchao, which this Python cannot import ({e}); "
                         f"{EXTRA_HINT}, or train without --quantize-base") from None
    finally:
        torchao_log.setLevel(level)
    return to_nf4, NF4Tensor


def check_quantize_available(kind: str) -> None:
    """Raise the one-line error before a run starts when ``kind`` needs a missing package."""
    if kind == "nf4":
        require_torchao()


def scaler_block(n_blocks: int) -> int:
    """The largest divisor of ``n_blocks`` not over SCALER_BLOCK (torchao needs an exact split:
    SD's 320 × 320 weights have 1600 blocks of 64, grouped by 200)."""
    return max(d for d in range(1, min(n_blocks, SCALER_BLOCK) + 1) if n_blocks % d == 0)


_LEVELS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _levels(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NF4's 16 levels (torchao's table) in ``dtype`` on ``device``, one tensor for every layer."""
    key = (dtype, device)
    if key not in _LEVELS:
        table = next(iter(_LEVELS.values()))
        _LEVELS[key] = table.to(device=device, dtype=dtype)
    return _LEVELS[key]


class _DequantLinear(torch.autograd.Function):
    """y = x·W0ᵀ + bias with W0 dequantised in forward and again in backward (nothing dense is
    saved; the bias is frozen)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None, None


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored in NF4; ``dequantize(dtype)`` gives W0 : (out, in)."""

    quantized = "nf4"

    def __init__(self, base: nn.Linear):
        super().__init__()
        to_nf4, _ = require_torchao()
        W = base.weight.detach()
        out_f, in_f = W.shape
        if W.numel() % BLOCK:
            raise ValueError(f"NF4 needs a multiple of {BLOCK} weights; Linear({in_f}, {out_f}) has {W.numel()}")
        nf4 = to_nf4(W.contiguous(), BLOCK, scaler_block(W.numel() // BLOCK))
        names, meta = nf4.__tensor_flatten__()
        self._inner = tuple(n for n in names if n != "nf4")     # the 16-level table is shared: _levels()
        for name in self._inner:
            self.register_buffer(name, getattr(nf4, name))
        _LEVELS.setdefault((nf4.nf4.dtype, nf4.nf4.device), nf4.nf4)
        self._meta = meta
        self.in_features, self.out_features = in_f, out_f
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype W0 had when quantised (what ``dequantize()`` returns by default)."""
        return self._meta["tensor_meta"].dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 : (out, in), dequantised now, in ``dtype`` (default: the dtype it was quantised from)."""
        _, NF4Tensor = require_torchao()
        data = self.quantized_data
        meta = {**self._meta, "tensor_meta": dataclasses.replace(self._meta["tensor_meta"], device=data.device)}
        shape = (self.out_features, self.in_features)
        inner = {n: getattr(self, n) for n in self._inner} | {"nf4": _levels(self.weight_dtype, data.device)}
        W = NF4Tensor.__tensor_unflatten__(inner, meta, shape, None)
        W = W.get_original_weight()
        return W if dtype is None or W.dtype == dtype else W.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self, bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def nbytes(self) -> int:
        """Bytes of the NF4 storage: 4-bit codes, int8 block scales, the group factors and mean (the
        16-level table, 64 bytes, is one for all layers)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._inner)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, bias={self.bias is not None}"


def quantize_adapted(modules, kind: str) -> int:
    """Put the base weight of every adapter layer under ``modules`` in ``kind`` ("nf4"); returns
    how many layers (Linear ones: a LoCon layer's conv base is left as it is). Call right after attaching (the magnitudes restart from the dequantised W0)."""
    if kind == "none":
        return 0
    from .inject import dora_modules
    layers = [layer for m in modules for _, layer in dora_modules(m)
              if isinstance(layer.base_layer, nn.Linear)]    # conv (LoCon) bases stay as they are
    for layer in layers:
        layer.quantize_base(NF4Linear)
    return len(layers)


def frozen_bytes(modules) -> tuple[int, int]:
    """(bytes of the adapted layers' frozen base weights as held, the same weights in bf16)."""
    from .inject import dora_modules
    held = bf16 = 0
    for m in modules:
        for _, layer in dora_modules(m):
            base = layer.base_layer
            if isinstance(base, nn.Conv2d):
                continue
            n = layer.out_features * layer.in_features
            held += base.nbytes() if isinstance(base, NF4Linear) else base.weight.numel() * base.weight.element_size()
            bf16 += 2 * n
    return held, bf16
