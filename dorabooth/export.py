"""Export: merge adapters into base weights, write adapter files and merged checkpoints.

Merging is a pure function on state dicts (:func:`merge_weights`), computed in fp32 on
copies, checked for finiteness after the cast to the output dtype, and written to a
temporary name that is renamed when complete. The training model is never modified: base
weights are read from the pipeline (``W0`` of attached, even merged, adapter layers) and
new tensors are made for the export.

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

Formats: ``diffusers-lora`` (axis ``out``), ``kohya`` (both axes), ``merged-diffusers`` (a
pipeline folder) and ``merged-single-file`` (one ``.safetensors`` in the original layout).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import rundir as rd
from .finetune import FineTunedWeights
from .formats import adapter_files
from .formats.consumers import FileView, Verdict, consumer_report
from .formats.files import atomic_folder, check_finite, read_safetensors, write_safetensors
from .formats.layout import UNetLayout
from .dora import axis_norm, magnitude_at
from .formats.neutral import Adapter, ModuleAdapter, adapted_weight, split_module_key
from .formats.single_file import Mapper, modelspec
from .version import __version__

FORMATS = ("diffusers-lora", "kohya", "merged-diffusers", "merged-single-file")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MERGE_DEFINITION = ("sequential: V_k = W_{k-1} + t_k s_k B_k A_k; m_k = |W_{k-1}| + t_k (m_k - |W_0|); "
                    "W_k = V_k m_k / |V_k| along each adapter's magnitude axis; strength 0 skipped")


@dataclass
class ExportResult:
    path: Path
    format: str
    report: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


# ---- adapters in, base weights -----------------------------------------------------------------
def load_adapter(source) -> tuple[Adapter, str | None]:
    """(adapter, base model recorded with it) from a run folder, an adapter file or an Adapter."""
    if isinstance(source, Adapter):
        return source, source.base_model
    p = Path(source)
    base = None
    if p.is_dir() and (p / "config.json").is_file():
        try:
            run = json.loads((p / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p / 'config.json'}: not valid JSON ({e})") from None
        bm = run.get("base_model") or {}
        base = bm.get("path") or bm.get("id") if isinstance(bm, dict) else bm
        if not (p / "adapter.safetensors").is_file():
            method = (run.get("config") or {}).get("method")
            hint = (" (a --method full run that did not finish: --resume it, then export it as a merged checkpoint)"
                    if method == "full" else " (training did not finish; export a checkpoint's adapter instead)")
            raise FileNotFoundError(f"{p}: run folder has no adapter.safetensors{hint}")
    adapter = adapter_files.read_adapter_file(p)
    return adapter, base or adapter.base_model


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, n, None) is not None}


def _module_name(model, component: str, path: str) -> str:
    from .inject import module_name
    return module_name(model, component, path)


def pipeline_weight(pipe, key: str) -> torch.Tensor:
    """W0 of a neutral module key in ``pipe`` (the base weight even under an attached or merged adapter)."""
    from .dora import DoRALinear

    component, path = split_module_key(key)
    model = getattr(pipe, component, None)
    if model is None:
        raise ValueError(f"the pipeline has no {component}, but the adapter has {key}")
    try:
        module = model.get_submodule(_module_name(model, component, path))
    except AttributeError:
        raise ValueError(f"{key} does not exist in this {type(model).__name__}; the adapter was made for "
                         f"another base model") from None
    if isinstance(module, DoRALinear):
        return (module._w0_backup if module.merged else module.base_layer.weight).detach()
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{key} is a {type(module).__name__}, not a Linear layer")
    return module.weight.detach()


def clean_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as if no dorabooth adapter were attached (W0 under merged layers)."""
    from .dora import DoRALinear

    merged = {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
    out = {}
    for k, v in model.state_dict().items():
        if any(f".{p}" in f".{k}" for p in ("lora_A.", "lora_B.", "lora_magnitude_vector")):
            continue
        out[k.replace(".base_layer.", ".")] = v
    for name, layer in merged.items():
        if layer.merged:
            out[f"{name}.weight"] = layer._w0_backup
    return out


def check_family(adapter: Adapter, family: str) -> None:
    if adapter.family and adapter.family != family:
        raise ValueError(f"{adapter.source or 'adapter'}: made for a {adapter.family} model, but the base model "
                         f"is {family}; pass the matching --model")


# ---- merge (pure) --------------------------------------------------------------------------------
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


# ---- export -----------------------------------------------------------------------------------
def _pairs(adapters) -> list[tuple[object, float]]:
    """A source, a list of sources, or a list of (source, strength) → [(source, strength), …]."""
    if isinstance(adapters, (str, os.PathLike, Adapter)):
        adapters = [adapters]
    pairs = [(a[0], float(a[1])) if isinstance(a, tuple) else (a, 1.0) for a in adapters]
    if not pairs:
        raise ValueError("no adapter given; pass --adapter RUN_DIR_OR_FILE")
    return pairs


def _load_base(model, pipe, adapters_base: list[str | None], model_config: str | None = None):
    """(pipe, BaseModel or None). A given pipe wins; else --model; else the base recorded in the adapter.
    ``model_config``: for a single-file base, the diffusers folder (or hub id) describing it."""
    if pipe is not None:
        return pipe, None
    from .models import load_pipeline

    candidate = model
    if candidate is None:
        recorded = [b for b in adapters_base if b]
        if not recorded:
            raise ValueError("no base model: pass --model (hub id, diffusers folder or .safetensors)")
        candidate = recorded[0]
    p, info = load_pipeline(candidate, single_file_config=model_config)
    return p, info


def _family(pipe) -> str:
    from .families import detect_family
    return detect_family(pipe).name


def _te_layers(pipe) -> dict[str, int]:
    out = {}
    for c in ("text_encoder", "text_encoder_2"):
        m = getattr(pipe, c, None)
        if m is not None:
            out[c] = int(m.config.num_hidden_layers)
    return out


def _module_names(pipe) -> dict[str, list[str]]:
    from .inject import canonical_name
    out = {}
    for c in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, c, None)
        if m is not None:
            out[c] = [canonical_name(m, c, n) for n, _ in m.named_modules() if n]
    return out


def report_for(adapter: Adapter, kind: str, keys: list[str], family: str, unet_config, te_layers,
               base: Callable[[str], torch.Tensor] | None) -> list[Verdict]:
    view = FileView(adapter, kind, keys, adapter.file_names, adapter.magnitude_shapes)
    return consumer_report(view, family, unet_config, te_layers, base)


def export(adapters: Sequence[tuple[object, float]] | object, *, format: str, out: str | os.PathLike,
           model: str | None = None, model_config: str | None = None, pipe=None,
           dtype: str | torch.dtype | None = None, overwrite: bool = False,
           on_event: Callable[[dict], None] | None = None) -> ExportResult:
    """Export one adapter (or several, merged) in ``format``; see the module docstring.

    ``adapters``: ``[(run folder | adapter file | Adapter, strength), …]`` or a single source.
    ``model``/``pipe``: the base model (default: the one recorded with the adapter);
    ``model_config``: the diffusers folder describing a single-file ``model``.
    ``dtype``: "fp16" | "bf16" | "fp32" (merge in fp32, then cast; default: keep the base's
    dtype for checkpoints, fp32 for adapter files).
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    emit = on_event or (lambda e: None)
    pairs = _pairs(adapters)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose fp16, bf16 or fp32")
    out_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    full = [s for s in (_full_run(src) for src, _ in pairs) if s is not None]
    if full:
        return _export_full(full[0], pairs, format, Path(out), model, model_config, pipe, out_dtype, overwrite,
                            emit)
    loaded = [load_adapter(src) for src, _ in pairs]
    emit({"event": "export", "stage": "adapters read", "count": len(loaded)})

    if format in ("diffusers-lora", "kohya"):
        return _export_adapter(loaded, [t for _, t in pairs], format, Path(out), model, model_config, pipe,
                               out_dtype or torch.float32, overwrite, emit)
    pipe, info = _load_base(model, pipe, [b for _, b in loaded], model_config)
    family = _family(pipe)
    for a, _ in loaded:
        check_family(a, family)
    keys = sorted({k for a, _ in loaded for k in a.modules})
    base_id = (info.id if info else None) or model or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    meta = _merged_metadata(family, base_id, info, [{"source": a.source, "strength": t, "method": a.method,
                                                     "magnitude_axis": a.axis, "rank": a.ranks(), "format": a.format}
                                                    for (a, _), (_, t) in zip(loaded, pairs)], MERGE_DEFINITION)
    strengths = [(a, t) for (a, _), (_, t) in zip(loaded, pairs)]
    path = _write_merged(pipe, info, family, keys, strengths, format, Path(out), out_dtype, meta, overwrite, emit)
    return ExportResult(path, format, notes=[f"merged {len(keys)} modules"], metadata=meta)


def _merged_metadata(family: str, base_id, info, adapters: list[dict], merge: str) -> dict[str, str]:
    """The ``dorabooth.*`` header of a merged checkpoint: what was merged into which base, and how."""
    return {
        "dorabooth.version": __version__,
        "dorabooth.family": family,
        "dorabooth.base_model": str(base_id),
        "dorabooth.base_hash": info.hash if info else "",
        "dorabooth.adapters": json.dumps(adapters),
        "dorabooth.merge": merge,
    }


def _write_merged(pipe, info, family, keys, strengths, format, out: Path, dtype, meta, overwrite, emit) -> Path:
    if format == "merged-single-file":
        path = _export_single_file(pipe, info, family, keys, strengths, out, dtype, meta, overwrite, emit)
    else:
        path = _export_diffusers(pipe, keys, strengths, out, dtype, meta, overwrite, emit)
    emit({"event": "export", "stage": "written", "path": str(path)})
    return path


def _full_run(source):
    """The resolved ``--method full`` run folder (an ``AdapterSource`` of kind "full"), else None."""
    if not isinstance(source, (str, os.PathLike)) or not (Path(source) / rd.FULL_UNET).is_dir():
        return None
    try:
        resolved = rd.resolve_adapter(source)
    except FileNotFoundError:                       # not a run, or unfinished: load_adapter says which
        return None
    return resolved if resolved.kind == "full" and resolved.from_run else None


def _export_full(source, pairs, format, out: Path, model, model_config, pipe, dtype, overwrite,
                 emit) -> ExportResult:
    """A full fine-tune (its ``unet/`` and any ``text_encoder*/``) as a merged checkpoint, at
    strength t: W0 + t·(W − W0) in every fine-tuned weight, as ``dorabooth generate`` uses it."""
    run = source.path.parent
    if len(pairs) != 1:
        raise ValueError(f"{run}: a full fine-tune exports on its own; it cannot be combined with adapters")
    if format not in ("merged-diffusers", "merged-single-file"):
        raise ValueError(f"{run}: a full fine-tune is a whole model, not an adapter; export it with --format "
                         f"merged-single-file or merged-diffusers")
    t = pairs[0][1]
    pipe, info = _load_base(model, pipe, [source.model or "toy"], model_config or source.model_config)
    family = _family(pipe)
    meta = _merged_metadata(family, (info.id if info else None) or model or source.model or "toy", info,
                            [{"source": str(run), "strength": t, "method": "full"}],
                            "full fine-tune: W0 + t (W - W0) in every fine-tuned weight")
    fine_tune = FineTunedWeights(pipe, source.path)   # swaps the weights in place
    fine_tune.apply(t)
    parts = fine_tune.components
    emit({"event": "export", "stage": "fine-tune loaded", "components": parts})
    try:                                          # info=None: written from the pipeline, every weight may differ
        path = _write_merged(pipe, None, family, [], [], format, out, dtype, meta, overwrite, emit)
    finally:
        fine_tune.apply(0.0)                      # a caller's pipeline gets its base weights back
    return ExportResult(path, format, notes=[f"full fine-tune of {', '.join(parts)} at strength {t:g}"],
                        metadata=meta)


def _export_adapter(loaded, strengths, format, out: Path, model, model_config, pipe, dtype, overwrite,
                    emit) -> ExportResult:
    if len(loaded) > 1:
        raise ValueError("several adapters can only be combined into a merged checkpoint "
                         "(--format merged-diffusers or merged-single-file); adapter files hold one adapter")
    adapter, recorded = loaded[0]
    t = strengths[0]
    needs_base = t != 1.0 and adapter.method != "lora"
    if pipe is None and (model is not None or needs_base or adapter.family is None):
        pipe, _ = _load_base(model, None, [recorded], model_config)
    family = adapter.family or (_family(pipe) if pipe is not None else None)
    if family is None:
        raise ValueError(f"{adapter.source}: the model family is unknown; pass --model")
    if pipe is not None:
        check_family(adapter, _family(pipe))
    base = None
    if pipe is not None:
        base = {k: pipeline_weight(pipe, k) for k in adapter.modules}
    if t != 1.0:
        if adapter.method != "lora" and base is None:
            raise ValueError("a DoRA adapter at strength != 1 needs the base weights; pass --model")
        adapter = bake_strength(adapter, t, base or {})
    layout = _layout(adapter, pipe, family)
    if format == "kohya":
        path = adapter_files.write_kohya(adapter, out, family=family, layout=layout, dtype=dtype,
                                         base_model=recorded, overwrite=overwrite)
        kind = "kohya"
    else:
        path = adapter_files.write_diffusers_lora(adapter, out, family=family,
                                                  module_names=_module_names(pipe) if pipe is not None else None,
                                                  base_model=recorded, overwrite=overwrite)
        kind = "diffusers"
    emit({"event": "export", "stage": "written", "path": str(path)})
    written = adapter_files.read_adapter_file(path)
    from .formats.files import read_metadata
    keys, _ = read_metadata(path)
    unet_config = pipe.unet.config if pipe is not None else _unet_config_guess(written, layout)
    te_layers = _te_layers(pipe) if pipe is not None else _te_layers_guess(written)
    getter = (lambda k: base[k]) if base is not None else None
    report = report_for(written, kind, keys, family, unet_config, te_layers, getter)
    return ExportResult(path, format, report)


def _layout(adapter: Adapter, pipe, family: str) -> UNetLayout:
    if pipe is not None:
        return UNetLayout.from_config(pipe.unet.config)
    if "dorabooth.unet_layout" in adapter.metadata:
        return UNetLayout.from_json(json.loads(adapter.metadata["dorabooth.unet_layout"]))
    return UNetLayout.default(family)


def _unet_config_guess(adapter: Adapter, layout: UNetLayout) -> dict:
    """A UNet config with the adapter's blocks (for key maps when the base model is not at hand):
    transformer depth per level = 1 + the largest transformer_blocks index the adapter uses."""
    n = len(layout.down_attention)
    depth = [1] * n
    for key in adapter.modules:
        p = key.split(".")
        if p[0] != "unet" or "transformer_blocks" not in p:
            continue
        level = {"down_blocks": lambda: int(p[2]), "up_blocks": lambda: n - 1 - int(p[2])}.get(p[1], lambda: n - 1)()
        depth[level] = max(depth[level], int(p[p.index("transformer_blocks") + 1]) + 1)
    return {"layers_per_block": layout.layers_per_block,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
            "transformer_layers_per_block": depth}


def _te_layers_guess(adapter: Adapter) -> dict[str, int]:
    out = {}
    for key in adapter.modules:
        p = key.split(".")
        if p[0] != "unet" and "layers" in p:
            out[p[0]] = max(out.get(p[0], 0), int(p[p.index("layers") + 1]) + 1)
    return out


def _merged_components(pipe, keys, strengths, dtype, emit) -> dict[str, dict[str, torch.Tensor]]:
    """Clean component state dicts with merged weights replaced, cast, finiteness-checked."""
    base = {k: pipeline_weight(pipe, k) for k in keys}
    merged = merge_weights(base, strengths)
    emit({"event": "export", "stage": "merged", "modules": len(merged)})
    comps = {}
    for name, model in _components(pipe).items():
        sd = clean_state_dict(model)
        for key, W in merged.items():
            component, path = split_module_key(key)
            if component == name:
                param = f"{_module_name(model, component, path)}.weight"
                sd[param] = W.to(sd[param].dtype if dtype is None else dtype)
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        check_finite(sd, name)
        comps[name] = sd
    return comps


def _rebuilt(model, sd: dict[str, torch.Tensor]):
    """A new module of ``model``'s class and config holding ``sd`` (no copy of ``model``'s tensors)."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if isinstance(model, ModelMixin):
            new = type(model).from_config(model.config)
        else:
            new = type(model)(model.config)
    missing, unexpected = new.load_state_dict(sd, strict=False, assign=True)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"{type(model).__name__}: rebuilding for export failed (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:   # non-persistent buffers (position ids): take the original's
            owner, _, attr = name.rpartition(".")
            src = model.get_buffer(name)
            setattr(new.get_submodule(owner) if owner else new, attr, src)
    return new.eval()


def _export_diffusers(pipe, keys, strengths, out: Path, dtype, meta, overwrite, emit) -> Path:
    comps = _merged_components(pipe, keys, strengths, dtype, emit)
    components = dict(pipe.components)
    for name, sd in comps.items():
        components[name] = _rebuilt(getattr(pipe, name), sd)
    cls = type(pipe)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = bool(pipe.config.get("requires_safety_checker", False)) \
            and kwargs.get("safety_checker") is not None
    new_pipe = cls(**kwargs)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        new_pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "dorabooth_export.json").write_text(json.dumps(
            {k: (json.loads(v) if k == "dorabooth.adapters" else v) for k, v in meta.items()}, indent=2) + "\n")
    return out


def _export_single_file(pipe, info, family, keys, strengths, out: Path, dtype, meta, overwrite, emit) -> Path:
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a single-file checkpoint must end in .safetensors")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    mapper = Mapper(family, pipe.unet.config, pipe.vae.config)
    header = {**modelspec(family, out.stem), **meta}
    if info is not None and info.kind == "single_file":
        original, base_meta = read_safetensors(info.path, "checkpoint")
        base = {}
        for key in keys:
            component, path = split_module_key(key)
            model = getattr(pipe, component)
            base[key] = mapper.read(original, component, f"{_module_name(model, component, path)}.weight")
        merged = merge_weights(base, strengths)
        updates = {}
        for key, W in merged.items():
            component, path = split_module_key(key)
            model = getattr(pipe, component)
            updates[(component, f"{_module_name(model, component, path)}.weight")] = W
        sd = mapper.replace(original, updates)
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        header = {**{k: v for k, v in base_meta.items() if not k.startswith("dorabooth.")}, **header}
    else:
        comps = _merged_components(pipe, keys, strengths, dtype, emit)
        sd = mapper.to_original(comps)
    write_safetensors(out, sd, header, overwrite=overwrite)
    return out


# ---- convert and describe --------------------------------------------------------------------
def convert(source, *, to: str, out: str | os.PathLike, model: str | None = None,
            model_config: str | None = None, pipe=None, overwrite: bool = False) -> ExportResult:
    """Read any adapter file and write it as ``to`` ("diffusers-lora" | "kohya"), unchanged in effect."""
    if to not in adapter_files.ADAPTER_FORMATS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(adapter_files.ADAPTER_FORMATS)}")
    return export([(source, 1.0)], format=to, out=out, model=model, model_config=model_config, pipe=pipe,
                  overwrite=overwrite)


def adapter_info(path: str | os.PathLike, *, consumers: bool = False, model: str | None = None,
                 model_config: str | None = None, pipe=None) -> dict:
    """What ``dorabooth adapter-info`` prints: format, family, method, rank, alpha, axis,
    modules, unknown keys; with ``consumers``, the per-tool report."""
    from .formats.files import read_metadata

    adapter, recorded = load_adapter(path)
    info = adapter.summary()
    if not consumers:
        return info
    file = Path(adapter.source)
    keys, _ = read_metadata(file)
    kind = "kohya" if any(k.endswith(".lora_down.weight") for k in keys) else "diffusers"
    base = None
    if pipe is None and model is None and recorded and Path(recorded).exists():
        model = recorded
    if pipe is not None or model is not None:
        pipe, _ = _load_base(model, pipe, [recorded], model_config)
        check_family(adapter, _family(pipe))
        weights = {k: pipeline_weight(pipe, k) for k in adapter.modules}
        base = weights.__getitem__
    family = adapter.family or (_family(pipe) if pipe is not None else None)
    if family is None:
        info["consumers"] = "unknown model family; pass --model"
        return info
    layout = _layout(adapter, pipe, family)
    unet_config = pipe.unet.config if pipe is not None else _unet_config_guess(adapter, layout)
    te_layers = _te_layers(pipe) if pipe is not None else _te_layers_guess(adapter)
    info["consumers"] = [v.to_dict() for v in report_for(adapter, kind, keys, family, unet_config, te_layers, base)]
    return info
