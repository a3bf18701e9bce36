"""Any adapter file → the neutral :class:`~dorabooth.formats.neutral.Adapter`, and back.

Readers: diffusers/PEFT (our canonical file and stock ``save_lora_weights`` files, through
:mod:`.diffusers_lora`; PEFT ``adapter_model.safetensors`` with ``base_model.model.`` keys),
kohya / LyCORIS / OneTrainer (:mod:`.kohya`). Writers: ``diffusers-lora`` (axis ``out``
only: PEFT's magnitude is one value per output row) and ``kohya`` (both axes).
A magnitude axis is never changed: converting an axis-``in`` adapter to diffusers-lora is
refused with the formats that can carry it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from . import diffusers_lora, kohya
from .files import read_metadata, read_safetensors, write_safetensors
from .layout import UNetLayout
from ..version import __version__
from .neutral import Adapter, ModuleAdapter, axis_from_shape, scale_for, split_module_key

ADAPTER_FORMATS = ("diffusers-lora", "kohya")
_DIFFUSERS_SUFFIXES = tuple(diffusers_lora._READ_SUFFIXES)
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")

AXIS_IN_REFUSAL = (
    "this DoRA adapter has a per-input magnitude (axis 'in', one value per input column, (1, in)); "
    "the diffusers/PEFT format can only hold a per-output magnitude ((out,), one value per output row), "
    "and converting one into the other would change what the adapter does. Write it as --format kohya "
    "(dora_scale (1, in): applied exactly by ComfyUI and A1111), export a merged checkpoint "
    "(--format merged-diffusers or merged-single-file, exact everywhere), or train with "
    "--magnitude-axis out for a diffusers-lora file")


def detect_format(keys: list[str], meta: dict[str, str]) -> str:
    """"diffusers", "peft", "kohya"; raises for base checkpoints and unknown files."""
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) and k.endswith(_DIFFUSERS_SUFFIXES)
           for k in keys):
        return "diffusers"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys) or any(k.startswith("down_blocks.") for k in keys):
        raise ValueError("a base model checkpoint, not an adapter; pass it as --model")
    raise ValueError(f"no known adapter layout (diffusers/PEFT lora_A/lora_B, kohya lora_down/lora_up); "
                     f"first keys: {sorted(keys)[:3]}")


def read_adapter_file(path: str | os.PathLike) -> Adapter:
    """Read any supported adapter file; errors name the file."""
    p = Path(path)
    if p.is_dir():
        for name in ("adapter.safetensors", diffusers_lora.WEIGHT_NAME):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"{p}: folder holds neither adapter.safetensors (a dorabooth run) nor "
                                    f"{diffusers_lora.WEIGHT_NAME}")
    keys, meta = read_metadata(p, "adapter file")
    try:
        kind = detect_format(keys, meta)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    if kind == "kohya":
        tensors, meta = read_safetensors(p, "adapter file")
        return kohya.read_state_dict(tensors, meta, str(p))
    if kind == "peft":
        return _read_peft(p)
    return from_adapter_file(diffusers_lora.read_adapter(p))


def from_adapter_file(af: "diffusers_lora.AdapterFile") -> Adapter:
    """helper: diffusers/PEFT ``AdapterFile`` (canonical tensors + per-component config) → neutral."""
    modules, shapes = {}, {}
    for component, spec in af.components.items():
        s = scale_for(spec.alpha, spec.rank, spec.rslora)
        for module in spec.modules:
            key = f"{component}.{module}"
            down = af.tensors[f"{key}.lora_A.weight"]
            up = af.tensors[f"{key}.lora_B.weight"]
            m = af.tensors.get(f"{key}.{diffusers_lora.MAGNITUDE}")
            if m is not None:
                shapes[key] = tuple(m.shape)
            modules[key] = ModuleAdapter(down, up, s, None if m is None else m.reshape(-1),
                                         spec.magnitude_axis if m is not None else None)
    rs = {c.rslora for c in af.components.values()}
    stated = "dorabooth.format_version" in af.metadata
    axes = {c.magnitude_axis for c in af.components.values() if c.use_dora}
    kind = "DoRA" if axes else "LoRA"
    return Adapter(modules=modules, family=af.family,
                   format=f"diffusers/PEFT ({kind}{', magnitude (out,)' if axes == {'out'} else ', magnitude (1, in)' if axes == {'in'} else ''}"
                          f"{', dorabooth' if stated else ''})",
                   source=str(af.path), metadata=dict(af.metadata), rslora=rs.pop() if len(rs) == 1 else None,
                   base_model=af.base_model,
                   targets={c: list(spec.targets) for c, spec in af.components.items()},
                   magnitude_shapes=shapes)


def _read_peft(p: Path) -> Adapter:
    """PEFT ``save_pretrained`` of one model: ``base_model.model.<module>.lora_A.weight`` keys,
    LoraConfig in ``adapter_config.json`` next to the file (else scale 1)."""
    tensors, meta = read_safetensors(p, "adapter file")
    config = {}
    cfg_path = p.with_name("adapter_config.json")
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        rest = key.removeprefix("base_model.model.")
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight"):
            if rest.endswith("." + suffix):
                groups.setdefault(rest[: -len(suffix) - 1], {})[suffix.split(".")[0]] = t
                break
        else:
            unknown.append(key)
    r = config.get("r")
    alpha = config.get("lora_alpha")
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for module, g in groups.items():
        if "lora_A" not in g or "lora_B" not in g:
            raise ValueError(f"{p}: {module} lacks lora_A or lora_B; the file is incomplete")
        rank = g["lora_A"].shape[0]
        s = scale_for(alpha, rank, rslora) if r is not None else 1.0
        component = "text_encoder" if module.startswith(("text_model.", "encoder.layers.")) else "unet"
        path = module if component == "unet" else ("text_model." + module if not module.startswith("text_model.") else module)
        m = g.get("lora_magnitude_vector")
        axis = None if m is None else axis_from_shape(tuple(m.shape), g["lora_B"].shape[0], g["lora_A"].shape[1])
        modules[f"{component}.{path}"] = ModuleAdapter(g["lora_A"], g["lora_B"], s,
                                                       None if m is None else m.reshape(-1), axis)
    if not modules:
        raise ValueError(f"{p}: no PEFT adapter tensors found")
    note = "" if cfg_path.is_file() else ", no adapter_config.json: scale 1 assumed"
    return Adapter(modules=modules, family=None, format=f"PEFT save_pretrained{note}", source=str(p),
                   metadata=meta, unknown_keys=tuple(unknown), rslora=rslora)


# ---- writers ---------------------------------------------------------------------------------
def write_kohya(adapter: Adapter, path: str | os.PathLike, *, family: str, layout: UNetLayout,
                dtype: torch.dtype = torch.float32, title: str = "", base_model: str | None = None,
                overwrite: bool = True) -> Path:
    sd = kohya.to_state_dict(adapter, family, layout, dtype)
    meta = kohya.metadata(adapter, family, layout, title=title or Path(path).stem, base_model=base_model)
    return write_safetensors(path, sd, meta, overwrite=overwrite)


def _component_spec(adapter: Adapter, component: str, keys: list[str]) -> diffusers_lora.ComponentAdapter:
    mods = [adapter.modules[k] for k in keys]
    ranks = {m.rank for m in mods}
    scales = {round(m.scale, 9) for m in mods}
    kinds = {m.is_dora for m in mods}
    axes = {m.axis for m in mods if m.is_dora}
    if len(ranks) > 1 or len(scales) > 1 or len(kinds) > 1 or len(axes) > 1:
        raise ValueError(f"{component}: modules differ in rank {sorted(ranks)}, scale or method; the "
                         f"diffusers-lora format holds one rank/alpha/method per component (kohya holds any)")
    rank = ranks.pop()
    rslora = bool(adapter.rslora)
    alpha = mods[0].scale * (math.sqrt(rank) if rslora else rank)
    modules = tuple(split_module_key(k)[1] for k in keys)
    targets = tuple((adapter.targets or {}).get(component) or modules)
    return diffusers_lora.ComponentAdapter(rank=rank, alpha=alpha, use_dora=kinds.pop(),
                                           magnitude_axis=axes.pop() if axes else None, rslora=rslora,
                                           modules=modules, targets=targets)


def to_adapter_file(adapter: Adapter) -> "diffusers_lora.AdapterFile":
    """The neutral adapter as the in-memory ``AdapterFile`` that ``dorabooth.load_adapter``
    attaches from (canonical tensors, one rank/alpha/method/axis per component); both axes,
    magnitudes in the live layer's shape ((out,) or (1, in))."""
    per: dict[str, list[str]] = {}
    for key in adapter.modules:
        per.setdefault(split_module_key(key)[0], []).append(key)
    tensors, components = {}, {}
    for component, keys in per.items():
        components[component] = _component_spec(adapter, component, keys)
        for key in keys:
            m = adapter.modules[key]
            tensors[f"{key}.lora_A.weight"] = m.down
            tensors[f"{key}.lora_B.weight"] = m.up
            if m.is_dora:
                tensors[f"{key}.{diffusers_lora.MAGNITUDE}"] = m.magnitude if m.axis == "out" else m.magnitude[None, :]
    return diffusers_lora.AdapterFile(path=Path(adapter.source or "<memory>"), tensors=tensors, components=components,
                                      family=adapter.family, base_model=adapter.base_model, metadata=adapter.metadata)


def write_diffusers_lora(adapter: Adapter, path: str | os.PathLike, *, family: str,
                         module_names: dict[str, list[str]] | None = None,
                         base_model: str | None = None, overwrite: bool = True) -> Path:
    """The canonical diffusers/PEFT file (axis ``out`` only). ``module_names``: all module names
    per component of the base model, to write short PEFT ``target_modules`` (else full names)."""
    if adapter.axis in ("in", "mixed"):
        raise ValueError(f"{adapter.source or 'adapter'}: {AXIS_IN_REFUSAL}")
    target = diffusers_lora.resolve_path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    per: dict[str, list[str]] = {}
    for key in adapter.modules:
        per.setdefault(split_module_key(key)[0], []).append(key)
    tensors, components, peft_targets = {}, {}, {}
    for component, keys in per.items():
        spec = _component_spec(adapter, component, keys)
        components[component] = spec
        for key in keys:
            m = adapter.modules[key]
            tensors[f"{key}.lora_A.weight"] = m.down
            tensors[f"{key}.lora_B.weight"] = m.up
            if m.is_dora:
                tensors[f"{key}.{diffusers_lora.MAGNITUDE}"] = m.magnitude
        wrapped = list(spec.modules)
        names = (module_names or {}).get(component)
        if names:
            peft_targets[component] = diffusers_lora.peft_target_modules(names, wrapped, component)
        else:
            peft_targets[component] = wrapped if component == "unet" else [n.removeprefix("text_model.") for n in wrapped]
    return diffusers_lora.write_adapter(target, tensors, components, peft_targets=peft_targets, family=family,
                                        base_model=base_model or adapter.base_model, version=__version__)
