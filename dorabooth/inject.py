"""Put DoRA/LoRA layers into a UNet or CLIP text encoder and take them out again.

Owns: target presets (DESIGN §4), resolving targets to ``nn.Linear`` (and ``nn.Conv2d``)
module names, wrapping them with :class:`~dorabooth.dora.DoRALinear` (:class:`~dorabooth.dora.DoRAConv2d`
for a conv: LoCon), freezing everything else, ``detach`` back to
the original modules, and adapter state dicts for a whole pipeline with ``unet.`` /
``text_encoder.`` / ``text_encoder_2.`` prefixes.

Names inside adapter state dicts are *canonical*: PEFT's per-layer names
(``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``) after the module path, and
CLIP text-encoder paths always with the ``text_model.`` level that adapter files in
circulation have. transformers 5 dropped that level from ``CLIPTextModel`` (not from
``CLIPTextModelWithProjection``); :func:`canonical_name` and :func:`module_name` map both ways,
so the same adapter state dict loads on both stacks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .dora import DoRALinear, adapter_layer, max_rank
from .dvora import DVoRALinear

_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")
ATTN = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in _ATTN_PROJ)
CROSS_ATTN = tuple(f"attn2.{p}" for p in _ATTN_PROJ)
FF = ("ff.net.0.proj", "ff.net.2")  # GEGLU input projection and output Linear of each transformer block
ALL_LINEAR = "all-linear"
# LoCon: the ResNet convolutions and SD 1.x's 1×1 proj_in/proj_out (Linear in SD 2.x/SDXL, and
# then not selected by these: conv presets select nn.Conv2d modules only).
CONV = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")

UNET_PRESETS: dict[str, tuple[str, ...] | str] = {     # preset → the nn.Linear modules it selects
    "attn": ATTN,
    "cross-attn": CROSS_ATTN,
    "attn+ff": ATTN + FF,
    "all-linear": ALL_LINEAR,
    "conv": (),
    "attn+conv": ATTN,
    "all": ALL_LINEAR,
}
CONV_PRESETS: dict[str, tuple[str, ...]] = {"conv": CONV, "attn+conv": CONV, "all": CONV}   # … and nn.Conv2d
TEXT_ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")

_TARGETS_ATTR = "_dorabooth_targets"        # the target spec given at attach, kept for metadata
_GRAD_ATTR = "_dorabooth_requires_grad"     # requires_grad of every parameter before attach


# ---- targets -----------------------------------------------------------------------------
def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"attn"`` → ``("attn",)``; ``"to_q, to_k"`` → ``("to_q", "to_k")``; lists pass through."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())
    if not parts:
        raise ValueError(f"no target modules given; use a preset ({', '.join(UNET_PRESETS)}) or module names")
    return parts


def _pattern_matcher(pattern: str):
    """A module name matches if it equals the pattern, ends with ``.pattern``, or fully matches it as a regex."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"target {pattern!r} is neither a module name nor a valid regular expression: {e}") from None
    return lambda name: name == pattern or name.endswith("." + pattern) or rx.fullmatch(name) is not None


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d]


def _adaptable_names(model: nn.Module) -> list[str]:
    """Every module an adapter layer can wrap (``nn.Linear``, plain ``nn.Conv2d``), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m) is nn.Conv2d]


def _named(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` selected by ``spec``, in module order.

    ``spec``: a UNet preset name (``attn``, ``cross-attn``, ``attn+ff``, ``all-linear``; with
    convolutions ``conv``, ``attn+conv``, ``all``), or module names / suffixes / regular
    expressions (a list or a comma-separated string). Linear presets and regular expressions
    select ``nn.Linear`` modules; conv presets and exact names or suffixes (``conv1``) also
    select ``nn.Conv2d`` modules. Every preset and every pattern must match at least one module.
    """
    cls = type(model).__name__
    linear, convs = _linear_names(model), _conv_names(model)
    selected: set[str] = set()
    for item in parse_targets(spec):
        preset = UNET_PRESETS.get(item)
        if preset == ALL_LINEAR:
            hits = set(linear)
        elif preset is not None:
            matchers = [_pattern_matcher(p) for p in preset]
            hits = {n for n in linear if any(f(n) for f in matchers)}
        else:
            f = _pattern_matcher(item)
            hits = {n for n in linear if f(n)} | {n for n in convs if _named(n, item)}
        hits |= {n for n in convs if any(_named(n, p) for p in CONV_PRESETS.get(item, ()))}
        if not hits:
            what = f"preset {item!r}" if preset is not None else f"target {item!r}"
            raise ValueError(
                f"{what} matched no nn.Linear{' or nn.Conv2d' if item in CONV_PRESETS else ''} module in {cls}; presets are "
                f"{', '.join(UNET_PRESETS)} (UNet), or give module names such as "
                f"{', '.join(repr(n) for n in linear[:3])}"
            )
        selected |= hits
    return [n for n in _adaptable_names(model) if n in selected]


def _check_wrappable(model: nn.Module) -> None:
    cls = type(model).__name__
    if any(isinstance(m, DoRALinear) for m in model.modules()):
        raise ValueError(f"{cls} already has dorabooth adapters; detach them first (dorabooth.detach)")
    for name, m in model.named_modules():
        if type(m).__module__.startswith("peft."):
            raise ValueError(
                f"{cls} has PEFT adapter layers ({name}: {type(m).__name__}); remove them first "
                f"(pipe.unload_lora_weights() or peft's unload) before attaching dorabooth adapters"
            )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)  # also right for ModuleList children such as to_out."0"


# ---- attach / detach ---------------------------------------------------------------------
def inject(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    rank: int,
    alpha: float,
    use_dora: bool = True,
    magnitude_axis: str = "out",
    rslora: bool = False,
    dropout: float = 0.0,
    names: Sequence[str] | None = None,
    vera_seed: int | None = None,
) -> list[str]:
    """Wrap the target ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` with ``DoRALinear`` /
    ``DoRAConv2d``; freeze all else.

    ``vera_seed``: DVoRA layers (``DVoRALinear``, DoRA on VeRA) with projections from this seed.

    ``names``: wrap exactly these modules instead of resolving ``targets`` (which is then
    only recorded, e.g. when re-attaching an adapter read from a file). Returns the wrapped
    module names (as in ``model.named_modules()``). Nothing is changed when an error is
    raised: targets and ranks are checked before the first module is wrapped.
    """
    _check_wrappable(model)
    if names is None:
        names = resolve_targets(model, targets)
    else:
        adaptable = _adaptable_names(model)
        bad = [n for n in names if n not in set(adaptable)]
        if bad:
            raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d named {bad[0]!r}"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        order = {n: i for i, n in enumerate(adaptable)}
        names = sorted(set(names), key=order.__getitem__)
    too_small = [(n, tuple(model.get_submodule(n).weight.shape), max_rank(model.get_submodule(n))) for n in names
                 if rank > max_rank(model.get_submodule(n))]
    if too_small:
        shown = ", ".join(f"{n} weight {s}" for n, s, _ in too_small[:3])
        limit = min(r for _, _, r in too_small)
        raise ValueError(
            f"rank {rank} is larger than min(in, out) (min(out, in·kh·kw) for a conv) of {len(too_small)} target module(s) in "
            f"{type(model).__name__}: {shown}; use rank <= {limit} or other targets"
        )
    setattr(model, _GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)
    try:
        for name in names:
            base = model.get_submodule(name)
            if vera_seed is None:
                layer = adapter_layer(base, rank, alpha, use_dora=use_dora, magnitude_axis=magnitude_axis,
                                      rslora=rslora, dropout=dropout)
            elif not isinstance(base, nn.Linear):
                raise ValueError(f"{name} is a {type(base).__name__}: DVoRA adapts Linear layers only; "
                                 "use --targets attn, cross-attn, attn+ff or all-linear with --method dvora")
            else:
                layer = DVoRALinear(base, rank, alpha, seed=vera_seed, magnitude_axis=magnitude_axis,
                                    rslora=rslora, dropout=dropout)
            layer.train(base.training)
            _set_submodule(model, name, layer)
    except Exception:
        detach(model)  # e.g. alpha <= 0 refused by the layer: put everything back
        raise
    setattr(model, _TARGETS_ATTR, parse_targets(targets))
    return names


def dora_modules(model: nn.Module) -> list[tuple[str, DoRALinear]]:
    """``(name, layer)`` for every ``DoRALinear`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoRALinear)]


def attached_targets(model: nn.Module) -> tuple[str, ...] | None:
    """The target spec given when adapters were attached to ``model`` (None if unknown)."""
    return getattr(model, _TARGETS_ATTR, None)


def detach(model: nn.Module) -> list[str]:
    """Replace every adapter layer by its original ``nn.Linear`` / ``nn.Conv2d`` (unmerged, so it holds W0).

    The original module objects come back (same identity and weights), and ``requires_grad``
    of all parameters is restored to what it was before :func:`inject`.
    """
    names = []
    for name, layer in dora_modules(model):
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
        names.append(name)
    flags = getattr(model, _GRAD_ATTR, None)
    if flags is not None:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        delattr(model, _GRAD_ATTR)
    if hasattr(model, _TARGETS_ATTR):
        delattr(model, _TARGETS_ATTR)
    return names


def freeze(model: nn.Module) -> None:
    """Freeze ``model``, remembering the flags so that :func:`detach` can restore them."""
    if not hasattr(model, _GRAD_ATTR):
        setattr(model, _GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)


def has_trainable(model: nn.Module) -> bool:
    """True when any parameter of ``model`` trains."""
    return any(p.requires_grad for p in model.parameters())


def trainable_parameters(pipe) -> dict[str, nn.Parameter]:
    """The parameters of ``pipe`` that train, by pipeline-qualified name (``unet.…``,
    ``text_encoder.…``), over every module component."""
    params = {}
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module):
            params.update({f"{name}.{n}": p for n, p in component.named_parameters() if p.requires_grad})
    return params


def component_config(model: nn.Module, component: str = "model") -> dict:
    """rank, alpha, use_dora, magnitude_axis, rslora and vera_seed (DVoRA's, else None) shared by all
    adapter layers of ``model``.

    Raises if the layers disagree (dorabooth attaches one configuration per component).
    """
    layers = dora_modules(model)
    if not layers:
        raise ValueError(f"{component} ({type(model).__name__}) has no dorabooth adapter layers")
    configs = {(m.rank, m.alpha, m.use_dora, m.magnitude_axis if m.use_dora else None, m.rslora,
                getattr(m, "vera_seed", None)) for _, m in layers}
    if len(configs) > 1:
        raise ValueError(f"{component}: adapter layers have different configurations {sorted(configs, key=str)}; "
                         f"dorabooth writes one rank/alpha/axis per component")
    rank, alpha, use_dora, axis, rslora, vera_seed = configs.pop()
    return {"rank": rank, "alpha": alpha, "use_dora": use_dora, "magnitude_axis": axis, "rslora": rslora,
            "vera_seed": vera_seed}


# ---- canonical names ---------------------------------------------------------------------
def _flattened_clip(model: nn.Module, component: str) -> bool:
    """True for a transformers-5 ``CLIPTextModel`` (no ``text_model`` level in its module tree)."""
    return component != "unet" and type(model).__name__.startswith("CLIPTextModel") and not hasattr(model, "text_model")


def canonical_name(model: nn.Module, component: str, name: str) -> str:
    """Module name as adapter files spell it (CLIP text encoders with ``text_model.``)."""
    if _flattened_clip(model, component) and not name.startswith("text_model.") and name != "text_projection":
        return "text_model." + name
    return name


def module_name(model: nn.Module, component: str, canonical: str) -> str:
    """Inverse of :func:`canonical_name`: the name in ``model.named_modules()``."""
    if _flattened_clip(model, component):
        return canonical.removeprefix("text_model.")
    return canonical


# ---- pipelines -----------------------------------------------------------------------------
def pipeline_components(pipe) -> dict[str, nn.Module]:
    """``{"unet": …, "text_encoder": …[, "text_encoder_2": …]}`` for the components ``pipe`` has."""
    out = {}
    for name in ("unet", *TEXT_ENCODER_COMPONENTS):
        model = getattr(pipe, name, None)
        if model is not None:
            out[name] = model
    if "unet" not in out:
        raise TypeError(f"{type(pipe).__name__} has no UNet; dorabooth works on StableDiffusion(XL)Pipeline objects")
    return out


def pipeline_dora_modules(pipe) -> dict[str, DoRALinear]:
    """``{"<component>.<canonical module name>": layer}`` for every adapter layer in ``pipe``."""
    out = {}
    for component, model in pipeline_components(pipe).items():
        for name, layer in dora_modules(model):
            out[f"{component}.{canonical_name(model, component, name)}"] = layer
    return out


def adapter_state_dict(pipe) -> dict[str, torch.Tensor]:
    """All adapter tensors of ``pipe`` with canonical keys, e.g.
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` or
    ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector``.
    Tensors are detached views of the live parameters (clone before mutating)."""
    sd = {}
    for prefix, layer in pipeline_dora_modules(pipe).items():
        for key, t in layer.adapter_state_dict().items():
            sd[f"{prefix}.{key}"] = t
    return sd


LAYER_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def split_key(key: str) -> tuple[str, str]:
    """``"unet.x.to_q.lora_A.weight"`` → ``("unet.x.to_q", "lora_A.weight")``."""
    for suffix in LAYER_KEYS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise KeyError(f"{key!r} is not an adapter key (expected one ending in {', '.join(LAYER_KEYS)})")


def group_by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical flat keys → ``{"<component>.<module>": {"lora_A.weight": …, …}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        module, suffix = split_key(key)
        grouped.setdefault(module, {})[suffix] = t
    return grouped


def load_adapter_state_dict(pipe, sd: dict[str, torch.Tensor], *, source: str = "adapter state dict") -> None:
    """Copy canonical adapter tensors into the attached layers of ``pipe``, all or nothing.

    Every adapter layer of ``pipe`` must receive its tensors and every tensor must find its
    layer with the same shapes; otherwise a ``ValueError`` naming ``source`` and the first
    offending modules is raised before anything is copied.
    """
    layers = pipeline_dora_modules(pipe)
    grouped = group_by_module(sd)
    unknown = sorted(set(grouped) - set(layers))
    missing = sorted(set(layers) - set(grouped))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} module(s) have no adapter layer in this pipeline, "
                         f"e.g. {unknown[:3]}; was it made for another base model or other targets?")
    if missing:
        raise ValueError(f"{source}: no tensors for {len(missing)} attached adapter layer(s), e.g. {missing[:3]}")
    for module, tensors in grouped.items():
        layer = layers[module]
        expected = {k: tuple(v.shape) for k, v in layer.adapter_state_dict().items()}
        if set(tensors) != set(expected):
            raise ValueError(f"{source}: {module} has tensors {sorted(tensors)}, the attached layer expects "
                             f"{sorted(expected)} (DoRA vs LoRA?)")
        for k, shape in expected.items():
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"{source}: {module}.{k} has shape {tuple(tensors[k].shape)}, the attached layer "
                                 f"expects {shape} (different rank, magnitude axis or base model)")
    for module, tensors in grouped.items():
        layers[module].load_adapter_state_dict(tensors)


def iter_layers(pipe) -> Iterable[DoRALinear]:
    return pipeline_dora_modules(pipe).values()
