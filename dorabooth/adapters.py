"""The pipeline API: attach, load, save, strength, merge and detach adapters on a diffusers pipeline.

Works on ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` objects; module names
returned by ``attach``/``load_adapter``/``detach`` carry the component prefix (``unet.``,
``text_encoder.``, ``text_encoder_2.``) followed by the name in that component's
``named_modules()``. The layer itself is :mod:`dorabooth.dora`, finding and wrapping modules
:mod:`dorabooth.inject`, the file layouts :mod:`dorabooth.formats`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from . import inject, pivotal
from .conventions import ADAPTER_METHODS, MAGNITUDE_AXES
from .dora import DoRALinear, axis_norm, max_rank
from .dvora import DVoRALinear
from .families import check_family, detect_family
from .formats.adapter_files import read_adapter_file
from .formats.diffusers_lora import resolve_path, write_adapter
from .formats.dvora_file import write_dvora
from .formats.files import DAMAGED
from .formats.neutral import Adapter, ModuleAdapter, VeraInfo, module_paths
from .formats.subject import Subject
from .version import __version__


def _frozen_others(pipe, adapted: set[str]) -> None:
    for name, component in getattr(pipe, "components", {}).items():
        if name not in adapted and hasattr(component, "requires_grad_") and hasattr(component, "named_parameters"):
            inject.freeze(component)


def attach(
    pipe,
    *,
    method: str = "dora",
    rank: int = 16,
    alpha: float | None = None,
    unet_targets: str | Sequence[str] = "attn",
    text_encoders: bool = False,
    magnitude_axis: str = "out",
    rslora: bool = False,
    dropout: float = 0.0,
    vera_seed: int = 0,
) -> list[str]:
    """Wrap target Linear (and, with conv targets, Conv2d) layers of the UNet (and the text encoders) with DoRA,
    LoRA or DVoRA layers.

    ``unet_targets``: a preset (``attn`` = to_q/to_k/to_v/to_out.0 of attn1 and attn2,
    ``cross-attn`` = attn2 only, ``attn+ff``, ``all-linear``; with convolutions ``attn+conv``, ``all``) or module names/regexes.
    Text encoders get q_proj, k_proj, v_proj, out_proj. ``alpha`` defaults to ``rank``.
    All other weights of the pipeline are frozen. Returns the wrapped module names.
    ``method="dvora"``: DoRA on VeRA (:mod:`dorabooth.dvora`), projections drawn from ``vera_seed``.
    """

    if method not in ADAPTER_METHODS:
        raise ValueError(f"method must be one of {', '.join(ADAPTER_METHODS)}, got {method!r}")
    if magnitude_axis not in MAGNITUDE_AXES:
        raise ValueError(f"magnitude_axis must be 'out' or 'in', got {magnitude_axis!r}")
    family = detect_family(pipe)
    components = inject.pipeline_components(pipe)
    attached = [c for c, m in components.items() if inject.dora_modules(m)]
    if attached:
        raise ValueError(f"the pipeline already has dorabooth adapters on {', '.join(attached)}; "
                         f"call dorabooth.detach(pipe) first")
    plan = {"unet": unet_targets}
    if text_encoders:
        plan.update({c: inject.TEXT_ENCODER_TARGETS for c in family.text_encoders})
    layer = dict(rank=rank, alpha=float(rank if alpha is None else alpha), use_dora=method != "lora",
                 magnitude_axis=magnitude_axis, rslora=rslora, dropout=dropout,
                 vera_seed=int(vera_seed) if method == "dvora" else None)
    names: list[str] = []
    done: list[str] = []
    try:
        for component, targets in plan.items():
            wrapped = inject.inject(components[component], targets, **layer)
            done.append(component)
            names += [f"{component}.{n}" for n in wrapped]
    except Exception:
        for component in done:  # all or nothing
            inject.detach(components[component])
        raise
    _frozen_others(pipe, set(plan))
    return names


def detach(pipe) -> list[str]:
    """Remove all adapters: the original ``nn.Linear`` / ``nn.Conv2d`` modules (holding W0) come back, and
    ``requires_grad`` flags are restored to what they were before ``attach``; pivotal tokens
    (:mod:`dorabooth.pivotal`) are removed from the tokenizers and embeddings."""

    names = []
    pivotal.remove(pipe)                       # pivotal tokens of a loaded adapter go with it
    for component, model in inject.pipeline_components(pipe).items():
        names += [f"{component}.{n}" for n in inject.detach(model)]
    for name, component in getattr(pipe, "components", {}).items():
        if name not in ("unet", *inject.TEXT_ENCODER_COMPONENTS) and hasattr(component, "named_parameters"):
            inject.detach(component)
    return names


def _layers(pipe):

    layers = list(inject.iter_layers(pipe))
    if not layers:
        raise ValueError("the pipeline has no dorabooth adapters; attach() or load_adapter() first")
    return layers


def set_strength(pipe, t: float) -> None:
    """Adapter strength t (DESIGN §3): t = 0 is exactly the base model, t = 1 the trained adapter."""
    for layer in _layers(pipe):
        layer.set_strength(t)


def merge(pipe) -> None:
    """Write the adapted weights (at the current strength) into the base layers, in place.

    All or nothing: if a layer's merged weight is not finite, every layer is unmerged again
    and the error names the module and its adapter tensors."""
    layers = _layers(pipe)
    try:
        for name, layer in inject.pipeline_dora_modules(pipe).items():
            try:
                layer.merge()
            except ValueError as e:
                tensors = "lora_A, lora_B" + (", lora_magnitude_vector" if layer.use_dora else "")
                raise ValueError(f"{name} ({tensors}): {e}") from None
    except Exception:
        for layer in layers:
            layer.unmerge()
        raise


def unmerge(pipe) -> None:
    """Undo ``merge``: the base layers get W0 back bit-exactly."""
    for layer in _layers(pipe):
        layer.unmerge()


def save_adapter(pipe, path: str | os.PathLike, *, base_model: str | None = None, subject: Subject | None = None,
                 base_hash: str | None = None) -> Path:
    """Write the pipeline's adapter as ``pytorch_lora_weights.safetensors`` (diffusers/PEFT layout).

    ``path``: a folder, or a file name ending in ``.safetensors``. ``base_model`` (a hub id or
    path) is recorded in the metadata; by default the pipeline's own ``name_or_path`` if set.
    ``subject`` (token, class, prompts) and ``base_hash`` are recorded too when given.
    The file loads with stock ``pipe.load_lora_weights(path)`` and with :func:`load_adapter`.
    """
    family = detect_family(pipe)
    adapter = replace(_attached_adapter(pipe), subject=subject, base_hash=base_hash)
    if not adapter.modules:
        raise ValueError("the pipeline has no dorabooth adapters to save; attach() and train first")
    if "unet" not in adapter.by_component():
        raise ValueError("dorabooth adapters always include the UNet; this pipeline has adapters only on "
                         f"{', '.join(adapter.by_component())}")
    names = {}        # every module PEFT would see (none inside our layers), for short target_modules
    for component, model in inject.pipeline_components(pipe).items():
        wrapped = [n for n, _ in inject.dora_modules(model)]
        names[component] = [inject.canonical_name(model, component, n) for n, _ in model.named_modules()
                            if n and not _inside_adapter(n, wrapped)]
    if base_model is None:
        base_model = getattr(pipe, "name_or_path", None) or None
    quantized = sorted({layer.quantized_base for layer in inject.iter_layers(pipe)} - {None})
    if adapter.vera is not None:               # d, b, m and the seed; exports write it as ordinary DoRA
        return write_dvora(resolve_path(path), adapter, family=family.name, base_model=base_model, version=__version__)
    return write_adapter(path, adapter, family=family.name, module_names=names, base_model=base_model,
                         version=__version__, quantized_base=",".join(quantized) or None)


def _attached_adapter(pipe) -> Adapter:
    """The pipeline's attached adapter layers as the neutral in-memory adapter (no copies of the
    fp32 tensors), with the configuration they were attached with."""
    modules, targets, alphas, rslora, seeds, d, b = {}, {}, {}, set(), set(), {}, {}
    for component, model in inject.pipeline_components(pipe).items():
        layers = inject.dora_modules(model)
        if not layers:
            continue
        config = inject.component_config(model, component)
        keys = []
        for name, layer in layers:
            key = f"{component}.{inject.canonical_name(model, component, name)}"
            m = layer.lora_magnitude_vector if layer.use_dora else None
            down, up = layer.factors()                  # DVoRA: diag(d)·A, diag(b)·B
            modules[key] = ModuleAdapter(down, up, layer.scale, m, layer.magnitude_axis if layer.use_dora else None)
            if isinstance(layer, DVoRALinear):
                d[key], b[key] = layer.vera_lambda_d, layer.vera_lambda_b
            keys.append(key)
        targets[component] = list(inject.attached_targets(model) or module_paths(keys))
        alphas[component] = config["alpha"]
        rslora.add(config["rslora"])
        seeds.add(config["vera_seed"])
    if len(seeds) > 1:
        raise ValueError(f"the pipeline mixes DVoRA seeds/other adapters {sorted(seeds, key=str)}; attach one method")
    seed = seeds.pop() if seeds else None
    return Adapter(modules=modules, rslora=rslora.pop() if len(rslora) == 1 else None, targets=targets,
                   lora_alpha=alphas, vera=None if seed is None else VeraInfo(seed, d, b))


def _inside_adapter(name: str, wrapped: Sequence[str]) -> bool:
    """True for the submodules a DoRALinear adds (base_layer, lora_A, …): PEFT would not see them."""
    return any(name.startswith(w + ".") for w in wrapped)


def load_adapter(pipe, path: str | os.PathLike) -> list[str]:
    """Load an adapter file into ``pipe``: ours, stock diffusers/PEFT, or kohya/LyCORIS/OneTrainer
    (``dora_scale`` on either axis, detected by shape; an axis is never reinterpreted).

    Attaches layers as the file describes (rank, alpha, method, magnitude axis, targets)
    unless matching layers are attached already (then only the tensors are replaced, e.g. to
    resume training). Adapters on components the file does not cover are detached. Raises,
    naming the file, on a family mismatch, unknown modules or shape mismatches, a damaged
    tensor (not float, not finite, beyond fp16: ``check_adapter_tensors``), a DoRA magnitude
    over ``MAX_MAGNITUDE_GROWTH`` × the base's norms, or a dorabooth file missing a module its
    recorded targets select; in that case the pipeline is left unchanged. Returns the adapted
    module names.
    """
    adapter = read_adapter_file(path)          # any format: diffusers/PEFT, kohya, LyCORIS, OneTrainer
    source = adapter.source
    family = detect_family(pipe)
    if adapter.family is not None:
        check_family(adapter.family, family, source=source)
    components = inject.pipeline_components(pipe)
    per = adapter.by_component()
    for component in per:
        if component not in components:
            raise ValueError(f"{source}: adapter has {component} weights but the {family.name} pipeline has no "
                             f"{component}; load it onto the model family it was trained for")
    configs = {component: adapter.component_config(component) for component in per}
    _check_fits(adapter, components, configs, family.name)
    _check_complete(adapter, components)
    embeddings = pivotal.embeddings_for(source, adapter.subject.token if adapter.subject else None)
    if embeddings is not None:
        pivotal.read_embeddings(embeddings, family.name)         # checked before the pipeline changes

    names = []
    for component, model in components.items():
        config = configs.get(component)
        current = {inject.canonical_name(model, component, n): m for n, m in inject.dora_modules(model)}
        if config is None:
            inject.detach(model)
            inject.freeze(model)
            continue
        paths = module_paths(per[component])
        if not _matches(current, paths, config):
            inject.detach(model)
            inject.inject(model, adapter.component_targets(component),
                          names=[inject.module_name(model, component, c) for c in paths],
                          rank=config["rank"], alpha=config["alpha"], use_dora=config["use_dora"],
                          magnitude_axis=config["magnitude_axis"] or "out", rslora=config["rslora"])
        names += [f"{component}.{n}" for n, _ in inject.dora_modules(model)]
    inject.load_adapter_state_dict(pipe, adapter.tensors, source=source)
    _frozen_others(pipe, set(per))
    pivotal.remove(pipe)
    if embeddings is not None:                 # pivotal tuning: its tokens (<s0><s1>…) and their embeddings
        pivotal.load_embeddings(pipe, embeddings)
    return names


MAX_MAGNITUDE_GROWTH = 1000.0   # largest DoRA magnitude / largest base norm of a module that loads


def _check_fits(adapter: Adapter, components: dict[str, nn.Module], configs: dict[str, dict], family: str) -> None:
    """Raise, naming the file, unless every module of ``adapter`` is a Linear (Conv2d) of the same shape here
    and every DoRA magnitude is within ``MAX_MAGNITUDE_GROWTH`` of the base weight's norms."""
    source = adapter.source
    for component, keys in adapter.by_component().items():
        model = components[component]
        rank = configs[component]["rank"]
        for key, canonical in zip(keys, module_paths(keys)):
            try:
                module = model.get_submodule(inject.module_name(model, component, canonical))
            except AttributeError:
                raise ValueError(f"{source}: the keys {_file_name(adapter, key)}.… are for a module this {family} "
                                 f"model's {type(model).__name__} does not have; the adapter was trained for "
                                 f"another model or model family: load it onto that base") from None
            _check_magnitude(adapter, key, module)
            base = module.base_layer if isinstance(module, DoRALinear) else module
            mod = adapter.modules[key]
            kind = nn.Conv2d if mod.is_conv else nn.Linear
            if type(base) is not kind and not (kind is nn.Linear and isinstance(base, nn.Linear)):
                raise ValueError(f"{source}: {key} is a {type(base).__name__} here, but the file has a "
                                 f"{'conv (LoCon)' if mod.is_conv else 'Linear'} adapter for it; the adapter is for "
                                 f"another base model")
            if mod.weight_shape != tuple(base.weight.shape):
                dims = "(out, in, kh, kw)" if mod.is_conv else "(out, in)"
                raise ValueError(f"{source}: {key} is {dims} = {tuple(base.weight.shape)} here but "
                                 f"{mod.weight_shape} in the file; the adapter is for another base model")
            if rank > max_rank(base):
                raise ValueError(f"{source}: rank {rank} exceeds min(in, out) of {key}")


def _file_name(adapter: Adapter, key: str) -> str:
    """A module's name in the file: its key, or the kohya name the file uses for it."""
    return adapter.file_names.get(key, key)


def _magnitude_name(adapter: Adapter, key: str) -> str:
    kohya = key in adapter.file_names
    return f"{_file_name(adapter, key)}.{'dora_scale' if kohya else 'lora_magnitude_vector'}"


def _check_magnitude(adapter: Adapter, key: str, module: nn.Module) -> None:
    """A DoRA magnitude is the norm the adapted weight's rows (columns) get; training moves it a
    few percent from the base's. One over ``MAX_MAGNITUDE_GROWTH`` × the base's largest norm is
    finite but makes activations overflow (black images): refused, naming the tensor."""
    mod = adapter.modules[key]
    W0 = module.base_weight if isinstance(module, DoRALinear) else module.weight
    if not mod.is_dora or W0.is_meta or tuple(W0.shape) != mod.weight_shape:
        return
    growth = float(mod.magnitude.abs().max()) / float(axis_norm(W0, mod.axis).max())
    if growth > MAX_MAGNITUDE_GROWTH:
        raise ValueError(f"{adapter.source}: tensor {_magnitude_name(adapter, key)!r} is up to {growth:.3g}× "
                         f"the base weight's norms (training moves them by a few percent; at most "
                         f"{MAX_MAGNITUDE_GROWTH:g}× loads); {DAMAGED}")


def _check_complete(adapter: Adapter, components: dict[str, nn.Module]) -> None:
    """A dorabooth file records the targets it was trained with (``dorabooth.targets``); every module
    they select in this base must be in the file. Refused otherwise: a module was removed or the
    copy is damaged (files that cover fewer components, e.g. UNet only, record only those)."""
    if "dorabooth.targets" not in adapter.metadata:
        return                                 # other tools' files: loaded as the modules they hold
    for component, keys in adapter.by_component().items():
        model, recorded = components[component], (adapter.targets or {}).get(component)
        if not recorded:
            continue
        try:
            selected = inject.resolve_targets(model, recorded)
        except ValueError:
            continue                           # a target this base lacks: _check_fits judged the modules
        have = set(module_paths(keys))
        missing = [n for n in (inject.canonical_name(model, component, m) for m in selected) if n not in have]
        if missing:
            raise ValueError(f"{adapter.source}: its recorded {component} targets ({', '.join(recorded)}) select "
                             f"{len(selected)} modules but the file has tensors for {len(selected) - len(missing)}; "
                             f"missing {component}.{missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                     else "")
                             + "; the file is incomplete (damaged or cut): use the complete file or an earlier "
                               "checkpoint")


def _matches(current: dict[str, DoRALinear], paths: list[str], config: dict) -> bool:
    """True if the attached layers are exactly ``paths`` with ``config`` (then only tensors are loaded);
    never for DVoRA layers: files always load as DoRA (lora_A = diag(d)·A, lora_B = diag(b)·B)."""
    if set(current) != set(paths):
        return False
    c = config
    return all(type(m) is DoRALinear and m.rank == c["rank"] and m.alpha == c["alpha"] and m.use_dora == c["use_dora"] and m.rslora == c["rslora"]
               and (not c["use_dora"] or m.magnitude_axis == c["magnitude_axis"]) for m in current.values())


__all__ = ["attach", "detach", "set_strength", "merge", "unmerge", "save_adapter", "load_adapter"]
