"""Helpers for the export/convert/consumer tests: adapted tiny pipelines and an SDXL variant
whose two text encoders differ in width (diffusers' ``from_single_file`` tells SDXL's
encoders apart by width only, so the stock tiny SDXL, 32/32, cannot round-trip through it)."""

from __future__ import annotations

import torch

import dorabooth
from dorabooth.merging import pipeline_weight
from tiny_models import MAKERS, _scheduler, randomize_adapter_params, tiny_text_encoder, tiny_tokenizer, tiny_vae


def make_sdxl_wide(seed: int = 0):
    """Tiny SDXL with text_encoder hidden 32 and text_encoder_2 hidden 48."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=80, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=8).eval()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_text_encoder(with_projection=True, hidden=48, seed=seed + 1),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=_scheduler())


def make_sd2(seed: int = 0):
    """Tiny SD 2.x: the SD 1.5 layout with an OpenCLIP-style (gelu) text encoder."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import tiny_sd15_unet

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=523, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                      bos_token_id=521, eos_token_id=522, pad_token_id=522)).eval()
    return StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=te, tokenizer=tiny_tokenizer(),
                                   unet=tiny_sd15_unet(seed), scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


BUILDERS = {**MAKERS, "sdxl_wide": make_sdxl_wide, "sd2": make_sd2}
FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "sdxl_wide": "sdxl", "sd2": "sd2"}


def adapted(kind: str, axis: str = "out", *, seed: int = 1, std: float = 0.05, method: str = "dora",
            rank: int = 4, alpha: float = 8.0, text_encoders: bool = True):
    """A tiny pipeline with random non-trivial adapters (ΔW a few % of W0, magnitudes ±10 %)."""
    pipe = BUILDERS[kind]()
    dorabooth.attach(pipe, method=method, rank=rank, alpha=alpha, text_encoders=text_encoders, magnitude_axis=axis)
    for i, c in enumerate(("unet", "text_encoder", "text_encoder_2")):
        if getattr(pipe, c, None) is not None:
            randomize_adapter_params(getattr(pipe, c), seed=seed + i, std=std)
    return pipe


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F."""
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def base_weights(pipe, keys):
    return {k: pipeline_weight(pipe, k) for k in keys}
