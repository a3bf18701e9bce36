"""Any adapter file → the neutral :class:`~dorabooth.formats.neutral.Adapter`, and back.

Readers: diffusers/PEFT (our canonical file and stock ``save_lora_weights`` files, through
:mod:`.diffusers_lora`; PEFT ``adapter_model.safetensors`` with ``base_model.model.`` keys),
kohya / LyCORIS / OneTrainer (:mod:`.kohya`). Writers: ``diffusers-lora`` (axis ``out``
only: PEFT's magnitude is one value per output row) and ``kohya`` (both axes).
A magnitude axis is never changed: converting an axis-``in`` adapter to diffusers-lora is
refused with the formats that can carry it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import diffusers_lora, dvora_file, kohya
from .files import check_adapter_tensors, read_json, read_metadata, read_safetensors, write_safetensors
from .layout import UNetLayout
from .. import rundir as rd
from ..conventions import ADAPTER_FORMATS  # noqa: F401 - export.py reads it from here
from ..version import __version__
from .neutral import Adapter, ModuleAdapter, axis_from_shape, peft_axis, scale_for

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
    """"dvora", "diffusers", "peft", "kohya"; raises for base checkpoints and unknown files."""
    if dvora_file.is_dvora(keys):
        return "dvora"
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
        for name in (rd.ADAPTER, diffusers_lora.WEIGHT_NAME):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"{p}: folder holds neither adapter.safetensors (a dorabooth run) nor "
                                    f"{diffusers_lora.WEIGHT_NAME}")
    keys, meta = read_metadata(p, "adapter file")      # the header only: a base checkpoint is refused unread
    try:
        kind = detect_format(keys, meta)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    tensors, meta = read_safetensors(p, "adapter file")
    check_adapter_tensors(tensors, str(p))
    if kind == "kohya":
        return kohya.read_state_dict(tensors, meta, str(p))
    if kind == "peft":
        return _read_peft(p, tensors, meta)
    if kind == "dvora":
        return dvora_file.read_state_dict(tensors, meta, str(p))
    return diffusers_lora.read_state_dict(tensors, meta, str(p))


def _read_peft(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Adapter:
    """PEFT ``save_pretrained`` of one model: ``base_model.model.<module>.lora_A.weight`` keys,
    LoraConfig in ``adapter_config.json`` next to the file (else scale 1)."""
    config = {}
    cfg_path = p.with_name("adapter_config.json")
    if cfg_path.is_file():
        config = read_json(cfg_path, "PEFT adapter config")
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
        out_f, in_f = g["lora_B"].shape[0], g["lora_A"].shape[1]
        axis = None if m is None else (peft_axis(tuple(m.shape), out_f, in_f, conv=g["lora_A"].ndim == 4)
                                       or axis_from_shape(tuple(m.shape), out_f, in_f))
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
                overwrite: bool = True, resolution: int | None = None, prediction_type: str | None = None) -> Path:
    """``resolution``/``prediction_type``: the base's, when known (SD 2.x: 512 vs 768-v in ``modelspec.*``)."""
    sd = kohya.to_state_dict(adapter, family, layout, dtype)
    meta = kohya.metadata(adapter, family, layout, title=title or Path(path).stem, base_model=base_model,
                          resolution=resolution, prediction_type=prediction_type)
    return write_safetensors(path, sd, meta, overwrite=overwrite)


def write_diffusers_lora(adapter: Adapter, path: str | os.PathLike, *, family: str,
                         module_names: dict[str, list[str]] | None = None,
                         base_model: str | None = None, overwrite: bool = True) -> Path:
    """The canonical diffusers/PEFT file (axis ``out`` only). ``module_names``: all module names
    per component of the base model, to write short PEFT ``target_modules`` (else full names)."""
    if adapter.axis in ("in", "mixed"):
        raise ValueError(f"{adapter.source or 'adapter'}: {AXIS_IN_REFUSAL}")
    return diffusers_lora.write_adapter(path, adapter, family=family, module_names=module_names,
                                        base_model=base_model or adapter.base_model, version=__version__,
                                        overwrite=overwrite)
