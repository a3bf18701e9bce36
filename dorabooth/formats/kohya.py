"""kohya / LyCORIS / OneTrainer adapter files (``lora_down`` / ``lora_up`` / ``alpha`` / ``dora_scale``).

Written (DESIGN §7)::

    lora_unet_<module>.lora_down.weight    (r, in)
    lora_unet_<module>.lora_up.weight      (out, r)
    lora_unet_<module>.alpha               ()         s = alpha / r
    lora_unet_<module>.dora_scale          (out, 1) for axis "out", (1, in) for axis "in"

LoCon (Conv2d modules: ResNet ``conv1`` → sgm ``in_layers_2``, ``conv2`` → ``out_layers_3``,
``conv_shortcut`` → ``skip_connection`` in SDXL names; SD 1.x ``…_resnets_0_conv1``, ``proj_in``)::

    lora_unet_<module>.lora_down.weight    (r, in, kh, kw)
    lora_unet_<module>.lora_up.weight      (out, r, 1, 1)
    lora_unet_<module>.dora_scale          (out, 1, 1, 1) axis "out", (1, in, 1, 1) axis "in"

``<module>``: SD 1.x/2.x UNets with diffusers names (``down_blocks_0_attentions_0_…``), SDXL
UNets in the sgm layout kohya and ComfyUI use (``input_blocks_4_1_transformer_blocks_0_attn2_to_q``);
text encoders ``lora_te_`` (SD 1.x/2.x), ``lora_te1_`` / ``lora_te2_`` (SDXL), always with the
``text_model_`` level: ComfyUI's key map only knows ``lora_te1_text_model_encoder_layers_…``.
A 2-D ``dora_scale`` only: ComfyUI mis-broadcasts a 1-D one (ComfyUI #12938).

Read: the same, plus diffusers-style ``lora_unet_down_blocks_…`` names for SDXL (LyCORIS,
OneTrainer "legacy"), ``lycoris_…`` names, text-encoder names with or without
``text_model_``, OneTrainer's internal dotted names (``lora_unet.down_blocks.…``,
``lora_te1.text_model.…``) and its OMI names (``unet.input_blocks.…``, ``clip_l.…``,
``clip_g.…``), and LyCORIS/kohya LoCon conv modules (4-D, 1×1 ``lora_up``; Tucker
``lora_mid`` is refused). The axis of ``dora_scale`` is detected from its shape and never changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from ..version import __version__
from .files import header_date
from .layout import UNetLayout, flatten, is_original_unet_name, original_to_unet, text_module, unet_to_original, unflatten
from .neutral import Adapter, ModuleAdapter, axis_from_shape, split_module_key
from .single_file import model_class
from .subject import Subject, description

SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale"}
_UNSUPPORTED = ("hada_w1_a", "lokr_w1", "lokr_w2", "lora_mid.weight", "oft_blocks", "oft_diag", "a1.weight",
                "w_norm", "diff", "on_input")
_UNDERSCORE_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                        "lora_te_": "text_encoder", "lycoris_": None}
_DOTTED_PREFIXES = {"lora_unet.": "unet", "lora_te1.": "text_encoder", "lora_te2.": "text_encoder_2",
                    "lora_te.": "text_encoder", "unet.": "unet", "clip_l.": "text_encoder",
                    "clip_g.": "text_encoder_2", "clip_h.": "text_encoder"}
WRITE_PREFIX = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sd2": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def split_key(key: str) -> tuple[str, str] | None:
    """``"lora_unet_x.lora_down.weight"`` → ``("lora_unet_x", "down")``; None for other keys."""
    for suffix, part in SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    return None


def module_key(name: str, *, family: str | None, layout: UNetLayout) -> str:
    """A kohya/LyCORIS/OneTrainer module name → the neutral ``component.module`` key."""
    for prefix, component in _UNDERSCORE_PREFIXES.items():
        if name.startswith(prefix) and "." not in name:
            path = unflatten(name[len(prefix):])
            break
    else:
        for prefix, component in _DOTTED_PREFIXES.items():
            if name.startswith(prefix):
                path = name[len(prefix):]
                break
        else:
            raise KeyError(name)
    if component is None:   # lycoris_…: a network made on one model, usually the UNet
        component = "text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"
    if component == "unet":
        if is_original_unet_name(path):
            path = original_to_unet(path, layout, sdxl=family != "sd1" and family != "sd2")
    else:
        path = text_module(path)
    return f"{component}.{path}"


def _meta_family(meta: Mapping[str, str]) -> str | None:
    fam = meta.get("dorabooth.family")
    if fam in ("sd1", "sd2", "sdxl"):
        return fam
    version = str(meta.get("ss_base_model_version", ""))
    arch = str(meta.get("modelspec.architecture", ""))
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or str(meta.get("ss_v2", "")) == "True" or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def _shape_family(names: list[str], groups: dict[str, dict[str, torch.Tensor]]) -> str | None:
    if any(n.startswith(("lora_te2", "clip_g.")) for n in names):
        return "sdxl"
    for name, g in groups.items():
        if "attn2_to_k" in name or "attn2.to_k" in name:
            width = g["down"].shape[1] if "down" in g else None
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
    return None


def read_state_dict(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str = "<memory>",
                    *, family: str | None = None, layout: UNetLayout | None = None) -> Adapter:
    """Group kohya-style tensors by module and build the neutral adapter."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        if any(u in key for u in _UNSUPPORTED):
            raise ValueError(f"{source}: {key} belongs to a LyCORIS algorithm other than LoRA/DoRA "
                             f"(LoHa, LoKr, OFT, Tucker/CP conv, …); dorabooth converts LoRA and DoRA only")
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        groups.setdefault(parts[0], {})[parts[1]] = t
    if not groups:
        raise ValueError(f"{source}: no kohya/LyCORIS adapter tensors (…lora_down.weight / …lora_up.weight) found")
    family = family or _meta_family(meta) or _shape_family(list(groups), groups)
    if layout is None:
        layout = UNetLayout.from_json(json.loads(meta["dorabooth.unet_layout"])) \
            if "dorabooth.unet_layout" in meta else UNetLayout.default(family)

    modules: dict[str, ModuleAdapter] = {}
    names: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    axes = set()
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            missing = "lora_up" if "down" in g else "lora_down"
            raise ValueError(f"{source}: {name} has no {missing}.weight; the file is incomplete or truncated")
        down, up = g["down"], g["up"]
        if down.ndim == 4 and (up.ndim != 4 or tuple(up.shape[2:]) != (1, 1)):
            raise ValueError(f"{source}: {name}: a conv lora_up of shape {tuple(up.shape)}; dorabooth reads LoCon "
                             f"with a 1×1 lora_up (r → out), as kohya and LyCORIS write it")
        if down.ndim != up.ndim or down.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
            raise ValueError(f"{source}: {name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                             f"are not (r, in) and (out, r), or a conv's (r, in, kh, kw) and (out, r, 1, 1), "
                             f"of one rank")
        try:
            key = module_key(name, family=family, layout=layout)
        except KeyError:
            unknown += [f"{name}.{s}" for s in g]
            continue
        if key in modules:
            raise ValueError(f"{source}: two modules in the file map to {key} (names with and without "
                             f"'text_model_'?)")
        rank = down.shape[0]
        alpha = float(g["alpha"].float().item()) if "alpha" in g else float(rank)
        magnitude = axis = None
        if "dora_scale" in g:
            ds = g["dora_scale"]
            try:
                axis = axis_from_shape(tuple(ds.shape), up.shape[0], down.shape[1])
            except ValueError as e:
                raise ValueError(f"{source}: {name}.dora_scale: {e}") from None
            magnitude = ds.float().reshape(-1)
            axes.add(axis)
            shapes[key] = tuple(ds.shape)
        modules[key] = ModuleAdapter(down, up, alpha / rank, magnitude, axis)
        names[key] = name
    if not modules:
        raise ValueError(f"{source}: no module names could be read (e.g. {sorted(groups)[:2]})")

    if "dorabooth.version" in meta:
        what = "kohya (dorabooth)"
    elif "lycoris.kohya" in meta.get("ss_network_module", "") or any(n.startswith("lycoris_") for n in groups):
        what = "LyCORIS"
    elif any(n.startswith(("lora_unet.", "lora_te1.", "lora_te.", "unet.", "clip_l.")) for n in groups):
        what = "OneTrainer"
    else:
        what = "kohya"
    kind = "DoRA" if axes else "LoRA"
    axis_word = f", dora_scale {'(out, 1)' if axes == {'out'} else '(1, in)' if axes == {'in'} else 'mixed'}" if axes else ""
    stated = meta.get("dorabooth.magnitude_axis")
    if stated in ("out", "in") and axes and axes != {stated}:
        raise ValueError(f"{source}: header says magnitude axis {stated!r} but dora_scale shapes say {sorted(axes)}")
    return Adapter(modules=modules, family=family, format=f"{what} ({kind}{axis_word})", source=source,
                   metadata=dict(meta), unknown_keys=tuple(sorted(unknown)),
                   rslora=None, base_model=meta.get("dorabooth.base_model") or meta.get("ss_sd_model_name"),
                   file_names=names, magnitude_shapes=shapes, subject=Subject.from_metadata(meta),
                   base_hash=meta.get("dorabooth.base_hash"))


def kohya_name(key: str, family: str, layout: UNetLayout) -> str:
    """Neutral module key → the kohya module name we write."""
    component, path = split_module_key(key)
    try:
        prefix = WRITE_PREFIX[family][component]
    except KeyError:
        raise ValueError(f"a {family} model has no {component}; the adapter does not fit the family") from None
    if component == "unet":
        if family == "sdxl":
            path = unet_to_original(path, layout)
    else:
        path = text_module(path)
    return f"{prefix}_{flatten(path)}"


def to_state_dict(adapter: Adapter, family: str, layout: UNetLayout,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for key, m in adapter.modules.items():
        name = kohya_name(key, family, layout)
        if f"{name}.lora_down.weight" in sd:
            raise ValueError(f"two modules map to the kohya name {name}")
        sd[f"{name}.lora_down.weight"] = m.down.to(dtype)
        sd[f"{name}.lora_up.weight"] = m.up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        if m.is_dora:
            shape = (m.out_features, 1) if m.axis == "out" else (1, m.in_features)
            if m.is_conv:               # what ComfyUI's weight_decompose and LyCORIS broadcast over a conv
                shape = (*shape, 1, 1)
            sd[f"{name}.dora_scale"] = m.magnitude.reshape(shape).to(dtype)
    return sd


def metadata(adapter: Adapter, family: str, layout: UNetLayout, *, title: str = "",
             base_model: str | None = None, resolution: int | None = None,
             prediction_type: str | None = None) -> dict[str, str]:
    """``ss_*`` (kohya/A1111), ``modelspec.*`` (SAI model spec) and ``dorabooth.*`` header entries.
    ``resolution``/``prediction_type``: the base's (``single_file.image_spec``), when known. With
    the adapter's :class:`~.subject.Subject` the title, the A1111 alias (``ss_output_name``), the
    description, the trigger phrase and the training tags name the subject."""
    ranks, alphas = adapter.ranks(), adapter.alphas()
    axis = adapter.axis
    dora = adapter.method != "lora"
    subject = adapter.subject
    args = {"algo": "lora"}
    if dora:
        args.update({"dora_wd": "True", "wd_on_output": "True" if axis == "out" else "False"})
    meta = {
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": f"{max(alphas):g}",
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": subject.slug(adapter.method) if subject else (title or "dorabooth"),
        "modelspec.sai_model_spec": "1.0.0",
        **{k: f"{v}/lora" if k == "modelspec.architecture" else v
           for k, v in model_class(family, resolution=resolution, prediction_type=prediction_type).items()},
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": subject.title(adapter.method) if subject else (title or "dorabooth adapter"),
        "modelspec.date": header_date(),
        "modelspec.description": description(subject, adapter.method, axis, base_model or adapter.base_model),
        **(subject.metadata() if subject else {}),
        "dorabooth.version": __version__,
        "dorabooth.family": family,
        "dorabooth.method": adapter.method,
        "dorabooth.magnitude_axis": axis or "none",
        "dorabooth.unet_layout": json.dumps(layout.to_json()),
    }
    if base_model or adapter.base_model:
        meta["ss_sd_model_name"] = str(base_model or adapter.base_model)
        meta["dorabooth.base_model"] = str(base_model or adapter.base_model)
    if adapter.base_hash:
        meta["dorabooth.base_hash"] = adapter.base_hash
    return meta

