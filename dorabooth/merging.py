"""Merging adapters into base weights: pure functions on state dicts, in fp32.

The exporter writes what these return; none of them modifies the pipeline or the adapter
it is given. Base weights come from the pipeline (``W0`` of attached, even merged, adapter
layers), new tensors are made for the result, and nothing is written here.

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

from collections.abc import Mapping, Sequence

import torch

from .dora import DoRALinear, axis_norm, magnitude_at
from .formats.files import check_finite
from .formats.neutral import Adapter, ModuleAdapter, adapted_weight, split_module_key
from .inject import module_name

MERGE_DEFINITION = ("sequential: V_k = W_{k-1} + t_k s_k B_k A_k; m_k = |W_{k-1}| + t_k (m_k - |W_0|); "
                    "W_k = V_k m_k / |V_k| along each adapter's magnitude axis; strength 0 skipped")
CHECKPOINT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


# ---- base weights of a pipeline ------------------------------------------------------------------
def pipeline_weight(pipe, key: str) -> torch.Tensor:
    """W0 of a neutral module key in ``pipe`` (the base weight even under an attached or merged adapter)."""
    component, path = split_module_key(key)
    model = getattr(pipe, component, None)
    if model is None:
        raise ValueError(f"the pipeline has no {component}, but the adapter has {key}")
    try:
        module = model.get_submodule(module_name(model, component, path))
    except AttributeError:
        raise ValueError(f"{key} does not exist in this {type(model).__name__}; the adapter was made for "
                         f"another base model") from None
    if isinstance(module, DoRALinear):
        return module.base_weight
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{key} is a {type(module).__name__}, not a Linear layer")
    return module.weight.detach()


def pipeline_weights(pipe, keys) -> dict[str, torch.Tensor]:
    """``{module key: W0}`` for ``keys``."""
    return {k: pipeline_weight(pipe, k) for k in keys}


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
def merge_weights(base: Mapping[str, torch.Tensor],
                  adapters: Sequence[tuple[Adapter, float]]) -> dict[str, torch.Tensor]:
    """``{module key: W'}`` (fp32) for every module an adapter at non-zero strength touches.

    ``base``: ``{module key: W0}`` for those modules. The module docstring defines the result
    for several adapters; ``base`` is never modified.
    """
    current: dict[str, torch.Tensor] = {}
    for adapter, t in adapters:
        if t == 0.0:
            continue
        for key, mod in adapter.modules.items():
            if key not in base:
                raise KeyError(f"no base weight for {key}")
            W0 = base[key].float()
            W = current.get(key, W0)
            trained = axis_norm(W0, mod.axis) if mod.is_dora else None
            current[key] = adapted_weight(W, mod, t, trained_norm=trained)
    return current


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
                   targets=adapter.targets, lora_alpha=adapter.lora_alpha)


def merged_components(pipe, merged: Mapping[str, torch.Tensor],
                      dtype: torch.dtype | None) -> dict[str, dict[str, torch.Tensor]]:
    """Clean state dicts of the pipeline's checkpoint components with the ``merged`` weights in
    place, cast to ``dtype`` (None: each tensor keeps its dtype), checked finite."""
    comps = {}
    for name in CHECKPOINT_COMPONENTS:
        model = getattr(pipe, name, None)
        if model is None:
            continue
        sd = clean_state_dict(model)
        for key, W in merged.items():
            component, param = weight_name(pipe, key)
            if component == name:
                sd[param] = W.to(sd[param].dtype if dtype is None else dtype)
        if dtype is not None:
            sd = cast(sd, dtype)
        check_finite(sd, name)
        comps[name] = sd
    return comps


def cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype``, the rest as they are."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
