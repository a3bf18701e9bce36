"""The original-layout key mapping on the real, full-size SD1.5 and SDXL architectures.

Built on the ``meta`` device (no memory, no weights) from the published configs in
tests/assets/configs. Every key we write maps back through diffusers' own single-file
converters to the same diffusers key and shape; diffusers detects the model type from our
keys; kohya names we write for SDXL are the ones ComfyUI's own map produces.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dorabooth.formats.consumers import comfy_unet_config, comfy_unet_to_diffusers
from dorabooth.formats.kohya import kohya_name
from dorabooth.formats.layout import UNetLayout, original_to_unet, unet_to_original
from dorabooth.formats.single_file import Mapper

CONFIGS = Path(__file__).parent / "assets" / "configs"
PARAMS = {  # published parameter counts: the configs are the real ones
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


def build(name):
    d = CONFIGS / name
    with torch.device("meta"):
        comps = {
            "unet": UNet2DConditionModel.from_config(json.loads((d / "unet/config.json").read_text())),
            "vae": AutoencoderKL.from_config(json.loads((d / "vae/config.json").read_text())),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder")),
        }
        if (d / "text_encoder_2").is_dir():
            comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2"))
    return comps


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def full(request):
    comps = build(request.param)
    family = "sd1" if request.param == "sd15" else "sdxl"
    mapper = Mapper(family, comps["unet"].config, comps["vae"].config)
    original = mapper.to_original({n: m.state_dict() for n, m in comps.items()})
    return request.param, family, comps, mapper, original


def test_configs_are_the_published_architectures(full):
    name, family, comps, mapper, original = full
    assert {n: sum(p.numel() for p in m.parameters()) for n, m in comps.items()} == PARAMS[name]


def test_every_key_maps_back_through_diffusers_converters(full):
    name, family, comps, mapper, original = full
    assert all(t.is_meta for t in original.values())
    assert sfu.infer_diffusers_model_type(original) == ("v1" if name == "sd15" else "xl_base")
    back = {"unet": sfu.convert_ldm_unet_checkpoint(original, comps["unet"].config),
            "vae": sfu.convert_ldm_vae_checkpoint(original, comps["vae"].config)}
    if family == "sd1":
        back["text_encoder"] = sfu.convert_ldm_clip_checkpoint(original)
    else:
        back["text_encoder"] = sfu.convert_ldm_clip_checkpoint(
            {k: v for k, v in original.items() if k.startswith("conditioner.embedders.0.")})
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(comps["text_encoder_2"], original,
                                                                  prefix="conditioner.embedders.1.model.")
    used = 0
    for n, model in comps.items():
        sd = model.state_dict()
        b = back[n]
        if not hasattr(model, "text_model") and n.startswith("text_encoder"):
            b = {k.removeprefix("text_model."): v for k, v in b.items()}   # transformers 5 CLIPTextModel
        assert set(b) == set(sd), (n, sorted(set(b) ^ set(sd))[:4])
        assert all(tuple(b[k].shape) == tuple(v.shape) for k, v in sd.items()), n
        used += len(b)
    # nothing we write is left unread (q/k/v share one in_proj tensor each)
    assert len(original) <= used


def test_openclip_layout():
    family, comps = "sdxl", build("sdxl")
    mapper = Mapper(family, comps["unet"].config, comps["vae"].config)
    original = mapper.to_original({n: m.state_dict() for n, m in comps.items()})
    p = "conditioner.embedders.1.model."
    assert tuple(original[p + "transformer.resblocks.31.attn.in_proj_weight"].shape) == (3 * 1280, 1280)
    assert tuple(original[p + "transformer.resblocks.0.attn.in_proj_bias"].shape) == (3 * 1280,)
    assert tuple(original[p + "text_projection"].shape) == (1280, 1280)
    assert p + "positional_embedding" in original and p + "ln_final.weight" in original
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight" in original
    t = mapper.target("text_encoder_2", "text_model.encoder.layers.5.self_attn.k_proj.weight")
    assert (t.key, t.part) == (p + "transformer.resblocks.5.attn.in_proj_weight", 1)
    assert mapper.target("text_encoder_2", "text_projection.weight").transform == "T"


def test_unet_names_round_trip_and_agree_with_comfyui(full):
    name, family, comps, mapper, original = full
    unet = comps["unet"]
    layout = UNetLayout.from_config(unet.config)
    comfy = comfy_unet_to_diffusers(comfy_unet_config(unet.config))
    linear = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) > 100
    for n in linear:
        o = unet_to_original(n, layout)
        assert original_to_unet(o, layout, sdxl=family == "sdxl") == n
        if n in comfy:
            assert comfy[n] == o, n
    if family == "sdxl":
        key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
        assert kohya_name(key, "sdxl", layout) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
        assert kohya_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "sdxl", layout) == \
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
