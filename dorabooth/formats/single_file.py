"""Single-file checkpoints in the original layout (DESIGN §7): diffusers components → one file.

The inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``::

    unet            model.diffusion_model.<input_blocks|middle_block|output_blocks…>
    vae             first_stage_model.<encoder.down.i.block.j…>   (mid attention as 1×1 convs)
    text_encoder    SD 1.x  cond_stage_model.transformer.text_model.…       (CLIP, HF layout)
                    SD 2.x  cond_stage_model.model.…                        (OpenCLIP layout)
                    SDXL    conditioner.embedders.0.transformer.text_model.…
    text_encoder_2  SDXL    conditioner.embedders.1.model.…                 (OpenCLIP layout)

OpenCLIP layout: ``q_proj``/``k_proj``/``v_proj`` concatenated along the output axis into
``transformer.resblocks.i.attn.in_proj_weight`` (3·d, d) and ``in_proj_bias``;
``text_projection`` stored transposed ((hidden, proj), used as ``x @ P``); ``layer_norm1/2`` →
``ln_1/2``, ``mlp.fc1/fc2`` → ``mlp.c_fc/c_proj``, final norm → ``ln_final``, embeddings →
``token_embedding.weight`` / ``positional_embedding``.

Every diffusers parameter has a :class:`Target`: an original key, and for q/k/v the part
(0, 1, 2) of a concatenated tensor, or a transform. Writers assemble a whole file from
component state dicts, or replace only some weights inside an existing single file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .files import header_date
from .layout import UNetLayout, text_module, unet_to_original

PREFIX = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
             "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# SAI model spec architecture ids (Stability-AI/ModelSpec README); SD 2.x has two, told apart by
# the prediction type ("SDV2-512 and SDv2-768-v are different enough that the distinction must be marked").
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
SD2_V_ARCH = "stable-diffusion-v2-768-v"
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


@dataclass(frozen=True)
class Target:
    key: str                    # original-layout key
    part: int | None = None     # index in a q/k/v concatenation along dim 0
    transform: str | None = None  # "T" (transpose), "conv1x1" ((c, c) → (c, c, 1, 1))


# ---- per component -------------------------------------------------------------------------
def _vae_name(key: str) -> tuple[str, str | None]:
    """diffusers AutoencoderKL key → (original key, transform)."""
    top = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for a, b in top.items():
        if key.startswith(a + "."):
            return b + key[len(a):], None
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return key, None
    side = p[0]
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return ".".join([side, "mid", f"block_{int(p[3]) + 1}", *_vae_resnet(p[4:])]), None
        if p[2] == "attentions":
            rename = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            rest = p[4:]
            if rest[0] == "to_out":
                rest = rest[2:]          # to_out.0.weight → proj_out.weight
                name = "proj_out"
            else:
                name = rename[rest[0]]
                rest = rest[1:]
            conv = name != "norm" and rest[-1] == "weight"
            return ".".join([side, "mid", "attn_1", name, *rest]), "conv1x1" if conv else None
    if side == "encoder" and p[1] == "down_blocks":
        i = int(p[2])
        if p[3] == "downsamplers":
            return ".".join(["encoder", "down", str(i), "downsample", "conv", *p[6:]]), None
        return ".".join(["encoder", "down", str(i), "block", p[4], *_vae_resnet(p[5:])]), None
    if side == "decoder" and p[1] == "up_blocks":
        raise KeyError("decoder up blocks need the block count")  # handled in vae_target
    raise KeyError(key)


def _vae_resnet(rest: list[str]) -> list[str]:
    return ["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]]


def vae_target(key: str, num_up_blocks: int) -> Target:
    p = key.split(".")
    if p[0] == "decoder" and p[1] == "up_blocks":
        i = num_up_blocks - 1 - int(p[2])       # diffusers counts up blocks from the bottom
        if p[3] == "upsamplers":
            return Target(".".join(["decoder", "up", str(i), "upsample", "conv", *p[6:]]))
        return Target(".".join(["decoder", "up", str(i), "block", p[4], *_vae_resnet(p[5:])]))
    name, transform = _vae_name(key)
    return Target(name, None, transform)


_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": Target("token_embedding.weight"),
    "text_model.embeddings.position_embedding.weight": Target("positional_embedding"),
    "text_model.final_layer_norm.weight": Target("ln_final.weight"),
    "text_model.final_layer_norm.bias": Target("ln_final.bias"),
    "text_projection.weight": Target("text_projection", transform="T"),
}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def openclip_target(key: str) -> Target | None:
    """CLIPTextModel(WithProjection) key → OpenCLIP target; None for buffers OpenCLIP lacks."""
    key = text_module(key)
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key]
    p = key.split(".")
    if key.endswith("position_ids"):
        return None
    if p[:3] == ["text_model", "encoder", "layers"]:
        i, rest = p[3], ".".join(p[4:])
        for q, n in (("self_attn.q_proj.", 0), ("self_attn.k_proj.", 1), ("self_attn.v_proj.", 2)):
            if rest.startswith(q):
                return Target(f"transformer.resblocks.{i}.attn.in_proj_{rest[len(q):]}", part=n)
        for a, b in _OPENCLIP_LAYER.items():
            if rest.startswith(a + "."):
                return Target(f"transformer.resblocks.{i}.{b}{rest[len(a):]}")
    raise KeyError(f"text encoder key {key!r} has no OpenCLIP equivalent")


def clip_target(key: str) -> Target | None:
    if key.endswith("position_ids"):
        return None
    return Target(text_module(key))


def component_target(family: str, component: str, key: str, *, layout: UNetLayout | None = None,
                     num_up_blocks: int = 4) -> Target | None:
    """The original-layout target of one diffusers parameter (None: not stored there)."""
    prefixes = PREFIX[family]
    if component not in prefixes:
        raise ValueError(f"a {family} checkpoint has no {component}")
    if component == "unet":
        return Target(prefixes["unet"] + unet_to_original(key, layout))
    if component == "vae":
        t = vae_target(key, num_up_blocks)
        return Target(prefixes["vae"] + t.key, t.part, t.transform)
    kind, prefix = prefixes[component]
    t = clip_target(key) if kind == "clip" else openclip_target(key)
    return None if t is None else Target(prefix + t.key, t.part, t.transform)


# ---- whole files -----------------------------------------------------------------------------
def _apply(t: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform == "T":
        return t.t().contiguous()
    if transform == "conv1x1" and t.ndim == 2:
        return t.reshape(*t.shape, 1, 1)
    return t


def _undo(t: torch.Tensor, transform: str | None) -> torch.Tensor:
    if transform == "T":
        return t.t().contiguous()
    if transform == "conv1x1" and t.ndim == 4:
        return t.reshape(t.shape[0], t.shape[1])
    return t


class Mapper:
    """Targets for the components of one pipeline (configs read once)."""

    def __init__(self, family: str, unet_config, vae_config=None):
        self.family = family
        self.layout = UNetLayout.from_config(unet_config)
        get = (vae_config.get if isinstance(vae_config, dict) else (lambda k, d=None: getattr(vae_config, k, d))) \
            if vae_config is not None else (lambda k, d=None: d)
        self.num_up_blocks = len(get("up_block_types", ()) or ()) or 4

    def target(self, component: str, key: str) -> Target | None:
        try:
            return component_target(self.family, component, key, layout=self.layout, num_up_blocks=self.num_up_blocks)
        except KeyError as e:
            raise KeyError(f"{component}.{key}: no original-layout key ({e})") from None

    def plan(self, names: dict[str, list[str]]) -> dict[str, list[tuple[str, str, Target]]]:
        """``{original key: [(component, diffusers name, target), …]}`` for the diffusers parameters
        ``names`` (per component): one entry per key, three (q, k, v) for a concatenated one."""
        out: dict[str, list[tuple[str, str, Target]]] = {}
        for component, keys in names.items():
            for key in keys:
                t = self.target(component, key)
                if t is None:
                    continue
                pieces = out.setdefault(t.key, [])
                if pieces and (t.part is None or pieces[0][2].part is None):
                    raise ValueError(f"two parameters map to {t.key}")
                pieces.append((component, key, t))
        for key, pieces in out.items():
            if pieces[0][2].part is not None and sorted(p[2].part for p in pieces) != [0, 1, 2]:
                raise ValueError(f"{key}: q, k and v projections are all needed, got parts "
                                 f"{sorted(p[2].part for p in pieces)}")
        return out

    @staticmethod
    def original_shape(pieces: list[tuple[Target, tuple[int, ...]]]) -> tuple[int, ...]:
        """The shape of an original-layout tensor made of diffusers parameters of these shapes."""
        t, shape = pieces[0]
        if t.part is not None:
            return (sum(s[0] for _, s in pieces), *shape[1:])
        if t.transform == "T":
            return tuple(reversed(shape))
        if t.transform == "conv1x1" and len(shape) == 2:
            return (*shape, 1, 1)
        return tuple(shape)

    @staticmethod
    def assemble(pieces: list[tuple[Target, torch.Tensor]]) -> torch.Tensor:
        """One original-layout tensor from its diffusers parameters (a plan's entry, with values)."""
        if pieces[0][0].part is None:
            return _apply(pieces[0][1], pieces[0][0].transform)
        by_part = {t.part: v for t, v in pieces}
        return torch.cat([by_part[0], by_part[1], by_part[2]], dim=0)

    def to_original(self, components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Whole component state dicts → one original-layout state dict."""
        plan = self.plan({c: list(sd) for c, sd in components.items()})
        return {key: self.assemble([(t, components[c][k]) for c, k, t in pieces]) for key, pieces in plan.items()}

    def read(self, original: Mapping[str, torch.Tensor], component: str, key: str) -> torch.Tensor:
        """One diffusers parameter's value inside an original-layout state dict (any mapping)."""
        t = self.target(component, key)
        if t is None or t.key not in original:
            raise KeyError(f"{component}.{key}: {t.key if t else 'nothing'} is not in the checkpoint")
        v = original[t.key]
        if t.part is not None:
            d = v.shape[0] // 3
            v = v[t.part * d:(t.part + 1) * d]
        return _undo(v, t.transform)

    def updated(self, key: str, tensor: torch.Tensor, updates: list[tuple[Target, torch.Tensor]]) -> torch.Tensor:
        """``tensor`` (original key ``key``) with some of its diffusers parameters replaced, in
        ``tensor``'s dtype (shapes checked); a new tensor, ``tensor`` is not modified."""
        out = tensor
        for t, value in updates:
            v = _apply(value, t.transform)
            if t.part is None:
                if tuple(v.shape) != tuple(tensor.shape):
                    raise ValueError(f"{key}: new shape {tuple(v.shape)} != {tuple(tensor.shape)}")
                out = v.to(tensor.dtype)
            else:
                if out is tensor:
                    out = tensor.clone()
                d = out.shape[0] // 3
                if tuple(v.shape) != tuple(out[t.part * d:(t.part + 1) * d].shape):
                    raise ValueError(f"{key} part {t.part}: new shape {tuple(v.shape)} does not fit")
                out[t.part * d:(t.part + 1) * d] = v.to(out.dtype)
        return out

    def replace(self, original: dict[str, torch.Tensor], updates: dict[tuple[str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of ``original`` with some diffusers parameters replaced (shapes checked)."""
        by_key: dict[str, list[tuple[Target, torch.Tensor]]] = {}
        for (component, key), value in updates.items():
            t = self.target(component, key)
            if t is None or t.key not in original:
                raise KeyError(f"{component}.{key}: the base checkpoint has no {t.key if t else 'such key'}")
            by_key.setdefault(t.key, []).append((t, value))
        return {k: self.updated(k, v, by_key[k]) if k in by_key else v for k, v in original.items()}


def image_spec(pipe) -> dict:
    """``resolution`` (the UNet's sample_size × the VAE's downscale factor) and ``prediction_type``
    (the scheduler's) of a pipeline, for :func:`modelspec` and kohya headers."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return {"resolution": int(pipe.unet.config.sample_size) * vae_scale,
            "prediction_type": getattr(pipe.scheduler.config, "prediction_type", None) or "epsilon"}


def model_class(family: str, *, resolution: int | None = None, prediction_type: str | None = None) -> dict[str, str]:
    """The SAI model spec's ``architecture``, ``resolution`` and (when known) ``prediction_type``
    (``v`` | ``epsilon``): SD 2.x is ``stable-diffusion-v2-768-v`` when it predicts v, else
    ``-512``; the resolution defaults to the architecture's (768 for 768-v)."""
    v = prediction_type == "v_prediction"
    arch = SD2_V_ARCH if family == "sd2" and v else MODELSPEC_ARCH[family]
    side = resolution or (768 if arch == SD2_V_ARCH else DEFAULT_RESOLUTION[family])
    out = {"modelspec.architecture": arch, "modelspec.resolution": f"{side}x{side}"}
    if prediction_type in ("v_prediction", "epsilon"):
        out["modelspec.prediction_type"] = "v" if v else "epsilon"
    return out


def modelspec(family: str, title: str, *, resolution: int | None = None,
              prediction_type: str | None = None) -> dict[str, str]:
    """SAI model spec header entries of a checkpoint (``resolution``/``prediction_type``: from
    :func:`image_spec` of the pipeline it was written from)."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        **model_class(family, resolution=resolution, prediction_type=prediction_type),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": title,
        "modelspec.date": header_date(),
    }
