"""Images drawn from the pipeline while a run trains: prior-preservation class images from the
base model, and the seeded validation samples of each ``sample_every`` step.

The UNet runs under accelerate's autocast (the run's mixed precision); the VAE decodes in
fp32 (SDXL's VAE overflows in fp16). Every PNG carries its prompt and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import families as fam
from . import rundir as rd
from .config import TrainConfig
from .data import list_images
from .events import stop_requested
from .formats.files import atomic_file
from .models import BaseModel


@torch.no_grad()
def generate_class_images(pipe, family, config: TrainConfig, base: BaseModel, folder: Path, emit,
                          accelerator, stop=None) -> None:
    """Fill ``folder`` up to ``num_class_images`` with base-model images of the class prompt.

    Image k is drawn with seed ``seed + k``, so a folder grows the same way whatever the
    batch size, and images already there (earlier runs, or the user's own) are reused. A set
    ``stop`` ends it after the current batch; the images written so far stay for the next run.
    """
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list_images(folder))
    want = config.num_class_images
    if have >= want:
        return
    prompt = config.resolved_class_prompt
    gen_defaults = fam.generate_defaults(family, pipe)
    pipe.to(accelerator.device)
    emit("class_images", done=have, total=want)
    batch = 4
    for start in range(have, want, batch):
        if stop_requested(stop):
            return
        ks = list(range(start, min(start + batch, want)))
        images = sample_images(pipe, [prompt] * len(ks), [config.seed + k for k in ks], config.class_image_steps,
                               gen_defaults["guidance"], config.resolution, accelerator)
        for k, image in zip(ks, images):
            info = PngInfo()
            info.add_text("dorabooth", json.dumps({"prompt": prompt, "seed": config.seed + k,
                                                   "steps": config.class_image_steps, "base_model": base.hash}))
            with atomic_file(folder / f"class-{k:05d}.png") as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
        emit("class_images", done=ks[-1] + 1, total=want)


@torch.no_grad()
def save_samples(pipe, family, config: TrainConfig, run: Path, step: int, accelerator, emit) -> None:
    """``samples/step-N/NN.png`` for the validation prompts, seeded, with the live adapter. The
    main process draws and writes them; with a sharded UNet (FSDP) every process draws, since each
    forward pass gathers the weights from all of them."""
    from . import sharding

    writes = accelerator.is_main_process
    if not config.validation_prompts or not (writes or sharding.is_sharded(accelerator)):
        accelerator.wait_for_everyone()
        return
    defaults = fam.generate_defaults(family, pipe)
    folder = run / rd.SAMPLES / f"step-{step}"                # made by the first image written
    modules = [pipe.unet, *fam.text_encoder_modules(pipe, family)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    paths = []
    for i, prompt in enumerate(config.validation_prompts):
        image = sample_images(pipe, [prompt], [config.seed + i], defaults["steps"], defaults["guidance"],
                              config.resolution, accelerator)[0]
        if not writes:
            continue
        path = folder / f"{i:02d}.png"
        info = PngInfo()
        info.add_text("dorabooth", json.dumps({"prompt": prompt, "step": step, "seed": config.seed + i}))
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        paths.append(str(path))
    for m, mode in zip(modules, modes):
        m.train(mode)
    emit("sample", step=step, paths=paths)
    accelerator.wait_for_everyone()


@torch.no_grad()
def sample_images(pipe, prompts, seeds, steps: int, guidance: float, size: int, accelerator) -> list[Image.Image]:
    """One image per (prompt, seed): the UNet under accelerate's autocast (mixed precision),
    the VAE decoding in fp32 (SDXL's VAE overflows in fp16)."""
    with accelerator.autocast():
        latents = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=size,
                       width=size, output_type="latent",
                       generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return decode_latents(pipe, latents)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (B, 4, h, w) → PIL images with the fp32 training VAE, as the pipelines decode
    (under mixed precision the UNet's latents come out in fp16/bf16)."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor \
            + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    return pipe.image_processor.postprocess(vae.decode(latents).sample, output_type="pil")
