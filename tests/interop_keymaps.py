"""How ComfyUI and A1111 name the modules of a model when they load a kohya LoRA/DoRA file:
reimplemented here, independently of ``dorabooth.formats.consumers``, to check our files and
the consumer report against.

Reimplemented from the sources, not copied (ComfyUI is GPL-3.0, A1111 AGPL-3.0; this project
vendors neither). Each function names the code it follows:

* ComfyUI, Comfy-Org/ComfyUI a125cd8 (2025-10-12): ``comfy/model_detection.py``
  ``detect_unet_config`` (what it reads off a checkpoint's UNet keys), ``comfy/utils.py``
  ``unet_to_diffusers``, ``comfy/lora.py`` ``model_lora_keys_unet``, ``model_lora_keys_clip``,
  ``load_lora`` with ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load`` (which file keys
  it takes), ``comfy/sd.py`` ``load_lora_for_models``. ComfyUI's UNet parameters are the
  checkpoint's ``model.diffusion_model.*`` keys without ``model.``; its text encoders are
  HF-layout CLIP models of fixed depth (``clip_l`` 12 layers, ``clip_h`` 24, ``clip_g`` 32).
* A1111 1.10, ``extensions-builtin/Lora/networks.py``: ``assign_network_names_to_compvis_modules``
  (module names of the ldm/sgm model, whose parameters are the checkpoint's keys),
  ``convert_diffusers_name_to_compvis`` and the fallbacks in ``load_network``, and
  ``network_apply_weights`` (a ``MultiheadAttention`` — OpenCLIP's attention — is changed only
  when q, k, v and out_proj all have a module).

``tests/compat/comfyui_keys.py`` runs the real ComfyUI functions on the same files when a
ComfyUI checkout is at hand (``DORABOOTH_COMFYUI``).
"""

from __future__ import annotations

import re

import torch

from dorabooth import inject
from dorabooth.formats.neutral import Adapter, ModuleAdapter
from dorabooth.formats.single_file import Mapper
from dorabooth.testing import fullsize

DIFFUSION = "model.diffusion_model."


# ---- full-size models on the meta device, and adapters over them ---------------------------------
def meta_components(name: str, unet_overrides: dict | None = None) -> dict[str, torch.nn.Module]:
    """A fixture's components with meta parameters (key names and shapes, no memory); the UNet's
    published config changed by ``unet_overrides`` for non-standard variants."""
    comps = {c: fullsize.empty_component(name, c) for c in fullsize.weight_components(name) if c != "unet"}
    config = {k: v for k, v in {**fullsize.CONFIGS[name]["unet"], **(unet_overrides or {})}.items()
              if not k.startswith("_")}
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=False):
        comps["unet"] = UNet2DConditionModel.from_config(config)
    return comps


def original_shapes(family: str, comps: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key → shape of the single file our exporter writes for these components."""
    mapper = Mapper(family, comps["unet"].config, comps["vae"].config)
    states = {c: m.state_dict() for c, m in comps.items()}
    return {k: tuple(v.shape) for k, v in mapper.to_original(states).items()}


def adapter_over(comps: dict[str, torch.nn.Module], family: str, axis: str | None, *, unet_targets="all-linear",
                 te_layers: tuple[int, ...] | None = None, rank: int = 1, seed: int = 0) -> Adapter:
    """A DoRA (axis "out"/"in") or LoRA (None) on ``unet_targets`` of the UNet and q/k/v/out of
    the text encoders' layers (all, or ``te_layers``; -1 is the last), with random small tensors
    of the modules' real shapes."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for component, model in comps.items():
        if component == "vae":
            continue
        targets = unet_targets if component == "unet" else inject.TEXT_ENCODER_TARGETS
        names = inject.resolve_targets(model, targets)
        if component != "unet" and te_layers is not None:
            n = model.config.num_hidden_layers
            keep = {f"layers.{i % n}." for i in te_layers}
            names = [x for x in names if any(k in x for k in keep)]
        for name in names:
            layer = model.get_submodule(name)
            down = torch.randn(rank, layer.in_features, generator=g) * 0.01
            up = torch.randn(layer.out_features, rank, generator=g) * 0.01
            magnitude = None if axis is None else \
                torch.rand(layer.out_features if axis == "out" else layer.in_features, generator=g) + 0.5
            modules[f"{component}.{inject.canonical_name(model, component, name)}"] = \
                ModuleAdapter(down, up, 1.0, magnitude, axis)
    return Adapter(modules=modules, family=family, format="test")


def file_modules(keys, tensors) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) of the kohya file's ``lora_up``/``lora_down`` pairs."""
    return {k[: -len(".lora_up.weight")]: (tensors[k].shape[0], tensors[k[: -len("lora_up.weight")] + "lora_down.weight"].shape[1])
            for k in keys if k.endswith(".lora_up.weight")}


# ---- ComfyUI -----------------------------------------------------------------------------------
def _count_blocks(keys, prefix: str) -> int:
    count = 0
    while any(k.startswith(prefix.format(count)) for k in keys):
        count += 1
    return count


def _transformer_depth(prefix: str, shapes: dict) -> tuple[int, int, bool] | None:
    tp = prefix + "1.transformer_blocks."
    if not any(k.startswith(tp) for k in shapes):
        return None
    depth = _count_blocks(shapes, tp + "{}")
    return depth, shapes[tp + "0.attn2.to_k.weight"][1], len(shapes[prefix + "1.proj_in.weight"]) == 2


def comfy_detect_unet_config(shapes: dict[str, tuple[int, ...]], prefix: str = DIFFUSION) -> dict:
    """``detect_unet_config`` (its UNet branch) on a checkpoint's key shapes."""
    keys = list(shapes)
    first = shapes[prefix + "input_blocks.0.0.weight"]
    model_channels, in_channels = first[0], first[1]
    adm = shapes.get(prefix + "label_emb.0.0.weight")
    num_res_blocks, channel_mult, depth, depth_out = [], [], [], []
    context_dim, use_linear = None, False
    last_res_blocks = last_channel_mult = 0
    input_block_count = _count_blocks(keys, prefix + "input_blocks.{}.")
    for count in range(input_block_count):
        p = f"{prefix}input_blocks.{count}."
        p_out = f"{prefix}output_blocks.{input_block_count - count - 1}."
        if not any(k.startswith(p) for k in keys):
            break
        if p + "0.op.weight" in shapes:                           # a downsampler: a new level
            num_res_blocks.append(last_res_blocks)
            channel_mult.append(last_channel_mult)
            last_res_blocks = last_channel_mult = 0
            out = _transformer_depth(p_out, shapes)
            depth_out.append(out[0] if out else 0)
        else:
            if p + "0.in_layers.0.weight" in shapes:
                last_res_blocks += 1
                last_channel_mult = shapes[p + "0.out_layers.3.weight"][0] // model_channels
                out = _transformer_depth(p, shapes)
                depth.append(out[0] if out else 0)
                if out and context_dim is None:
                    context_dim, use_linear = out[1], out[2]
            if p_out + "0.in_layers.0.weight" in shapes:
                out = _transformer_depth(p_out, shapes)
                depth_out.append(out[0] if out else 0)
    num_res_blocks.append(last_res_blocks)
    channel_mult.append(last_channel_mult)
    if prefix + "middle_block.1.proj_in.weight" in shapes:
        middle = _count_blocks(keys, prefix + "middle_block.1.transformer_blocks.{}")
    elif prefix + "middle_block.0.in_layers.0.weight" in shapes:
        middle = -1
    else:
        middle = -2
    return {"in_channels": in_channels, "model_channels": model_channels, "num_res_blocks": num_res_blocks,
            "channel_mult": channel_mult, "transformer_depth": depth, "transformer_depth_output": depth_out,
            "transformer_depth_middle": middle, "context_dim": context_dim, "use_linear_in_transformer": use_linear,
            "adm_in_channels": adm[1] if adm else None}


_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_ATTENTION = ("proj_in", "proj_out", "norm")
_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
          "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_BASIC = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
          "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def comfy_unet_to_diffusers(cfg: dict) -> dict[str, str]:
    """``comfy.utils.unet_to_diffusers``: diffusers ``….weight`` key → sgm key (weights only)."""
    out = {}
    num_res = cfg["num_res_blocks"]
    depth, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    for x in range(len(cfg["channel_mult"])):
        n = 1 + (num_res[x] + 1) * x
        for i in range(num_res[x]):
            for sgm, d in _RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}.weight"] = f"input_blocks.{n}.0.{sgm}.weight"
            t_n = depth.pop(0)
            if t_n > 0:
                for b in _ATTENTION:
                    out[f"down_blocks.{x}.attentions.{i}.{b}.weight"] = f"input_blocks.{n}.1.{b}.weight"
                for t in range(t_n):
                    for b in _BLOCK:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}.weight"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}.weight"
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv.weight"] = f"input_blocks.{n}.0.op.weight"
    for b in _ATTENTION:
        out[f"mid_block.attentions.0.{b}.weight"] = f"middle_block.1.{b}.weight"
    for t in range(cfg["transformer_depth_middle"]):
        for b in _BLOCK:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}.weight"] = f"middle_block.1.transformer_blocks.{t}.{b}.weight"
    for i, n in enumerate([0, 2]):
        for sgm, d in _RESNET.items():
            out[f"mid_block.resnets.{i}.{d}.weight"] = f"middle_block.{n}.{sgm}.weight"
    num_res = list(reversed(num_res))
    for x in range(len(cfg["channel_mult"])):
        n = (num_res[x] + 1) * x
        length = num_res[x] + 1
        for i in range(length):
            c = 1
            for sgm, d in _RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}.weight"] = f"output_blocks.{n}.0.{sgm}.weight"
            t_n = depth_out.pop()
            if t_n > 0:
                c += 1
                for b in _ATTENTION:
                    out[f"up_blocks.{x}.attentions.{i}.{b}.weight"] = f"output_blocks.{n}.1.{b}.weight"
                for t in range(t_n):
                    for b in _BLOCK:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}.weight"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}.weight"
            if i == length - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv.weight"] = f"output_blocks.{n}.{c}.conv.weight"
            n += 1
    for d, sgm in _BASIC.items():
        out[f"{d}.weight"] = f"{sgm}.weight"
    return out


# ComfyUI's text encoders per family (sd1_clip_config.json, sd2_clip_config.json, clip_g.json):
# name, layers, hidden size, MLP size.
COMFY_CLIPS = {"sd1": [("clip_l", 12, 768, 3072)], "sd2": [("clip_h", 24, 1024, 4096)],
               "sdxl": [("clip_l", 12, 768, 3072), ("clip_g", 32, 1280, 5120)]}
_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}


def comfy_clip_shapes(family: str) -> dict[str, tuple[int, int]]:
    """The ``.weight`` keys (and shapes) of ComfyUI's text-encoder state dict that LoRA keys can reach."""
    out = {}
    for name, layers, h, mlp in COMFY_CLIPS[family]:
        for b in range(layers):
            p = f"{name}.transformer.text_model.encoder.layers.{b}."
            out.update({p + f"self_attn.{x}_proj.weight": (h, h) for x in ("q", "k", "v", "out")})
            out.update({p + "mlp.fc1.weight": (mlp, h), p + "mlp.fc2.weight": (h, mlp)})
    return out


def comfy_key_map(shapes: dict[str, tuple[int, ...]], family: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """(``model_lora_keys_unet`` + ``model_lora_keys_clip``: file module name → model weight key,
    the model's weight shapes) for a model ComfyUI built from this checkpoint."""
    model = {"diffusion_model." + k[len(DIFFUSION):]: s for k, s in shapes.items() if k.startswith(DIFFUSION)}
    model.update(comfy_clip_shapes(family))
    key_map = {}
    for k in model:                                            # model_lora_keys_unet
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k
    for d, sgm in comfy_unet_to_diffusers(comfy_detect_unet_config(shapes)).items():
        flat = d[: -len(".weight")].replace(".", "_")
        key_map["lora_unet_" + flat] = "diffusion_model." + sgm
        key_map["lycoris_" + flat] = "diffusion_model." + sgm
    clip_l = False                                             # model_lora_keys_clip
    for b in range(32):
        for c, flat in _LORA_CLIP_MAP.items():
            for name in ("clip_h", "clip_l", "clip_g"):
                k = f"{name}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if k not in model:
                    continue
                if name in ("clip_h", "clip_l"):
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{flat}"] = k
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{flat}"] = k
                    clip_l = clip_l or name == "clip_l"
                elif clip_l:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{flat}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{flat}"] = k
    return key_map, model


def comfy_load_lora(file_keys, key_map: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """``load_lora`` on a kohya file: (file module name → patched model key, the file keys it reads;
    every other key is logged "lora key not loaded")."""
    keys = set(file_keys)
    patched, loaded = {}, set()
    for x, target in key_map.items():
        if f"{x}.lora_up.weight" in keys:
            patched[x] = target
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"} | \
                {k for k in (f"{x}.alpha", f"{x}.dora_scale", f"{x}.lora_mid.weight") if k in keys}
    return patched, loaded


# ---- A1111 -------------------------------------------------------------------------------------
def a1111_layer_mapping(family: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """``network_layer_mapping``: network layer name → (module kind, weight shape) of the modules
    with weights of the model A1111 builds for this checkpoint (the ldm/sgm model, whose
    parameters are the checkpoint's keys). OpenCLIP attention is one ``MultiheadAttention``
    (``…attn``, weight ``in_proj_weight``) with a Linear ``…attn.out_proj``."""
    out = {}
    for key, shape in shapes.items():
        layer = a1111_layer_name(family, key)
        if layer is not None:
            out[layer] = ("mha" if key.endswith(".in_proj_weight") else "module", shape)
    return out


def a1111_layer_name(family: str, key: str) -> str | None:
    """The network layer name of the module owning checkpoint weight ``key`` (None: not a weight
    of the UNet or text encoders)."""
    if key.startswith(DIFFUSION):
        name = "diffusion_model." + key[len(DIFFUSION):]                # sd_model.model.named_modules()
    elif family != "sdxl" and key.startswith("cond_stage_model."):
        name = key[len("cond_stage_model."):]                            # cond_stage_model.wrapped
    elif family == "sdxl" and key.startswith("conditioner.embedders."):
        i, rest = key[len("conditioner.embedders."):].split(".", 1)      # f"{i}_{name}" per embedder
        name = f"{i}.{rest}"
    else:
        return None
    module, _, param = name.rpartition(".")
    return module.replace(".", "_") if param in ("weight", "in_proj_weight") else None


_SUFFIX = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                                         "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                                         "conv_shortcut": "skip_connection"}}


def a1111_convert(key: str, is_sd2: bool) -> str:
    """``convert_diffusers_name_to_compvis`` (layers_per_block 2 written into every index)."""
    def match(pattern):
        r = re.match(pattern, key)
        return None if r is None else [int(x) if re.match(r"\d+", x) else x for x in r.groups()]

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_load(names, mapping: dict[str, tuple]) -> dict[str, tuple[str, str]]:
    """``load_network``'s matching: file module name → (network key, the layer it found)."""
    is_sd2 = any(k.startswith("model_transformer_resblocks") for k in mapping)
    out = {}
    for name in names:
        key = a1111_convert(name, is_sd2)
        layer = key if key in mapping else None
        if layer is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            layer = m.group(1) if m.group(1) in mapping else None
        if layer is None and "lora_unet" in name:
            key = name.replace("lora_unet", "diffusion_model")
            layer = key if key in mapping else None
        elif layer is None and "lora_te1_text_model" in name:
            key = name.replace("lora_te1_text_model", "0_transformer_text_model")
            layer = key if key in mapping else None
            if layer is None:
                key = name.replace("lora_te1_text_model", "transformer_text_model")
                layer = key if key in mapping else None
        if layer is not None:
            out[name] = (key, layer)
    return out


def a1111_applied(matched: dict[str, tuple[str, str]], mapping: dict[str, tuple]) -> dict[str, tuple[int, ...]]:
    """``network_apply_weights``: the file modules that change a weight, with the shape of the
    weight (or in_proj part) they change. A layer applies the network module of its own name;
    a MultiheadAttention applies ``<name>_q_proj``/``_k_proj``/``_v_proj``/``_out_proj`` only if
    all four exist (its out_proj Linear is never called on its own)."""
    by_key = {key: name for name, (key, _) in matched.items()}
    out = {}
    for layer, (kind, shape) in mapping.items():
        inside_mha = layer.endswith("_out_proj") and mapping.get(layer[: -len("_out_proj")], ("",))[0] == "mha"
        if kind == "module" and layer in by_key and not inside_mha:
            out[by_key[layer]] = shape
        if kind == "mha":
            parts = [f"{layer}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            if all(p in by_key for p in parts):
                d = shape[1]
                for p in parts:
                    out[by_key[p]] = (d, d) if not p.endswith("out_proj") else mapping[p][1]
    return out
