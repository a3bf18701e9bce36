"""Which tools apply an adapter file as trained, approximately, or not at all — and by how much.

For diffusers, ComfyUI, A1111 and the LyCORIS library, this module reimplements (from their
source) the two things that decide what a user gets from a file: which keys the tool maps to
a model weight, and the formula it applies to that weight. With the base weights it then
measures, per adapted module, ``‖W_tool − W‖_F / ‖W‖_F`` against the weight dorabooth's
definition gives (:func:`~dorabooth.formats.neutral.adapted_weight`, strength 1) and reports
the largest. Before the keys: a base model ComfyUI or A1111 cannot load at all (the embedded
toy, the tiny test models; for A1111 any layers_per_block but 2) makes the file "fails to
load" in that tool (:mod:`.tool_bases`). Sources (read for this reimplementation):

* diffusers 0.42.1 ``loaders/lora_pipeline.py``: kohya files have ``dora_scale`` filtered out
  ("not compatible in Diffusers at the moment", PR #9547) → plain LoRA. Its own PEFT-layout
  files: UNet exact; text-encoder magnitudes dropped by ``load_lora_weights`` with
  transformers 5 (they stay at PEFT's initial ‖W0‖_row), exact with transformers 4.57 +
  diffusers 0.39 (notes/stack.md, tests/compat).
* ComfyUI ``comfy/lora.py`` (``model_lora_keys_unet``/``_clip``, ``load_lora``),
  ``comfy/utils.py`` (``unet_to_diffusers``), ``comfy/weight_adapter/base.py``
  (``weight_decompose``): ``dora_scale`` of shape ``(1, in)`` → W' = V·m/‖V‖_col (exact);
  ``(out, 1)`` → W' = V·m/‖W0‖_row (divides by the base norm, ComfyUI PR #15458 open);
  diffusers-layout UNet keys are matched only in the old ``….processor.to_q`` form, and
  ``lora_magnitude_vector`` is never read; files without ``alpha`` get scale 1.
* A1111 1.10 ``extensions-builtin/Lora/networks.py`` (``convert_diffusers_name_to_compvis``),
  ``network.py`` (``apply_weight_decompose``): always W' = V·dora_scale/‖V‖_col, so ``(1, in)``
  is exact and ``(out, 1)`` broadcasts into a wrong (out, in) scale; OpenCLIP attention
  (SD 2.x, SDXL ``lora_te2``) only when q, k, v and out_proj all have adapters.
* lycoris-lora 4.x ``create_network_from_weights``: names ``lora_unet_<diffusers module>`` /
  ``lora_te{N}_<module of the loaded encoder>``; modules are built with ``wd_on_out=True``, so
  an ``(out, 1)`` file is exact at multiplier 1 and a ``(1, in)`` file fails to load.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .layout import UNetLayout, flatten, unet_to_original
from .tool_bases import a1111_base_problem, comfy_base_problem, comfy_unet_config
from ..conventions import NORM_EPS
from .neutral import Adapter, ModuleAdapter, adapted_weight, split_module_key

EXACT_TOL = 1e-5
UNMEASURED = "pass --model to measure the weight error"     # the note when no base weights are at hand
CONSUMERS = ("diffusers", "ComfyUI", "A1111", "LyCORIS")


@dataclass
class Verdict:
    consumer: str
    status: str                     # "exact" | "approximate" | "not applied" | "fails to load"
    applied: int                    # modules the tool applies at all
    total: int
    why: str
    instead: str = ""
    max_rel_error: float | None = None          # max over modules ‖W_tool − W‖_F / ‖W‖_F
    max_rel_update_error: float | None = None   # max over modules ‖W_tool − W‖_F / ‖W − W0‖_F
    worst_module: str | None = None
    notes: list[str] = field(default_factory=list)
    base_problem: bool = False                  # the tool cannot load the base model itself (any file fails)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        err = ""
        if self.max_rel_error is not None and self.status not in ("fails to load",):
            where = f" ({self.worst_module})" if self.worst_module else ""
            err = f" — max weight error {100 * self.max_rel_error:.3g}%{where}"
        head = f"{self.consumer:<9} {self.status}{err}; {self.applied}/{self.total} modules applied"
        out = [head, f"          {self.why}"]
        if self.instead:
            out.append(f"          instead: {self.instead}")
        return "\n".join(out)


# ---- ComfyUI key maps (comfy/utils.py unet_to_diffusers, comfy/lora.py) -----------------------
_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
_TRANSFORMER_BLOCK_WEIGHTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                              "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
_ATTN_WEIGHTS = ("proj_in", "proj_out", "norm")
_RESNET_WEIGHTS = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                   "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}


def comfy_unet_to_diffusers(cfg: dict) -> dict[str, str]:
    """diffusers module name → ComfyUI (sgm) module name, for the modules with weights
    (a reimplementation of ``comfy.utils.unet_to_diffusers`` at module level)."""
    num_res = list(cfg["num_res_blocks"])
    depth, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    nb = len(cfg["channel_mult"])
    out: dict[str, str] = {}
    for x in range(nb):
        n = 1 + (num_res[x] + 1) * x
        for i in range(num_res[x]):
            for sgm, d in _RESNET_WEIGHTS.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{sgm}"
            t_n = depth.pop(0)
            if t_n > 0:
                for b in _ATTN_WEIGHTS:
                    out[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(t_n):
                    for b in _TRANSFORMER_BLOCK_WEIGHTS:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    for b in _ATTN_WEIGHTS:
        out[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(cfg["transformer_depth_middle"]):
        for b in _TRANSFORMER_BLOCK_WEIGHTS:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for sgm, d in _RESNET_WEIGHTS.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{sgm}"
    num_res = list(reversed(num_res))
    for x in range(nb):
        n = (num_res[x] + 1) * x
        length = num_res[x] + 1
        for i in range(length):
            c = 1
            for sgm, d in _RESNET_WEIGHTS.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{sgm}"
            t_n = depth_out.pop()
            if t_n > 0:
                c += 1
                for b in _ATTN_WEIGHTS:
                    out[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(t_n):
                    for b in _TRANSFORMER_BLOCK_WEIGHTS:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            if i == length - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"})
    return out


def comfy_key_map(family: str, unet_config, te_layers: dict[str, int]) -> dict[str, str]:
    """ComfyUI's LoRA key map: file module name → neutral module key (``unet.…``/``text_encoder…``).

    ``te_layers``: number of encoder layers per text-encoder component.
    """
    key_map: dict[str, str] = {}
    d2s = comfy_unet_to_diffusers(comfy_unet_config(unet_config))
    get = unet_config.get if isinstance(unet_config, dict) else (lambda k, d=None: getattr(unet_config, k, d))
    absent = "class_embedding." if get("addition_embed_type") == "text_time" else "add_embedding."
    for d, s in d2s.items():
        if d.startswith(absent):      # both are label_emb.0 in ComfyUI; the model has one of them
            continue
        key_map[f"lora_unet_{flatten(s)}"] = f"unet.{d}"        # "diffusion_model." keys, underscored
        key_map[f"lora_unet_{flatten(d)}"] = f"unet.{d}"
        key_map[f"lycoris_{flatten(d)}"] = f"unet.{d}"
        for p in ("", "unet."):
            k = p + d.replace(".to_", ".processor.to_")
            key_map[k[:-2] if k.endswith(".to_out.0") else k] = f"unet.{d}"
    # model_lora_keys_clip: clip_l (SD1, SDXL te1), clip_h (SD2), clip_g (SDXL te2)
    encoders = {"sd1": [("clip_l", "text_encoder")], "sd2": [("clip_h", "text_encoder")],
                "sdxl": [("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")]}[family]
    clip_l_present = any(n == "clip_l" for n, _ in encoders)
    for name, component in encoders:
        for b in range(min(te_layers.get(component, 0), 32)):
            for c, flat in _LORA_CLIP_MAP.items():
                target = f"{component}.text_model.encoder.layers.{b}.{c}"
                if name in ("clip_l", "clip_h"):
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{flat}"] = target
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{flat}"] = target
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = target
                elif clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{flat}"] = target
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = target
    return key_map


_COMFY_SUFFIXES = ("lora_up.weight", "lora_down.weight", "_lora.up.weight", "_lora.down.weight", "lora_B.weight",
                   "lora_A.weight", "lora.up.weight", "lora.down.weight", "lora_linear_layer.up.weight",
                   "lora_linear_layer.down.weight", "alpha", "dora_scale")


def comfy_loaded_keys(file_keys: list[str], key_map: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """(file module name → neutral key for the modules ComfyUI patches, the file keys it reads)."""
    keys = set(file_keys)
    modules, loaded = {}, set()
    for x, target in key_map.items():
        up_down = [(f"{x}.lora_up.weight", f"{x}.lora_down.weight"), (f"{x}_lora.up.weight", f"{x}_lora.down.weight"),
                   (f"{x}.lora_B.weight", f"{x}.lora_A.weight"), (f"{x}.lora.up.weight", f"{x}.lora.down.weight"),
                   (f"{x}.lora_linear_layer.up.weight", f"{x}.lora_linear_layer.down.weight")]
        for up, down in up_down:
            if up in keys:
                modules[x] = target
                loaded |= {up, down}
                loaded |= {k for k in (f"{x}.alpha", f"{x}.dora_scale") if k in keys}
                break
    return modules, loaded


def low_rank_delta(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    """B·A in fp32 in the base weight's ``shape``: (out, in), or a conv's (out, in, kh, kw) from the
    flattened (out, r)·(r, in·kh·kw) product (ComfyUI's and A1111's LoCon rebuild)."""
    return (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)).view(shape)


def _channel_norm(W: torch.Tensor, dim: int) -> torch.Tensor:
    """‖W‖ per index of ``dim`` (0: rows / output channels, 1: columns / input channels), keepdim."""
    return torch.linalg.vector_norm(W, dim=tuple(d for d in range(W.ndim) if d != dim), keepdim=True)


def comfy_weight(W0: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
                 dora_scale: torch.Tensor | None) -> torch.Tensor:
    """``LoRAAdapter.calculate_weight`` + ``weight_decompose`` at strength 1, fp32 (Linear or conv)."""
    W = W0.float()
    s = alpha / down.shape[0] if alpha is not None else 1.0
    V = W + s * low_rank_delta(up, down, W.shape)
    if dora_scale is None:
        return V
    ds = dora_scale.float()
    if ds.shape[0] == V.shape[0]:                       # wd_on_output_axis: norm of W0, not V
        norm = _channel_norm(W, 0)
    else:
        norm = _channel_norm(V, 1)
    return V * (ds / (norm + torch.finfo(torch.float32).eps))


def a1111_weight(W0: torch.Tensor, up, down, alpha: float | None, dora_scale: torch.Tensor | None) -> torch.Tensor:
    """``NetworkModule.finalize_updown`` + ``apply_weight_decompose`` at multiplier 1, fp32."""
    W = W0.float()
    s = alpha / down.shape[0] if alpha is not None else 1.0
    V = W + s * low_rank_delta(up, down, W.shape)
    if dora_scale is None:
        return V
    col = _channel_norm(V, 1)                           # (1, in) or (1, in, 1, 1), always per input
    return V * (dora_scale.float() / col)


# ---- A1111 name matching (networks.py convert_diffusers_name_to_compvis) ----------------------
def a1111_module(name: str, family: str, sgm_index: dict[str, str], te_layers: dict[str, int],
                 have: set[str]) -> str | None:
    """The neutral key A1111 applies a kohya module name to, or None if it does not match.

    ``sgm_index``: neutral UNet key → its original-layout name, underscored.
    """
    by_flat = {flat: key for key, flat in sgm_index.items()}
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name)
    if m:
        return by_flat.get(f"time_embed_{int(m[1]) * 2 - 2}{m[2]}")
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:   # A1111 hard-codes 3 = layers_per_block + 1 (true for SD 1.x, 2.x and SDXL)
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), _a1111_suffix(m[2], m[4])
        return by_flat.get(f"input_blocks_{1 + b * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}")
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        return by_flat.get(f"middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_a1111_suffix(m[1], m[3])}")
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        return by_flat.get(f"output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                           f"{_a1111_suffix(m[2], m[4])}")
    if name.startswith("lora_unet_"):   # "SDXL loras seem to already have correct compvis keys"
        return by_flat.get(name[len("lora_unet_"):])
    te1 = "lora_te1" if family == "sdxl" else "lora_te"
    for prefix, component in ((te1, "text_encoder"), ("lora_te2", "text_encoder_2")):
        m = re.match(prefix + r"_text_model_encoder_layers_(\d+)_(.+)", name)
        if not m or (component == "text_encoder_2" and family != "sdxl"):
            continue
        layer, rest = int(m[1]), m[2]
        if layer >= te_layers.get(component, 0):
            return None
        openclip = family == "sd2" or component == "text_encoder_2"
        if openclip and rest.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            return _a1111_mha(component, layer, rest, have)
        return _te_key(component, layer, rest)
    return None


_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _a1111_suffix(kind: str, rest: str) -> str:
    """networks.py ``suffix_conversion``: resnet parts renamed to their ldm names."""
    return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def _te_key(component: str, layer: int, rest: str) -> str | None:
    for c, flat in _LORA_CLIP_MAP.items():
        if rest == flat:
            return f"{component}.text_model.encoder.layers.{layer}.{c}"
    return None


def _a1111_mha(component: str, layer: int, rest: str, have: set[str]) -> str | None:
    """OpenCLIP attention: applied only if q, k, v and out_proj of that layer all have adapters."""
    base = f"{component}.text_model.encoder.layers.{layer}.self_attn"
    if all(f"{base}.{p}" in have for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return _te_key(component, layer, rest)
    return None


def _base_fails(consumer: str, view: FileView, problem: str) -> Verdict:
    return Verdict(consumer, "fails to load", 0, len(view.adapter.modules), problem,
                   "use this base with dorabooth (`dorabooth generate --adapter …`) or diffusers "
                   "(the diffusers-lora file, or --format merged-diffusers)", base_problem=True)


# ---- the report -------------------------------------------------------------------------------
@dataclass
class FileView:
    """What a consumer sees: the file's keys, its module names and the neutral adapter."""

    adapter: Adapter
    kind: str                                   # "kohya" | "diffusers" | "peft"
    keys: list[str]
    names: dict[str, str]                       # neutral key → module name in the file (kohya kinds)
    dora_shapes: dict[str, tuple[int, ...]]     # neutral key → stored magnitude shape


def _errors(view: FileView, apply: dict[str, Callable[[torch.Tensor], torch.Tensor]],
            base: Callable[[str], torch.Tensor]) -> tuple[float, float, str | None]:
    worst, worst_up, worst_key = 0.0, 0.0, None
    for key, mod in view.adapter.modules.items():
        W0 = base(key).float()
        W = adapted_weight(W0, mod, 1.0)
        Wc = apply[key](W0) if key in apply else W0
        err = float(torch.linalg.norm(Wc - W) / torch.linalg.norm(W).clamp_min(NORM_EPS))
        upd = float(torch.linalg.norm(Wc - W) / torch.linalg.norm(W - W0).clamp_min(NORM_EPS))
        if err > worst:
            worst, worst_key = err, key
        worst_up = max(worst_up, upd)
    return worst, worst_up, worst_key


def _verdict(consumer: str, view: FileView, apply: dict, base, why_exact: str, why_approx: str,
             instead: str, structural_exact: bool) -> Verdict:
    total = len(view.adapter.modules)
    applied = sum(1 for k in view.adapter.modules if k in apply)
    if applied == 0:
        return Verdict(consumer, "not applied", 0, total, why_approx, instead)
    err = err_up = worst = None
    if base is not None:
        err, err_up, worst = _errors(view, apply, base)
        exact = err <= EXACT_TOL and applied == total
    else:
        exact = structural_exact and applied == total
    status = "exact" if exact else "approximate"
    why = why_exact if exact else why_approx
    if applied < total:
        why += f"; {total - applied} of {total} modules are not matched by {consumer}'s key names and not applied"
    v = Verdict(consumer, status, applied, total, why, "" if exact else instead, err, err_up, worst)
    if base is None:
        v.notes.append(UNMEASURED)
    return v


def consumer_report(view: FileView, family: str, unet_config, te_layers: dict[str, int],
                    base: Callable[[str], torch.Tensor] | None = None,
                    transformers_major: int | None = None, unmeasured: str = UNMEASURED) -> list[Verdict]:
    """One :class:`Verdict` per consumer for this file. ``base(key)`` → W0 of a neutral module key;
    without it, verdicts that would be measured note ``unmeasured`` (why not, and what to do)."""
    import transformers

    tf_major = transformers_major or int(transformers.__version__.split(".")[0])
    ad = view.adapter
    merged_hint = "export a merged checkpoint (--format merged-single-file or merged-diffusers): exact everywhere"
    verdicts = [
        _diffusers(view, base, tf_major, merged_hint),
        _comfy(view, family, unet_config, te_layers, base, merged_hint),
        _a1111(view, family, unet_config, te_layers, base, merged_hint),
        _lycoris(view, family, base, tf_major, merged_hint),
    ] if ad.modules else []
    for v in verdicts:
        v.notes = [unmeasured if n == UNMEASURED else n for n in v.notes]
    return verdicts


def _ours(mod: ModuleAdapter):
    return lambda W0: adapted_weight(W0, mod, 1.0)


def _lora_only(mod: ModuleAdapter, scale: float | None = None):
    s = mod.scale if scale is None else scale
    return lambda W0: W0.float() + s * low_rank_delta(mod.up, mod.down, W0.shape)


def _diffusers(view: FileView, base, tf_major: int, merged_hint: str) -> Verdict:
    ad = view.adapter
    if view.kind == "kohya":
        if not all(n.startswith(("lora_unet_", "lora_te")) for n in view.names.values()):
            return Verdict("diffusers", "not applied", 0, len(ad.modules),
                           "load_lora_weights reads kohya names (lora_unet_…, lora_te…); this file uses others",
                           "convert with `dorabooth convert FILE --to diffusers-lora`")
        apply = {k: _lora_only(m) for k, m in ad.modules.items()}
        if ad.method == "lora":
            return _verdict("diffusers", view, apply, base, "plain LoRA, applied as trained", "", "", True)
        return _verdict("diffusers", view, apply, base, "",
                        "load_lora_weights drops every dora_scale (diffusers PR #9547) and applies the file "
                        "as plain LoRA: the magnitude part of the DoRA is lost",
                        "use the diffusers-lora file (`dorabooth convert FILE --to diffusers-lora`, axis "
                        "'out' only) or " + merged_hint, False)
    if ad.axis in ("in", "mixed"):
        return Verdict("diffusers", "fails to load", 0, len(ad.modules),
                       "PEFT's lora_magnitude_vector holds one value per output row; this file's (1, in) "
                       "magnitudes make load_lora_weights fail on the shape",
                       "use the kohya file in ComfyUI/A1111, dorabooth's own loader, or " + merged_hint)
    apply = {}
    te_dropped = []
    for k, m in ad.modules.items():
        comp = split_module_key(k)[0]
        if comp != "unet" and m.is_dora and tf_major >= 5:
            m0 = m

            def dropped(W0, m0=m0):   # magnitude left at PEFT's init ‖W0‖_row
                V = W0.float() + m0.scale * (m0.up @ m0.down)
                return V * (torch.linalg.vector_norm(W0.float(), dim=1) / torch.linalg.vector_norm(V, dim=1))[:, None]
            apply[k] = dropped
            te_dropped.append(k)
        else:
            apply[k] = _ours(m)
    why_approx = (f"with transformers {tf_major}.x, load_lora_weights drops the text-encoder DoRA magnitudes "
                  f"({len(te_dropped)} modules stay at PEFT's initial ‖W0‖); exact on diffusers 0.39 + "
                  f"transformers 4.57")
    return _verdict("diffusers", view, apply, base, "UNet and text encoders applied as trained", why_approx,
                    "load with dorabooth (dorabooth.load_adapter / generate), or " + merged_hint, not te_dropped)


def _comfy(view: FileView, family, unet_config, te_layers, base, merged_hint) -> Verdict:
    ad = view.adapter
    problem = comfy_base_problem(family, unet_config)
    if problem:
        return _base_fails("ComfyUI", view, problem)
    key_map = comfy_key_map(family, unet_config, te_layers)
    mods, loaded = comfy_loaded_keys(view.keys, key_map)
    by_key = {v: x for x, v in mods.items()}
    apply = {}
    for k, m in ad.modules.items():
        x = by_key.get(k)
        if x is None:
            continue
        if view.kind == "kohya":
            ds = None
            if m.is_dora:
                ds = m.magnitude.reshape(view.dora_shapes.get(k) or ((-1, 1) if m.axis == "out" else (1, -1)))
            apply[k] = (lambda W0, m=m, ds=ds: comfy_weight(W0, m.up, m.down, m.alpha, ds))
        else:   # diffusers layout: no alpha key (scale 1), lora_magnitude_vector never read
            apply[k] = (lambda W0, m=m: comfy_weight(W0, m.up, m.down, None, None))
    unused = sorted(set(view.keys) - loaded)
    if view.kind != "kohya":
        why = ("ComfyUI maps diffusers-layout UNet keys only in the old '….processor.to_q' form and never reads "
               "lora_magnitude_vector; text-encoder LoRA parts apply with scale 1 (no alpha key)")
        v = _verdict("ComfyUI", view, apply, base, "", why,
                     "use the kohya file (`dorabooth convert FILE --to kohya`) or " + merged_hint, False)
    else:
        axis = ad.axis
        why_exact = "keys all mapped; " + ("dora_scale (1, in): ComfyUI's per-input branch is exact DoRA"
                                           if axis == "in" else "applied as trained")
        why = ("dora_scale (out, 1): ComfyUI's per-output branch divides by ‖W0‖_row instead of ‖W0 + ΔW‖_row "
               "(ComfyUI PR #15458, open)" if axis in ("out", "mixed") else "some modules are not mapped")
        instead = merged_hint + ", or train with --magnitude-axis in (exact in ComfyUI and A1111)"
        v = _verdict("ComfyUI", view, apply, base, why_exact, why, instead, axis in ("in", None))
    if unused:
        v.notes.append(f"{len(unused)} keys not loaded by ComfyUI, e.g. {unused[:2]}")
    return v


def _a1111(view: FileView, family, unet_config, te_layers, base, merged_hint) -> Verdict:
    ad = view.adapter
    problem = a1111_base_problem(family, unet_config)
    if problem:
        return _base_fails("A1111", view, problem)
    layout = UNetLayout.from_config(unet_config)
    if view.kind != "kohya":
        return Verdict("A1111", "not applied", 0, len(ad.modules),
                       "A1111 matches kohya names only; unet./text_encoder. keys fail to match",
                       "use the kohya file (`dorabooth convert FILE --to kohya`) or " + merged_hint)
    sgm_index = {}
    for k in ad.modules:
        if k.startswith("unet."):
            try:
                sgm_index[k] = flatten(unet_to_original(split_module_key(k)[1], layout))
            except KeyError:
                pass
    have = set(ad.modules)
    apply = {}
    for k, m in ad.modules.items():
        name = view.names.get(k, "")
        target = a1111_module(name, family, sgm_index, te_layers, have)
        if target != k:
            continue
        ds = m.magnitude.reshape(view.dora_shapes.get(k)) if m.is_dora else None
        apply[k] = (lambda W0, m=m, ds=ds: a1111_weight(W0, m.up, m.down, m.alpha, ds))
    axis = ad.axis
    why = ("A1111 always normalises per input column; a (out, 1) dora_scale broadcasts into a wrong (out, in) "
           "scale" if axis in ("out", "mixed") else "some module names do not match A1111's conversion")
    instead = merged_hint + (", or train with --magnitude-axis in" if axis in ("out", "mixed") else "")
    return _verdict("A1111", view, apply, base, "keys all mapped; " +
                    ("dora_scale (1, in): A1111's formula is exact DoRA" if axis == "in" else "applied as trained"),
                    why, instead, axis in ("in", None))


def _lycoris(view: FileView, family, base, tf_major: int, merged_hint: str) -> Verdict:
    ad = view.adapter
    total = len(ad.modules)
    if view.kind != "kohya":
        return Verdict("LyCORIS", "not applied", 0, total,
                       "create_network_from_weights reads lora_down/lora_up keys only",
                       "use the kohya file, or " + merged_hint)
    if ad.axis in ("in", "mixed"):
        return Verdict("LyCORIS", "fails to load", 0, total,
                       "create_network_from_weights builds modules with wd_on_out=True and fails copying a "
                       "(1, in) dora_scale",
                       "build the network with wd_on_output=False and load_state_dict, or " + merged_hint)
    apply = {}
    skipped = []
    for k, m in ad.modules.items():
        component, path = split_module_key(k)
        name = view.names.get(k, "")
        if component == "unet":
            ok = name == f"lora_unet_{flatten(path)}"
        else:
            prefix = {"text_encoder": ("lora_te", "lora_te1"), "text_encoder_2": ("lora_te2",)}[component]
            # transformers 5 flattened CLIPTextModel (no text_model level); WithProjection keeps it
            flattened = tf_major >= 5 and component == "text_encoder"
            mod_path = path.removeprefix("text_model.") if flattened else path
            ok = any(name == f"{p}_{flatten(mod_path)}" for p in prefix)
        if ok:
            apply[k] = _ours(m)
        else:
            skipped.append(k)
    why_skip = ("names must be lora_unet_<diffusers module> and lora_te{N}_<module of the loaded text encoder>: "
                f"{len(skipped)} modules are not found (SDXL sgm names; text_model_ level absent from "
                f"CLIPTextModel in transformers 5)")
    v = _verdict("LyCORIS", view, apply, base, "applied as trained at multiplier 1 (LyCORIS scales only the "
                 "magnitude factor at other multipliers)", why_skip,
                 "LyCORIS-native names need `lora_unet_down_blocks_…`; or " + merged_hint, not skipped)
    if ad.method != "lora":
        v.notes.append("strength semantics differ: LyCORIS applies ΔW in full and scales only m/‖V‖ − 1")
    return v
