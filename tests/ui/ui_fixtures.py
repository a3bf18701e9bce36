"""Helpers for the app's tests: a tiny SDXL-architecture model on disk and photo-like images."""

from pathlib import Path

import numpy as np
from PIL import Image
from tiny_models import make_sdxl_pipeline


def save_tiny_model(folder: Path) -> Path:
    """The tiny SDXL test pipeline (tests/tiny_models.py) as a diffusers folder, 32 px native.

    The UNet is fully convolutional, so a larger ``sample_size`` only changes the native
    resolution (16 → 32 px) the trainer and generator pick; the weights are the same.
    """
    pipe = make_sdxl_pipeline()
    pipe.unet.register_to_config(sample_size=16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_photos(folder: Path, n: int = 3, size: int = 64, seed: int = 0) -> list[Path]:
    """Distinct photo-like images: a coloured disc on a gradient, one per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        rng = np.random.default_rng(seed * 100 + i)
        base = np.stack([xx * rng.uniform(50, 255), yy * rng.uniform(50, 255),
                         np.full_like(xx, rng.uniform(0, 255))], -1)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        base[disc] = rng.uniform(0, 255, 3)
        path = folder / f"photo {i}.png"
        Image.fromarray(base.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def save_comfy_loadable_model(folder: Path) -> Path:
    """A small SD 1.x-architecture diffusers folder that ComfyUI's checkpoint loader accepts (its
    SD15 model: 320 base channels, 768-wide cross-attention, no linear projections; any depth),
    so adapter files made on it get real ComfyUI verdicts. A1111 still refuses it (its config
    is fixed). 16 px native (the VAE halves), one resolution level."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import _scheduler, tiny_text_encoder, tiny_tokenizer, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320,),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=tiny_vae(0), text_encoder=tiny_text_encoder(hidden=768), tokenizer=tiny_tokenizer(),
                                   unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
