"""Which base models ComfyUI and A1111 can load at all, read off the UNet's config.

Both tools build a model from a config and load a checkpoint into it. ComfyUI reads the UNet's
shape off the checkpoint (``comfy/model_detection.py`` ``detect_unet_config``) and builds it,
but only if one of its supported models matches (``comfy/supported_models.py``,
``BASE.matches``); A1111 picks one fixed config per family and fails on any other shape. A
file made for a base the tool cannot load is of no use in that tool, whatever its keys: the
consumer report says so before it looks at the keys. Reimplemented (not copied: ComfyUI is
GPL-3.0, A1111 AGPL-3.0) from Comfy-Org/ComfyUI a125cd8 (2025-10-12) and A1111 1.10
(``modules/sd_models_config.py`` and the yaml configs it names).
"""

from __future__ import annotations

from .layout import UNetLayout


def comfy_unet_config(config) -> dict:
    """ComfyUI's ``unet_config`` fields ``unet_to_diffusers`` reads, from a diffusers UNet config."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    n, L = len(down), get("layers_per_block")
    tl = get("transformer_layers_per_block", 1) or 1
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    depth = [tl[i] if "CrossAttn" in down[i] else 0 for i in range(n) for _ in range(L)]
    depth_out = [tl[i] if "CrossAttn" in up[n - 1 - i] else 0 for i in range(n) for _ in range(L + 1)]
    return {"num_res_blocks": [L] * n, "channel_mult": [1] * n, "transformer_depth": depth,
            "transformer_depth_output": depth_out, "transformer_depth_middle": tl[-1]}


def unet_signature(config) -> dict | None:
    """The UNet as ComfyUI's ``model_detection.detect_unet_config`` reads it off a checkpoint (the
    fields ComfyUI's model matching and A1111's fixed configs decide on), from a diffusers UNet
    config; None for a config without channel widths (one guessed from an adapter file)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    widths = get("block_out_channels")
    if not widths:
        return None
    c = comfy_unet_config(config)
    return {"in_channels": get("in_channels", 4), "model_channels": widths[0],
            "channel_mult": [w // widths[0] for w in widths], "num_res_blocks": c["num_res_blocks"],
            "transformer_depth": c["transformer_depth"], "transformer_depth_middle": c["transformer_depth_middle"],
            "context_dim": get("cross_attention_dim"), "use_linear_in_transformer": bool(get("use_linear_projection")),
            "adm_in_channels": get("projection_class_embeddings_input_dim")
            if get("addition_embed_type") == "text_time" else None}


# ComfyUI's checkpoint loader builds whatever UNet ``detect_unet_config`` reads, but only if one
# class of comfy/supported_models.py matches it (``BASE.matches``: every field the class names
# must be equal), else "Could not detect model type". The SD/SDXL classes, in ComfyUI's order
# (Comfy-Org/ComfyUI a125cd8); SD15 and SD20 name no depths, so any layers_per_block loads.
_SDXL_LIKE = {"model_channels": 320, "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816}
COMFY_UNETS = (
    ("SD15_instructpix2pix", {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
                              "adm_in_channels": None, "in_channels": 8}),
    ("SD15", {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False, "adm_in_channels": None}),
    ("SD20", {"context_dim": 1024, "model_channels": 320, "use_linear_in_transformer": True, "adm_in_channels": None}),
    ("SDXL_instructpix2pix", {**_SDXL_LIKE, "transformer_depth": [0, 0, 2, 2, 10, 10], "in_channels": 8}),
    ("SDXL", {**_SDXL_LIKE, "transformer_depth": [0, 0, 2, 2, 10, 10]}),
    ("SSD1B", {**_SDXL_LIKE, "transformer_depth": [0, 0, 2, 2, 4, 4]}),
    ("KOALA_700M", {**_SDXL_LIKE, "transformer_depth": [0, 2, 5]}),
    ("KOALA_1B", {**_SDXL_LIKE, "transformer_depth": [0, 2, 6]}),
    ("Segmind_Vega", {**_SDXL_LIKE, "transformer_depth": [0, 0, 1, 1, 2, 2]}),
)
# A1111 1.10 builds each family from one fixed config (sd_models_config.py picks it from the
# checkpoint's keys: v1-inference.yaml, v2-inference(-v).yaml, sd_xl_base.yaml; inpainting and
# instruct-pix2pix variants differ only in in_channels) and loads the file into it with
# load_state_dict(strict=False): any other UNet shape is a size-mismatch error.
_SD_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1, "adm_in_channels": None}
A1111_UNETS = {
    "sd1": ("v1-inference.yaml", {**_SD_UNET, "context_dim": 768, "use_linear_in_transformer": False,
                                  "in_channels": (4, 8, 9)}),
    "sd2": ("v2-inference-v.yaml", {**_SD_UNET, "context_dim": 1024, "use_linear_in_transformer": True,
                                    "in_channels": (4, 9)}),
    "sdxl": ("sd_xl_base.yaml", {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
                                 "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                                 "context_dim": 2048, "use_linear_in_transformer": True, "adm_in_channels": 2816,
                                 "in_channels": (4, 9)}),
}
_A1111_LAYOUT = {"sd1": UNetLayout.default("sd1"), "sd2": UNetLayout.default("sd2"), "sdxl": UNetLayout.default("sdxl")}
_DIFFUSERS_NAME = {"model_channels": "block_out_channels[0]", "channel_mult": "block_out_channels ratios",
                   "num_res_blocks": "layers_per_block", "transformer_depth": "transformer layers per block",
                   "transformer_depth_middle": "mid-block transformer layers", "context_dim": "cross_attention_dim",
                   "use_linear_in_transformer": "use_linear_projection", "adm_in_channels":
                   "projection_class_embeddings_input_dim", "in_channels": "in_channels"}


def _differences(sig: dict, wanted: dict) -> list[str]:
    out = []
    for k, v in wanted.items():
        have = sig.get(k)
        if have in v if isinstance(v, tuple) else have == v:
            continue
        if k == "num_res_blocks" and set(have) == set(v):
            out.append(f"{len(have)} resolution levels (needs {len(v)})")
            continue
        if k == "num_res_blocks":
            have, v = min(have), v[0]
        want = " or ".join(map(str, v)) if isinstance(v, tuple) else v
        out.append(f"{_DIFFUSERS_NAME[k]} {have} (needs {want})")
    return out


def comfy_base_model(unet_config) -> str | None:
    """The ComfyUI model class that loads a checkpoint with this UNet, None if none does."""
    sig = unet_signature(unet_config)
    if sig is None:
        raise ValueError("the UNet's channel widths are unknown")
    return next((name for name, wanted in COMFY_UNETS if not _differences(sig, wanted)), None)


def comfy_base_problem(family: str, unet_config) -> str | None:
    """Why ComfyUI cannot load a base model with this UNet; None if it can (or the config is a
    guess without widths: then nothing can be said)."""
    if unet_signature(unet_config) is None or comfy_base_model(unet_config) is not None:
        return None
    closest = {"sd1": "SD15", "sd2": "SD20"}.get(family, "SDXL")
    wanted = dict(COMFY_UNETS)[closest]
    diffs = _differences(unet_signature(unet_config), wanted)
    variants = " (or SSD-1B, Segmind Vega, KOALA)" if closest == "SDXL" else ""
    return (f"ComfyUI cannot load this base model: its checkpoint loader matches the UNet against its "
            f"supported models and none fits; closest, {closest}{variants}: {'; '.join(diffs)}")


def a1111_base_problem(family: str, unet_config) -> str | None:
    """Why A1111 cannot load a base model with this UNet; None if it can. A config guessed from an
    adapter (no widths) is judged by its layout alone: layers per block and attention placement."""
    yaml, wanted = A1111_UNETS[family]
    sig = unet_signature(unet_config)
    if sig is not None:
        diffs = _differences(sig, wanted)
    else:
        have, need = UNetLayout.from_config(unet_config), _A1111_LAYOUT[family]
        diffs = [f"{name} {a} (needs {b})" for name, a, b in (
            ("layers_per_block", have.layers_per_block, need.layers_per_block),
            ("cross-attention down blocks", list(have.down_attention), list(need.down_attention)),
            ("cross-attention up blocks", list(have.up_attention), list(need.up_attention))) if a != b]
    if not diffs:
        return None
    return (f"A1111 cannot load this base model at all: it builds every {family} model from one fixed config "
            f"({yaml}; layers_per_block 2 hard-coded in its LoRA key conversion too) and this UNet differs: "
            f"{'; '.join(diffs)}")
