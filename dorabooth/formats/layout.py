"""Names of the same module in the layouts files use: diffusers, original (ldm/sgm), kohya.

* diffusers UNet names (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q``) ↔
  original names (``input_blocks.4.1.transformer_blocks.0.attn2.to_q``), the layout of
  single-file checkpoints (``model.diffusion_model.…``) and of SDXL kohya keys. The mapping is
  the inverse of diffusers' ``convert_ldm_unet_checkpoint`` and needs the UNet's
  ``layers_per_block`` and which up blocks have attentions (for the upsampler index).
* kohya keys flatten a module path with ``_`` (``lora_unet_down_blocks_0_…_to_out_0``);
  :func:`unflatten` restores the dots with a vocabulary of the multi-word names used by
  SD/SDXL UNets and CLIP text encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

# Multi-word path components of SD/SDXL UNets (diffusers and original layouts) and CLIP.
_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "middle_block", "output_blocks",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "time_emb_proj",
    "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
    "add_embedding", "class_embedding", "time_embed", "label_emb", "emb_layers", "in_layers",
    "out_layers", "skip_connection", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection", "token_embedding",
    "position_embedding", "in_proj", "c_fc", "c_proj",
)
_WORD_PARTS = sorted((tuple(w.split("_")) for w in _WORDS), key=len, reverse=True)


def unflatten(flat: str) -> str:
    """``"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"`` → dotted path."""
    parts = flat.split("_")
    out, i = [], 0
    while i < len(parts):
        for word in _WORD_PARTS:
            if tuple(parts[i:i + len(word)]) == word:
                out.append("_".join(word))
                i += len(word)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def flatten(path: str) -> str:
    return path.replace(".", "_")


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers ↔ original UNet mapping depends on."""

    layers_per_block: int = 2
    down_attention: tuple[bool, ...] = (False, True, True)      # SDXL
    up_attention: tuple[bool, ...] = (True, True, False)

    @classmethod
    def from_config(cls, config) -> "UNetLayout":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        lpb = get("layers_per_block")
        if not isinstance(lpb, int):
            raise ValueError(f"layers_per_block {lpb!r}: only UNets with one layers_per_block for all blocks "
                             f"(SD 1.x, 2.x, SDXL) have an original single-file layout")
        return cls(lpb, tuple("CrossAttn" in t for t in get("down_block_types")),
                   tuple("CrossAttn" in t for t in get("up_block_types")))

    @classmethod
    def default(cls, family: str | None) -> "UNetLayout":
        if family in ("sd1", "sd2"):
            return cls(2, (True, True, True, False), (False, True, True, True))
        return cls()

    @classmethod
    def from_original_keys(cls, keys, prefix: str = "model.diffusion_model.") -> "UNetLayout":
        """The layout read off an original-layout checkpoint's UNet keys (no tensors needed):
        resnets per level between the ``…0.op`` downsamplers, attention where ``….1.`` exists."""
        unet = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        blocks = sorted({int(k.split(".")[1]) for k in unet if k.startswith("input_blocks.")})
        levels: list[list[int]] = [[]]
        for n in blocks[1:]:                                   # input_blocks.0 is conv_in
            if any(k.startswith(f"input_blocks.{n}.0.op.") for k in unet):
                levels.append([])
            else:
                levels[-1].append(n)
        if not blocks or any(len(level) != len(levels[0]) for level in levels) or not levels[0]:
            raise ValueError("the checkpoint's UNet keys do not show one layers_per_block for every level")
        def has(block: str, n: int) -> bool:
            return any(k.startswith(f"{block}.{n}.1.transformer_blocks.") for k in unet)

        L = len(levels[0])
        up = tuple(has("output_blocks", b * (L + 1)) for b in range(len(levels)))
        return cls(L, tuple(has("input_blocks", level[0]) for level in levels), up)

    def to_json(self) -> dict:
        return {"layers_per_block": self.layers_per_block, "down_attention": list(self.down_attention),
                "up_attention": list(self.up_attention)}

    @classmethod
    def from_json(cls, d: dict) -> "UNetLayout":
        return cls(int(d["layers_per_block"]), tuple(bool(x) for x in d["down_attention"]),
                   tuple(bool(x) for x in d["up_attention"]))


_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}


def _resnet_rest(rest: list[str]) -> str:
    if not rest:
        return ""
    head = rest[0]
    if head in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"):
        return "." + ".".join([_RESNET[head], *rest[1:]])
    raise KeyError(head)


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def unet_to_original(name: str, layout: UNetLayout) -> str:
    """diffusers UNet module or parameter name → the original (ldm/sgm) name.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`` →
    ``input_blocks.4.1.transformer_blocks.0.attn2.to_q`` (SDXL, 2 layers per block).
    """
    L = layout.layers_per_block
    for top, orig in _UNET_TOP.items():
        if name == top or name.startswith(top + "."):
            return orig + name[len(top):]
    p = name.split(".")
    try:
        if p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":               # down_blocks.b.downsamplers.0.conv.*
                return _join(f"input_blocks.{(b + 1) * (L + 1)}.0.op", *p[5:])
            j = int(p[3])
            n = 1 + b * (L + 1) + j
            if kind == "resnets":
                return f"input_blocks.{n}.0" + _resnet_rest(p[4:])
            if kind == "attentions":
                return _join(f"input_blocks.{n}.1", *p[4:])
        elif p[0] == "mid_block":
            kind, k = p[1], int(p[2])
            if kind == "resnets":
                return f"middle_block.{2 * k}" + _resnet_rest(p[3:])
            if kind == "attentions" and k == 0:
                return _join("middle_block.1", *p[3:])
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":                 # up_blocks.b.upsamplers.0.conv.*
                slot = 2 if layout.up_attention[b] else 1
                return _join(f"output_blocks.{b * (L + 1) + L}.{slot}", *p[4:])
            j = int(p[3])
            n = b * (L + 1) + j
            if kind == "resnets":
                return f"output_blocks.{n}.0" + _resnet_rest(p[4:])
            if kind == "attentions":
                return _join(f"output_blocks.{n}.1", *p[4:])
    except (IndexError, ValueError, KeyError):
        pass
    raise KeyError(f"UNet name {name!r} has no original-layout equivalent")


def original_to_unet(name: str, layout: UNetLayout, *, sdxl: bool = True) -> str:
    """Inverse of :func:`unet_to_original` (``label_emb`` → ``add_embedding`` for SDXL,
    ``class_embedding`` otherwise)."""
    L = layout.layers_per_block
    back = {v: k for k, v in _UNET_TOP.items()
            if not k.startswith("class_embedding" if sdxl else "add_embedding")}
    for orig, top in back.items():
        if name == orig or name.startswith(orig + "."):
            return top + name[len(orig):]
    p = name.split(".")

    def resnet(prefix: str, rest: list[str]) -> str:
        for i in (2, 1):
            head = ".".join(rest[:i])
            if head in _RESNET_BACK:
                return _join(prefix, _RESNET_BACK[head], *rest[i:])
        raise KeyError(".".join(rest))

    try:
        if p[0] == "input_blocks":
            n, slot = int(p[1]), p[2]
            b, j = (n - 1) // (L + 1), (n - 1) % (L + 1)
            if j == L:                               # input_blocks.n.0.op.*
                return _join(f"down_blocks.{b}.downsamplers.0.conv", *p[4:])
            if slot == "0":
                return resnet(f"down_blocks.{b}.resnets.{j}", p[3:])
            if slot == "1":
                return _join(f"down_blocks.{b}.attentions.{j}", *p[3:])
        elif p[0] == "middle_block":
            k = int(p[1])
            if k in (0, 2):
                return resnet(f"mid_block.resnets.{k // 2}", p[2:])
            if k == 1:
                return _join("mid_block.attentions.0", *p[2:])
        elif p[0] == "output_blocks":
            n, slot = int(p[1]), p[2]
            b, j = n // (L + 1), n % (L + 1)
            if slot == "0":
                return resnet(f"up_blocks.{b}.resnets.{j}", p[3:])
            if (slot == "1" and p[3] == "conv") or slot == "2":
                return _join(f"up_blocks.{b}.upsamplers.0.conv", *p[4:])
            if slot == "1":
                return _join(f"up_blocks.{b}.attentions.{j}", *p[3:])
    except (IndexError, ValueError, KeyError):
        pass
    raise KeyError(f"original UNet name {name!r} has no diffusers equivalent")


def is_original_unet_name(name: str) -> bool:
    return name.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks", "time_embed",
                                      "label_emb", "out")


def text_module(path: str) -> str:
    """A CLIP module path with the ``text_model.`` level that adapter files carry."""
    if path.startswith("text_model.") or path.startswith("text_projection"):
        return path
    return "text_model." + path
