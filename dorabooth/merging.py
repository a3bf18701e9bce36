"""Merging adapters into base weights: pure functions on state dicts, in fp32.

The exporter writes what these return; none of them modifies the pipeline or the adapter
it is given. Base weights come from a *weight source* (``names``/``dtype``/``shape``/``read``
per component and parameter name): the base model's files (:mod:`dorabooth.weights`, read one
tensor at a time) or a loaded pipeline (:class:`PipelineWeights`: ``W0`` of attached, even
merged, adapter layers). :class:`MergedWeights` is itself such a source, the base with the
adapters merged in, so a writer streams a merged checkpoint one tensor at a time; new tensors
are made for the result, and nothing is written here.

**Several adapters** ``(a_1, t_1), …, (a_n, t_n)`` are applied one after another, each to the
weight the previous ones produced (``W_0`` = the base weight)::

    V_k   = W_{k-1} + t_k · s_k · B_k · A_k
    m_k   = ‖W_{k-1}‖ + t_k · (m_k,file − ‖W_0‖)            (norms along a_k's axis)
    W_k   = V_k · m_k / ‖V_k‖                               (row- or column-wise by the axis)

so every adapter contributes its own learned magnitude change ``m − m₀`` (measured against
the base it was trained on) and its own direction update ``s·B·A``. With one adapter this
is exactly DESIGN §3 (``m(t) = m₀ + t·(m − m₀)``, ``V(t) = W0 + t·s·B·A``); an adapter at
strength 0 is skipped, so a strength-0 export equals the base weights bit for bit. PEFT's
multi-adapter DoRA merge does not follow any sequential definition (peft #3608).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from .dora import DoRALinear, axis_norm, magnitude_at
from .formats.neutral import Adapter, ModuleAdapter, adapted_weight, split_module_key
from .inject import module_name

MERGE_DEFINITION = ("sequential: V_k = W_{k-1} + t_k s_k B_k A_k; m_k = |W_{k-1}| + t_k (m_k - |W_0|); "
                    "W_k = V_k m_k / |V_k| along each adapter's magnitude axis; strength 0 skipped")


# ---- base weights of a pipeline ------------------------------------------------------------------
def _base_module(pipe, key: str) -> torch.nn.Module:
    """The module of a neutral module key in ``pipe`` (a Linear or Conv2d, or a dorabooth layer wrapping one)."""
    component, path = split_module_key(key)
    model = getattr(pipe, component, None)
    if model is None:
        raise ValueError(f"the pipeline has no {component}, but the adapter has {key}")
    try:
        module = model.get_submodule(module_name(model, component, path))
    except AttributeError:
        raise ValueError(f"{key} does not exist in this {type(model).__name__}; the adapter was made for "
                         f"another base model") from None
    if not isinstance(module, (DoRALinear, torch.nn.Linear, torch.nn.Conv2d)):
        raise ValueError(f"{key} is a {type(module).__name__}, not a Linear or Conv2d layer")
    return module


def pipeline_weight(pipe, key: str) -> torch.Tensor:
    """W0 of a neutral module key in ``pipe`` (the base weight even under an attached or merged adapter)."""
    module = _base_module(pipe, key)
    return module.base_weight if isinstance(module, DoRALinear) else module.weight.detach()


def pipeline_weights(pipe, keys) -> dict[str, torch.Tensor]:
    """``{module key: W0}`` for ``keys``."""
    return {k: pipeline_weight(pipe, k) for k in keys}


class ModuleWeights(Mapping):
    """``{module key: W0}`` for ``keys``, each read from ``source`` when asked (never all at once);
    the keys are checked against ``pipe`` (a skeleton is enough) when it is made."""

    def __init__(self, pipe, source, keys):
        for key in keys:
            _base_module(pipe, key)
        self.names = {key: weight_name(pipe, key) for key in keys}
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.read(*self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class PipelineWeights:
    """A weight source over a loaded pipeline: its checkpoint components' clean state dicts
    (:func:`clean_state_dict`: W0 under attached adapters), by reference."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._sd: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def components(self) -> list[str]:
        return [c for c, m in self.pipe.components.items() if isinstance(m, torch.nn.Module)]

    def _state(self, component: str) -> dict[str, torch.Tensor]:
        if component not in self._sd:
            self._sd[component] = clean_state_dict(getattr(self.pipe, component))
        return self._sd[component]

    def names(self, component: str) -> list[str]:
        return list(self._state(component))

    def dtype(self, component: str, name: str) -> torch.dtype:
        return self._state(component)[name].dtype

    def shape(self, component: str, name: str) -> tuple[int, ...]:
        return tuple(self._state(component)[name].shape)

    def read(self, component: str, name: str) -> torch.Tensor:
        return self._state(component)[name].detach()

    def close(self) -> None:
        self._sd.clear()


def clean_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as if no dorabooth adapter were attached (W0 under merged layers)."""
    out = {}
    for k, v in model.state_dict().items():
        if any(f".{p}" in f".{k}" for p in ("lora_A.", "lora_B.", "lora_magnitude_vector")):
            continue
        out[k.replace(".base_layer.", ".")] = v
    for name, layer in model.named_modules():
        if isinstance(layer, DoRALinear) and layer.merged:
            out[f"{name}.weight"] = layer.base_weight
    return out


def weight_name(pipe, key: str) -> tuple[str, str]:
    """(component, parameter name) of a module key's weight in ``pipe``'s own naming."""
    component, path = split_module_key(key)
    return component, f"{module_name(getattr(pipe, component), component, path)}.weight"


# ---- merge ---------------------------------------------------------------------------------------
@torch.no_grad()
def merged_weight(key: str, W0: torch.Tensor, adapters: Sequence[tuple[Adapter, float]]) -> torch.Tensor | None:
    """W' (fp32) of module ``key`` with base weight ``W0`` (the module docstring's definition),
    or None when no adapter at non-zero strength touches it. ``W0`` is never modified."""
    W, base = None, W0.float()
    for adapter, t in adapters:
        mod = adapter.modules.get(key)
        if t == 0.0 or mod is None:
            continue
        trained = axis_norm(base, mod.axis) if mod.is_dora else None
        W = adapted_weight(base if W is None else W, mod, t, trained_norm=trained)
    return W


@torch.no_grad()
def merge_weights(base: Mapping[str, torch.Tensor],
                  adapters: Sequence[tuple[Adapter, float]]) -> dict[str, torch.Tensor]:
    """``{module key: W'}`` (fp32) for every module an adapter at non-zero strength touches.

    ``base``: ``{module key: W0}`` for those modules. The module docstring defines the result
    for several adapters; ``base`` is never modified.
    """
    keys = sorted({k for adapter, t in adapters if t != 0.0 for k in adapter.modules})
    for key in keys:
        if key not in base:
            raise KeyError(f"no base weight for {key}")
    return {key: merged_weight(key, base[key], adapters) for key in keys}


class MergedWeights:
    """A weight source: ``base`` (a source) with ``adapters`` merged in, one tensor at a time.

    Merged tensors are computed in fp32 when read; every floating-point tensor comes back in
    ``dtype`` (None: the dtype it is stored in). The adapters' modules are checked against
    ``pipe`` (a skeleton is enough) when it is made."""

    def __init__(self, pipe, base, adapters: Sequence[tuple[Adapter, float]], dtype: torch.dtype | None = None):
        keys = sorted({k for adapter, t in adapters if t != 0.0 for k in adapter.modules})
        for key in {k for adapter, _ in adapters for k in adapter.modules}:
            _base_module(pipe, key)
        self.merged = {weight_name(pipe, key): key for key in keys}      # (component, parameter) → module key
        self.base, self.adapters, self.out_dtype = base, list(adapters), dtype
        self.components = base.components

    def names(self, component: str) -> list[str]:
        return self.base.names(component)

    def shape(self, component: str, name: str) -> tuple[int, ...]:
        return self.base.shape(component, name)

    def dtype(self, component: str, name: str) -> torch.dtype:
        stored = self.base.dtype(component, name)
        return self.out_dtype if self.out_dtype is not None and stored.is_floating_point else stored

    def read(self, component: str, name: str) -> torch.Tensor:
        value = self.base.read(component, name)
        key = self.merged.get((component, name))
        if key is not None:
            value = merged_weight(key, value, self.adapters)
        return value.to(self.dtype(component, name))

    def close(self) -> None:
        self.base.close()


@torch.no_grad()
def bake_strength(adapter: Adapter, t: float, base: Mapping[str, torch.Tensor]) -> Adapter:
    """The adapter whose strength-1 effect equals ``adapter`` at strength ``t``: B ← t·B and
    m ← m₀ + t·(m − m₀) (m₀ = ‖W0‖ of the base, needed for DoRA modules only)."""
    if t == 1.0:
        return adapter
    modules = {}
    for key, m in adapter.modules.items():
        mag = magnitude_at(m.magnitude, axis_norm(base[key], m.axis), t) if m.is_dora else None
        modules[key] = ModuleAdapter(m.down, t * m.up, m.scale, mag, m.axis)
    return Adapter(modules=modules, family=adapter.family, format=adapter.format, source=adapter.source,
                   metadata=adapter.metadata, rslora=adapter.rslora, base_model=adapter.base_model,
                   targets=adapter.targets, lora_alpha=adapter.lora_alpha, subject=adapter.subject,
                   base_hash=adapter.base_hash)


