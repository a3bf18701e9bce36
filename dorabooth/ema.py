"""An exponential moving average of the trainable tensors (``--ema-decay``).

After optimizer step n (1-based) the copy moves towards the weights by ``1 - decay(n)``::

    ema ← decay(n) · ema + (1 − decay(n)) · θ,     decay(n) = min(D, n / (n + 9)),  decay(1) = 0

which is diffusers' ``EMAModel`` with its defaults (``update_after_step=0``, no
``use_ema_warmup``: ``(1 + s) / (10 + s)`` with s = n − 1). The warm-up matters for DreamBooth's
few hundred steps: a fixed 0.999 would leave 0.999^500 ≈ 61 % of the weight on the untrained
initialisation after 500 steps. The EMA is used for previews and the final adapter
(:meth:`EMA.applied`); the raw weights keep training.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ClassVar

import torch


def ema_decay(step: int, decay: float) -> float:
    """The decay of the update after optimizer step ``step`` (1-based)."""
    return 0.0 if step <= 1 else min(decay, step / (step + 9))


class EMA:
    """fp32 copies of ``params`` (by the same names), on their devices."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.tensors = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the copies after optimizer step ``step``."""
        keep = ema_decay(step, self.decay)
        for name, p in self.params.items():
            self.tensors[name].lerp_(p.detach().float(), 1.0 - keep)   # e + (1-keep)·(θ - e)

    @contextmanager
    def applied(self):
        """The EMA weights in the model for the duration (samples, adapter files); the raw ones after."""
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.tensors[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(raw[n])

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.tensors) - set(tensors))
        if missing or len(tensors) != len(self.tensors):
            raise ValueError(f"the checkpoint's EMA does not match this run's trainable tensors (e.g. {missing[:3]})")
        for n, t in self.tensors.items():
            t.copy_(tensors[n])


class NoEMA:
    """``--ema-decay`` off: the same calls, doing nothing."""

    tensors: ClassVar[dict[str, torch.Tensor]] = {}

    def update(self, step: int) -> None:
        pass

    def applied(self):
        return nullcontext()


def make_ema(params: dict[str, torch.nn.Parameter], decay: float | None) -> EMA | NoEMA:
    return EMA(params, decay) if decay else NoEMA()
