"""What the training loop draws from: the prepared subject images, the class-image pool,
prompt embeddings (cached unless the text encoders train) and latents (cached VAE
posteriors unless told otherwise), each resolved once before the loop into a small function.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from PIL import Image

from . import families as fam
from . import rundir as rd
from .config import TrainConfig
from .data import Example, class_examples, flipped_crop_left, instance_caption, prepare_images, read_manifest, to_tensor
from .events import stop_requested
from .families import Family
from .models import BaseModel
from .sampling import generate_class_images


def prepare_instance(config: TrainConfig, run: Path, pipe, accelerator, emit) -> list[Example]:
    """The subject images, validated and fitted once into ``run/instance`` (reused on resume)."""
    folder = run / rd.INSTANCE
    if accelerator.is_main_process and not (config.resume and (folder / "manifest.json").is_file()):
        if folder.exists():
            shutil.rmtree(folder)
        prompt = config.resolved_instance_prompt
        prepare_images(config.images, folder, resolution=config.resolution, multiple=fam.size_multiple(pipe),
                       buckets=config.buckets,
                       prompt_for=lambda caption: instance_caption(caption and config.with_identifier(caption),
                                                                   config.identifier, prompt),
                       on_skip=lambda s: emit("skip", path=s.path, reason=s.reason))
    accelerator.wait_for_everyone()
    examples, _ = read_manifest(folder)
    return [Example(str(folder / e.path), e.prompt, e.size, e.original_size, e.crop_top_left, e.source)
            for e in examples]


def prepare_class_images(config, pipe, family, base: BaseModel, instance, accelerator, emit, stop=None):
    """{size: [(Example, image)]}: class images fitted to every subject size (empty without prior,
    or when ``stop`` was set while they were being drawn)."""
    if not config.prior_preservation:
        return {}
    folder = config.class_dir
    if accelerator.is_main_process:
        generate_class_images(pipe, family, config, base, folder, emit, accelerator, stop)
    accelerator.wait_for_everyone()
    if stop_requested(stop):
        return {}
    pool = {}
    for size in sorted({e.size for e in instance}):
        examples, images = class_examples(folder, config.resolved_class_prompt, size,
                                          on_skip=lambda s: emit("skip", path=s.path, reason=s.reason))
        pool[size] = list(zip(examples, images))
    if not pool or not all(pool.values()):
        raise ValueError(f"prior preservation needs class images, but {folder} has no usable ones; "
                         f"remove broken files or lower --num-class-images")
    return pool


def size_groups(examples: list[Example]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.size, []).append(i)
    return groups


def make_text_encoder(pipe, family: Family, config: TrainConfig, instance, class_pool):
    """``encode(prompts, live_encoders) -> (embeds, pooled)``: live when the text encoders train,
    else every prompt of the run encoded once and looked up."""
    if config.train_text_encoders or config.pivotal_tokens:          # pivotal rows train: encoded every step
        def encode_live(prompts, live):
            return fam.encode_prompts(family, pipe, prompts, live)
        return encode_live

    prompts = sorted({e.prompt for e in instance} | {e.prompt for items in class_pool.values() for e, _ in items})
    with torch.no_grad():
        cache = {}
        for p in prompts:
            embeds, pooled = fam.encode_prompts(family, pipe, [p])
            cache[p] = (embeds.float(), None if pooled is None else pooled.float())

    def encode_cached(prompts, _live=None):
        embeds = torch.cat([cache[p][0] for p in prompts])
        pooled = None if cache[prompts[0]][1] is None else torch.cat([cache[p][1] for p in prompts])
        return embeds, pooled
    return encode_cached


def make_latent_source(pipe, config: TrainConfig, instance, class_pool, device):
    """``latents_of(examples, flips, gen) -> (B, 4, h, w)``, scaled for the UNet.

    With ``cache_latents`` the VAE encodes each image (and its mirror when flipping) once and
    keeps the posterior's mean and std; every step samples from it with ``gen``.
    """
    vae = pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = {e.path: (lambda e=e: Image.open(e.path).convert("RGB")) for e in instance}
    for items in class_pool.values():
        for e, im in items:
            images[(e.path, e.size)] = (lambda im=im: im)

    def key(e: Example):
        return (e.path, e.size) if (e.path, e.size) in images else e.path

    @torch.no_grad()
    def posterior(e: Example, flip: bool):
        pixels = to_tensor(images[key(e)](), flip)[None].to(device, torch.float32)     # (1, 3, h, w)
        dist = vae.encode(pixels).latent_dist
        return dist.mean.cpu(), dist.std.cpu()

    cache: dict = {}
    if config.cache_latents:
        for e in [*instance, *(e for items in class_pool.values() for e, _ in items)]:
            for flip in ((False, True) if config.flip else (False,)):
                cache[(key(e), flip)] = posterior(e, flip)

    def latents_of(examples, flips, gen):
        out = []
        for e, flip in zip(examples, flips):
            mean, std = cache[(key(e), flip)] if config.cache_latents else posterior(e, flip)
            out.append(mean + std * torch.randn(mean.shape, generator=gen))
        return (torch.cat(out) - shift) * scale
    return latents_of


def make_class_sampler(class_pool, batch_size: int):
    """``draw(size, gen) -> [Example]``: ``batch_size`` class images of ``size`` (none without prior)."""
    if not class_pool:
        return lambda size, gen: []

    def draw(size, gen):
        items = class_pool[size]
        idx = torch.randint(0, len(items), (batch_size,), generator=gen).tolist()
        return [items[i][0] for i in idx]
    return draw


def draw_flips(n: int, enabled: bool, gen) -> list[bool]:
    if not enabled:
        return [False] * n
    return (torch.rand(n, generator=gen) < 0.5).tolist()


def time_ids(e: Example, flipped: bool) -> list[float]:
    top, left = e.crop_top_left
    if flipped:
        left = flipped_crop_left(e)
    return fam.sdxl_time_ids(e.original_size, (top, left), e.size)
