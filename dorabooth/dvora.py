"""DVoRA: the DoRA layer on a VeRA update (DoRA paper §5, "DVoRA"; VeRA, Kopiczko et al. 2024,
arXiv:2310.11454). Torch only, like :mod:`dorabooth.dora`, whose layer does the work.

VeRA freezes two random matrices and trains two scaling vectors::

    A : (r, in)    frozen, Kaiming-uniform       d : (r,)    trains, init d_initial = 0.1
    B : (out, r)   frozen, Kaiming-uniform       b : (out,)  trains, init 0
    ΔV = diag(b)·B·diag(d)·A                     (rank ≤ r; b = 0 makes ΔV = 0 at init)

DVoRA is DoRA with that update: :class:`DVoRALinear` is a :class:`~dorabooth.dora.DoRALinear`
whose factors are A' = diag(d)·A and B' = diag(b)·B, so the magnitude m, the detached norm, the
fused forward/backward, merges and strength are DoRA's, unchanged. Trainable per layer: r + out
(+ the magnitude, out or in) instead of DoRA's r·(in + out) (+ magnitude).

Projections (A, B) are a pure function of (seed, out, in, r) — "seeded per shape": a CPU
``torch.Generator`` seeded with :func:`projection_key` draws A then B exactly as PEFT's VeRA
``_kaiming_init`` does (uniform ±√3·√2/√fan_in, fan_in = the tensor's second dimension). Layers of
one shape share one pair (one copy in memory per device). PEFT instead draws one pair for the
largest (out, in) of the model and slices it; for a model with a single adapted shape the two
agree when PEFT's ``projection_prng_key`` is :func:`projection_key` (tested). An adapter is
therefore reproducible from d, b, m, the seed and each module's (out, in).
"""

from __future__ import annotations

import hashlib
import math
import weakref

import torch
from torch import nn

from .dora import DoRALinear

D_INITIAL = 0.1                  # VeRA's (and PEFT's) d_initial
PROJECTION = "peft-vera-kaiming-uniform/sha256(dorabooth-vera:seed:out:in)"   # recorded in files


def projection_key(seed: int, out_features: int, in_features: int) -> int:
    """The generator seed of the (out, in) projections: the first 63 bits of
    sha256("dorabooth-vera:{seed}:{out}:{in}"), so every shape and seed gets its own stream."""
    digest = hashlib.sha256(f"dorabooth-vera:{int(seed)}:{int(out_features)}:{int(in_features)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT ``vera.model._kaiming_init``: uniform ±√3·√2/√shape[1], drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projection(seed: int, out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A : (r, in), B : (out, r)) fp32 on the CPU: the same numbers on every machine for the same arguments."""
    generator = torch.Generator(device="cpu").manual_seed(projection_key(seed, out_features, in_features))
    A = _kaiming((rank, in_features), generator)
    B = _kaiming((out_features, rank), generator)
    return A, B


class Projection:
    """One shape's frozen (A, B), with a copy per device made when first asked for (shared by the
    layers holding this object; not a buffer, so ``.to(dtype)`` of a model never touches it)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device == self.A.device:
            return self.A, self.B
        if device not in self._copies:
            self._copies[device] = (self.A.to(device), self.B.to(device))
        return self._copies[device]


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_projection(seed: int, out_features: int, in_features: int, rank: int) -> Projection:
    """The :class:`Projection` for this shape, one object while any layer holds it."""
    key = (int(seed), int(out_features), int(in_features), int(rank))
    projection = _SHARED.get(key)
    if projection is None:
        projection = Projection(*vera_projection(*key))
        _SHARED[key] = projection
    return projection


def vera_factors(d: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag(d)·A, diag(b)·B): the DoRA factors of a VeRA update, fp32: (r, in), (out, r)."""
    return d.float()[:, None] * A.float(), b.float()[:, None] * B.float()


class DVoRALinear(DoRALinear):
    """A frozen ``nn.Linear`` with DoRA on a VeRA update (module docstring).

    Trainable: ``vera_lambda_d`` (r,), ``vera_lambda_b`` (out,) (PEFT's VeRA names) and
    ``lora_magnitude_vector`` (as DoRA). ``seed`` picks the frozen projections."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, seed: int, magnitude_axis: str = "out",
                 rslora: bool = False, dropout: float = 0.0, d_initial: float = D_INITIAL):
        self.vera_seed, self.d_initial = int(seed), float(d_initial)
        super().__init__(base, rank, alpha, use_dora=True, magnitude_axis=magnitude_axis, rslora=rslora,
                         dropout=dropout)

    def _init_factors(self, factory: dict) -> None:
        self.projection = shared_projection(self.vera_seed, self.out_features, self.in_features, self.rank)
        self.vera_lambda_d = nn.Parameter(torch.full((self.rank,), self.d_initial, **factory))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.projection.on(self.vera_lambda_d.device)
        return vera_factors(self.vera_lambda_d, self.vera_lambda_b, A, B)

    def adapter_parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.vera_lambda_d, self.vera_lambda_b, self.lora_magnitude_vector)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_d": self.vera_lambda_d.detach(), "vera_lambda_b": self.vera_lambda_b.detach(),
                "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    @torch.no_grad()
    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = {k: tuple(v.shape) for k, v in self.adapter_state_dict().items()}
        if set(sd) != set(expected) or any(tuple(sd[k].shape) != s for k, s in expected.items()):
            raise ValueError(f"DVoRA tensors {sorted((k, tuple(v.shape)) for k, v in sd.items())} do not fit this "
                             f"layer, which expects {sorted(expected.items())} (rank, axis or base model differ)")
        was_merged = self.merged
        self.unmerge()
        for k, p in zip(("vera_lambda_d", "vera_lambda_b", "lora_magnitude_vector"), self.adapter_parameters()):
            p.copy_(sd[k])
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        return super().extra_repr().replace("dora(", "dvora(", 1) + f", seed={self.vera_seed}"


def trainable_count(rank: int, out_features: int, in_features: int, magnitude_axis: str = "out") -> int:
    """Trainable numbers of one DVoRA layer: d (r) + b (out) + m (out or in)."""
    return rank + out_features + (out_features if magnitude_axis == "out" else in_features)
