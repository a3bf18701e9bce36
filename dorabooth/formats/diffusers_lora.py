"""Adapter files in the diffusers/PEFT layout (DESIGN §7): ``pytorch_lora_weights.safetensors``.

Written exactly as ``StableDiffusion(XL)Pipeline.save_lora_weights`` writes PEFT (DoRA)
adapters after ``convert_state_dict_to_diffusers(get_peft_model_state_dict(model))``::

    unet.<module>.to_q.lora.down.weight                    (r, in)    attention projections
    unet.<module>.to_q.lora.up.weight                      (out, r)   (to_q, to_k, to_v, to_out.0)
    unet.<module>.to_q.lora_magnitude_vector               (out,)
    unet.<module>.ff.net.2.lora_A.weight / .lora_B.weight            any other Linear: PEFT names
    text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_linear_layer.down.weight
    text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_linear_layer.up.weight
    text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_magnitude_vector
    text_encoder_2.…                                                   (SDXL, same layout)

Header metadata: ``format: pt``; ``lora_adapter_metadata``, the JSON of per-component
``LoraConfig`` arguments under ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` prefixes that
stock ``load_lora_weights`` builds its ``LoraConfig`` from (r, lora_alpha, target_modules,
use_dora, use_rslora, …; only keys every peft ≥ 0.9 accepts); our own ``dorabooth.*``
keys (format version, family, method, magnitude axis, rank, alpha, rslora, targets, base
model and hash); and ``modelspec.*`` with the subject it was trained on (:mod:`.subject`). Axis-``in`` DoRA keeps the same keys with ``lora_magnitude_vector`` of shape
``(1, in)``: a stock loader then fails loudly on the shape instead of misreading it.

Conv2d modules (LoCon: ResNet ``conv1``/``conv2``/``conv_shortcut``, SD 1.x ``proj_in``/``proj_out``)
keep PEFT's names and shapes: ``lora_A.weight`` (r, in, kh, kw), ``lora_B.weight`` (out, r, 1, 1),
``lora_magnitude_vector`` (1, out, 1, 1) (axis "in": (1, in)); stock ``load_lora_weights`` builds
PEFT's conv DoRA layers from them.

One deliberate exception: when a UNet adapter also covers Linear layers other than those
four attention projections (``attn+ff``, ``all-linear``, some explicit patterns), its UNet
keys all keep PEFT's ``lora_A``/``lora_B`` names. Stock ``load_lora_adapter`` converts
``lora.down``/``lora.up`` names only if the *first* key of the file lacks ``lora_A``, so the
mixed layout ``save_lora_weights`` writes there loads or not depending on which key sorts
first (it fails for SDXL ``all-linear``, where ``add_embedding`` comes first: "Tensor on
device meta is not on the expected device cpu!", stock's own files included). All-PEFT
names load whatever the order.

The reader accepts that layout, raw PEFT names (``lora_A``/``lora_B``) and text-encoder
paths with or without ``text_model.``, and returns the neutral :class:`~.neutral.Adapter`
with canonical keys (see ``inject``); the writer takes one, its per-component ``LoraConfig``
from :meth:`~.neutral.Adapter.component_config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .files import check_adapter_tensors, header_date, read_safetensors, write_safetensors
from .neutral import COMPONENTS, Adapter, ModuleAdapter, group_by_component, module_paths, peft_axis, scale_for
from .single_file import model_class
from .subject import Subject, description

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FORMAT_VERSION = "1"
PEFT_METADATA_KEY = "lora_adapter_metadata"   # diffusers' LORA_ADAPTER_METADATA_KEY
MAGNITUDE = "lora_magnitude_vector"
# What lives under CLIPTextModel(WithProjection).text_model (transformers 4); text_projection does not.
_CLIP_TRANSFORMER_PARTS = ("encoder.", "embeddings.", "final_layer_norm")

# diffusers.utils.state_dict_utils.PEFT_TO_DIFFUSERS, applied like its convert_state_dict:
# first pattern contained in the key wins, substring replacement.
_PEFT_TO_DIFFUSERS = {
    ".q_proj.lora_B": ".q_proj.lora_linear_layer.up",
    ".q_proj.lora_A": ".q_proj.lora_linear_layer.down",
    ".k_proj.lora_B": ".k_proj.lora_linear_layer.up",
    ".k_proj.lora_A": ".k_proj.lora_linear_layer.down",
    ".v_proj.lora_B": ".v_proj.lora_linear_layer.up",
    ".v_proj.lora_A": ".v_proj.lora_linear_layer.down",
    ".out_proj.lora_B": ".out_proj.lora_linear_layer.up",
    ".out_proj.lora_A": ".out_proj.lora_linear_layer.down",
    "to_k.lora_A": "to_k.lora.down",
    "to_k.lora_B": "to_k.lora.up",
    "to_q.lora_A": "to_q.lora.down",
    "to_q.lora_B": "to_q.lora.up",
    "to_v.lora_A": "to_v.lora.down",
    "to_v.lora_B": "to_v.lora.up",
    "to_out.0.lora_A": "to_out.0.lora.down",
    "to_out.0.lora_B": "to_out.0.lora.up",
}
# Every per-layer suffix we read, to its canonical (PEFT) name.
_READ_SUFFIXES = {
    "lora_A.weight": "lora_A.weight",
    "lora_B.weight": "lora_B.weight",
    "lora.down.weight": "lora_A.weight",
    "lora.up.weight": "lora_B.weight",
    "lora_linear_layer.down.weight": "lora_A.weight",
    "lora_linear_layer.up.weight": "lora_B.weight",
    MAGNITUDE: MAGNITUDE,
}


# ---- keys ----------------------------------------------------------------------------------
def to_diffusers_key(key: str) -> str:
    """Canonical (PEFT-named) key → the key ``save_lora_weights`` writes for it."""
    for pattern, replacement in _PEFT_TO_DIFFUSERS.items():
        if pattern in key:
            return key.replace(pattern, replacement)
    return key


def to_diffusers_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors → the keys we write: stock names, except as explained in the module doc."""
    unet_keys = [k for k in tensors if k.startswith("unet.")]
    mixed_unet = {to_diffusers_key(k) == k for k in unet_keys if MAGNITUDE not in k} == {True, False}
    return {(k if mixed_unet and k.startswith("unet.") else to_diffusers_key(k)): t for k, t in tensors.items()}


def from_file_key(key: str) -> str | None:
    """Any accepted key layout → canonical key; None if the key is not an adapter key we know."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS or not rest:
        return None
    for suffix, canonical in _READ_SUFFIXES.items():
        if rest.endswith("." + suffix):
            module = rest[: -len(suffix) - 1]
            if component != "unet" and module.startswith(_CLIP_TRANSFORMER_PARTS):
                module = "text_model." + module   # transformers-5 style path → circulating layout
            return f"{component}.{module}.{canonical}"
    return None


def resolve_path(path: str | os.PathLike) -> Path:
    """A ``.safetensors`` path is used as is; anything else is a folder holding ``WEIGHT_NAME``."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / WEIGHT_NAME


def peft_target_modules(all_names: Sequence[str], wrapped: Sequence[str], component: str) -> list[str]:
    """``target_modules`` for ``LoraConfig`` selecting exactly ``wrapped`` among ``all_names``.

    PEFT matches a list entry when a module name equals it or ends with ``.entry``. Short
    suffixes (``to_q``, ``to_out.0``, ``q_proj``: what training scripts write) are used when
    they select exactly the wrapped modules; otherwise the full names (text-encoder names
    without ``text_model.`` so that they match with and without that level).
    """
    def short(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]

    def selected(targets: set[str]) -> set[str]:
        return {n for n in all_names if any(n == t or n.endswith("." + t) for t in targets)}

    suffixes = {short(n) for n in wrapped}
    if selected(suffixes) == set(wrapped):
        return sorted(suffixes)
    if component == "unet":
        return list(wrapped)
    return [n.removeprefix("text_model.") for n in wrapped]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _lora_config_kwargs(config: dict, target_modules: list[str]) -> dict:
    # Only arguments that every peft since DoRA support (0.9) accepts: stock loaders call
    # LoraConfig(**this), and an unknown key would make them fail.
    return {
        "r": config["rank"],
        "lora_alpha": _number(config["alpha"]),
        "target_modules": target_modules,
        "use_dora": config["use_dora"],
        "use_rslora": config["rslora"],
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


# ---- write ---------------------------------------------------------------------------------
def write_adapter(
    path: str | os.PathLike,
    adapter: Adapter,
    *,
    family: str,
    module_names: dict[str, list[str]] | None = None,
    base_model: str | None = None,
    version: str = "",
    overwrite: bool = True,
    quantized_base: str | None = None,
) -> Path:
    """Write ``adapter`` as a diffusers/PEFT adapter file (either magnitude axis); returns the file path.

    ``path``: a ``.safetensors`` file or a folder (then ``pytorch_lora_weights.safetensors``
    inside it). ``module_names``: every module name of each component of the base model, in
    canonical naming, for short PEFT ``target_modules`` (else the full module names). The file
    is written to a temporary name and renamed, and every tensor is checked to be finite first.
    ``quantized_base`` ("nf4"): recorded as ``dorabooth.quantized_base`` when the base was held
    quantised while training (QDoRA; informational: the file is an ordinary adapter).
    """
    target = resolve_path(path)
    tensors = adapter.tensors
    for key, t in tensors.items():      # before write_safetensors' own check: this names the adapter's key
        if not torch.isfinite(t).all():
            raise ValueError(f"{target}: adapter tensor {key} is not finite (NaN/inf); not writing a broken adapter")
    per = adapter.by_component()
    configs = {c: adapter.component_config(c) for c in per}
    peft_meta = {}
    for name, config in configs.items():
        wrapped = module_paths(per[name])
        names = (module_names or {}).get(name)
        if names:
            targets = peft_target_modules(names, wrapped, name)
        else:
            targets = wrapped if name == "unet" else [n.removeprefix("text_model.") for n in wrapped]
        for k, v in _lora_config_kwargs(config, targets).items():
            peft_meta[f"{name}.{k}"] = v

    def describe(key, fmt=str):
        values = {n: c[key] for n, c in configs.items()}
        if len(set(values.values())) == 1:
            return fmt(next(iter(values.values())))
        return json.dumps({n: (fmt(v) if not isinstance(v, (int, float)) else _number(v)) for n, v in values.items()})

    def one_or_all(values: dict[str, str]) -> str:
        return next(iter(values.values())) if len(set(values.values())) == 1 else json.dumps(values)

    method_of = {n: ("dora" if c["use_dora"] else "lora") for n, c in configs.items()}
    axis_of = {n: (c["magnitude_axis"] or "none") for n, c in configs.items()}
    metadata = {
        "format": "pt",
        PEFT_METADATA_KEY: json.dumps(peft_meta, indent=2, sort_keys=True),
        "dorabooth.format_version": FORMAT_VERSION,
        "dorabooth.family": family,
        "dorabooth.method": one_or_all(method_of),
        "dorabooth.magnitude_axis": one_or_all(axis_of),
        "dorabooth.rank": describe("rank"),
        "dorabooth.alpha": describe("alpha", lambda a: str(_number(a))),
        "dorabooth.rslora": describe("rslora", lambda b: "true" if b else "false"),
        "dorabooth.targets": json.dumps({n: adapter.component_targets(n) for n in configs}),
    }
    if version:
        metadata["dorabooth.version"] = version
    if base_model:
        metadata["dorabooth.base_model"] = str(base_model)
    if adapter.base_hash:
        metadata["dorabooth.base_hash"] = adapter.base_hash
    if quantized_base:
        metadata["dorabooth.quantized_base"] = quantized_base
    metadata.update(_modelspec(adapter, family, base_model))
    return write_safetensors(target, to_diffusers_layout(tensors), metadata, overwrite=overwrite)


def _modelspec(adapter: Adapter, family: str, base_model: str | None) -> dict[str, str]:
    """SAI model spec entries (what model browsers show) and the subject the adapter was trained on."""
    subject = adapter.subject
    arch = model_class(family)["modelspec.architecture"]
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": subject.title(adapter.method) if subject else "dorabooth adapter",
            "modelspec.description": description(subject, adapter.method, adapter.axis, base_model),
            "modelspec.date": header_date(), **(subject.metadata() if subject else {})}


# ---- read ----------------------------------------------------------------------------------
def _peft_metadata(raw: Mapping[str, str], source: str) -> dict[str, dict]:
    text = raw.get(PEFT_METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: header entry {PEFT_METADATA_KEY!r} is not valid JSON ({e})") from None
    per: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, arg = key.partition(".")
        if component in COMPONENTS:
            per.setdefault(component, {})[arg] = value
    return per


def _component_facts(component: str, grouped: dict[str, dict[str, torch.Tensor]], peft: dict, ours: dict[str, str],
                     source: str) -> tuple[int, float, bool, str | None, list[str]]:
    """(rank, alpha, rslora, magnitude axis, targets) of one component, checked against its tensors
    (``grouped``: module path → tensors) and both headers; one of each per component."""
    modules = tuple(sorted(grouped))
    ranks = {g["lora_A.weight"].shape[0] for g in grouped.values()}
    if len(ranks) > 1 or peft.get("rank_pattern") or peft.get("alpha_pattern"):
        raise ValueError(f"{source}: {component} uses several ranks/alphas ({sorted(ranks)}, rank_pattern "
                         f"{peft.get('rank_pattern') or {}}); dorabooth loads one rank and alpha per component")
    rank = ranks.pop()
    with_m = [m for m, g in grouped.items() if MAGNITUDE in g]
    if with_m and len(with_m) != len(grouped):
        missing = sorted(set(grouped) - set(with_m))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: {component}.{missing[0]}{more} has lora_A/lora_B but no {MAGNITUDE}, unlike the "
                         f"other {len(with_m)} {component} modules (DoRA); each module of a DoRA file has all three: "
                         f"the file is incomplete, or that module was added to it from elsewhere")
    use_dora = bool(with_m)
    axis = None
    if use_dora:
        axes = set()
        for module, g in grouped.items():
            m, out_f, in_f = g[MAGNITUDE].shape, g["lora_B.weight"].shape[0], g["lora_A.weight"].shape[1]
            conv = g["lora_A.weight"].ndim == 4
            axis = peft_axis(tuple(m), out_f, in_f, conv=conv)
            if axis is None:
                out_shape = f"(1, {out_f}, 1, 1)" if conv else f"({out_f},)"
                raise ValueError(f"{source}: {component}.{module}.{MAGNITUDE} has shape {tuple(m)}; expected "
                                 f"{out_shape} for axis 'out' or (1, {in_f}) for axis 'in'")
            axes.add(axis)
        if len(axes) > 1:
            raise ValueError(f"{source}: {component} mixes magnitude axes 'out' and 'in'")
        axis = axes.pop()
        stated = ours.get("dorabooth.magnitude_axis")
        if stated and not stated.startswith("{") and stated != axis:
            raise ValueError(f"{source}: header says magnitude axis {stated!r} but the tensors have axis {axis!r}")
    if "lora_alpha" in peft:
        alpha = float(peft["lora_alpha"])
    elif ours.get("dorabooth.alpha") and not ours["dorabooth.alpha"].startswith("{"):
        alpha = float(ours["dorabooth.alpha"])
    else:
        alpha = float(rank)   # diffusers' convention without metadata: scale 1
    if "use_rslora" in peft:
        rslora = bool(peft["use_rslora"])
    else:
        rslora = ours.get("dorabooth.rslora") == "true"
    if peft.get("use_dora") is not None and bool(peft["use_dora"]) != use_dora:
        raise ValueError(f"{source}: {component} metadata says use_dora={peft['use_dora']} but the file "
                         f"{'has' if use_dora else 'has no'} magnitude vectors")
    targets = None
    if ours.get("dorabooth.targets"):
        targets = json.loads(ours["dorabooth.targets"]).get(component)
    if not targets:
        targets = peft.get("target_modules") or list(modules)
        targets = [targets] if isinstance(targets, str) else targets
    return int(rank), alpha, rslora, axis, list(targets)


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read a diffusers/PEFT adapter file (a ``.safetensors`` file or a folder holding ``WEIGHT_NAME``)."""
    source = resolve_path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such adapter file")
    try:
        tensors, meta = read_safetensors(source, "adapter file")
    except ValueError as e:
        raise ValueError(f"{source}: not a readable safetensors file ({str(e).removeprefix(f'{source}: ')})") from None
    check_adapter_tensors(tensors, str(source))
    return read_state_dict(tensors, meta, str(source))


def read_state_dict(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str = "<memory>") -> Adapter:
    """A diffusers/PEFT adapter's tensors and header → the neutral adapter; errors name ``source``."""
    tensors, unknown = {}, []
    for key, t in sd.items():
        canonical = from_file_key(key)
        if canonical is None:
            unknown.append(key)
        elif canonical in tensors:
            raise ValueError(f"{source}: two keys map to {canonical} (one with and one without 'text_model.'?)")
        else:
            tensors[canonical] = t
    if unknown:
        kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in unknown)
        hint = " (a kohya/A1111 file: use the kohya importer)" if kohya else ""
        raise ValueError(f"{source}: {len(unknown)} key(s) are not diffusers/PEFT adapter keys{hint}, "
                         f"e.g. {sorted(unknown)[:3]}")
    if not tensors:
        raise ValueError(f"{source}: the file holds no adapter tensors")

    grouped: dict[str, dict[str, torch.Tensor]] = {}      # module key → {"lora_A.weight": …, …}
    for key, t in tensors.items():
        for suffix in ("lora_A.weight", "lora_B.weight", MAGNITUDE):
            if key.endswith("." + suffix):
                grouped.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
    for module, g in grouped.items():
        for need in ("lora_A.weight", "lora_B.weight"):
            if need not in g:
                raise ValueError(f"{source}: {module} has no {need.split('.')[0]} (down/up) weight; the file is "
                                 f"incomplete")
        a, b = g["lora_A.weight"], g["lora_B.weight"]
        conv = a.ndim == 4 and b.ndim == 4 and tuple(b.shape[2:]) == (1, 1)
        if not (conv or a.ndim == b.ndim == 2) or a.shape[0] != b.shape[1]:
            raise ValueError(f"{source}: {module}: down {tuple(a.shape)} and up {tuple(b.shape)} are not (r, in) "
                             f"and (out, r), or a conv's (r, in, kh, kw) and (out, r, 1, 1), of one rank")

    ours = {k: v for k, v in meta.items() if k.startswith("dorabooth.")}
    version = ours.get("dorabooth.format_version")
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(f"{source}: dorabooth adapter format version {version} is not supported by this "
                         f"dorabooth (reads version {FORMAT_VERSION}); upgrade dorabooth")
    peft = _peft_metadata(meta, source)
    per = group_by_component(grouped)
    modules, alphas, rsloras, axes, targets, shapes = {}, {}, {}, set(), {}, {}
    for component in (c for c in COMPONENTS if c in per):
        keys = sorted(per[component])
        by_path = dict(zip(module_paths(keys), (grouped[k] for k in keys)))
        rank, alpha, rslora, axis, targets[component] = _component_facts(component, by_path, peft.get(component, {}),
                                                                         ours, source)
        alphas[component], rsloras[component] = alpha, rslora
        s = scale_for(alpha, rank, rslora)
        for key in keys:
            g = grouped[key]
            m = g.get(MAGNITUDE)
            if m is not None:
                shapes[key] = tuple(m.shape)
                axes.add(axis)
            modules[key] = ModuleAdapter(g["lora_A.weight"], g["lora_B.weight"], s,
                                         None if m is None else m.reshape(-1), None if m is None else axis)
    rs = set(rsloras.values())
    kind = "DoRA" if axes else "LoRA"
    magnitude = ", magnitude (out,)" if axes == {"out"} else ", magnitude (1, in)" if axes == {"in"} else ""
    stated = ", dorabooth" if "dorabooth.format_version" in meta else ""
    return Adapter(modules=modules, family=ours.get("dorabooth.family"),
                   format=f"diffusers/PEFT ({kind}{magnitude}{stated})",
                   source=source, metadata=dict(meta), rslora=rs.pop() if len(rs) == 1 else None,
                   base_model=ours.get("dorabooth.base_model"), targets=targets, lora_alpha=alphas,
                   magnitude_shapes=shapes, subject=Subject.from_metadata(meta), base_hash=ours.get("dorabooth.base_hash"))
