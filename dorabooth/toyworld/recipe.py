"""The recipe that trains the toy SDXL from scratch on CPU: `build(out_dir, minutes, seed)`.

Stages, each skipped when its output already exists in `out_dir` (so a killed build
resumes where it stopped):
  1. data      render the world            -> data.safetensors, captions.json
  2. vae       train the AutoencoderKL     -> vae/
  3. latents   encode every image once     -> latents.safetensors
  3b. decoder  sharpen the VAE decoder on the frozen latents -> vae_polished/
  4. joint     text encoders + UNet        -> joint/ckpt.safetensors + joint/state.json
               (v-prediction, min-SNR 5, AdamW, cosine over a wall-clock budget, EMA)
  5. pipeline  EMA weights as a StableDiffusionXLPipeline -> pipeline/

`steps=N` runs N optimisation steps per stage on a tiny data set (for tests).
"""
from __future__ import annotations

import json
import math
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..formats.files import atomic_file, write_json
from . import models, world
from .tokenizer import MAX_LENGTH, load_tokenizer, write_tokenizer

TIME_IDS = (world.RESOLUTION, world.RESOLUTION, 0, 0, world.RESOLUTION, world.RESOLUTION)


@dataclass(frozen=True)
class Recipe:
    n_images: int = 50_000
    two_colour_share: float = 0.5
    vae_minutes: float = 7.0
    decoder_minutes: float = 0.0  # optional stage 3b; the shipped model was built without it
    vae_batch: int = 32
    vae_lr: float = 1e-3
    batch: int = 32
    lr: float = 6e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    min_snr_gamma: float = 5.0
    uncond_share: float = 0.1  # zero text embeddings, as SDXL's force_zeros negative
    ema_decay: float = 0.999
    unet_channels: tuple = (32, 64, 128)
    checkpoint_minutes: float = 5.0
    eval_minutes: float = 12.0
    eval_captions: int = 40

    def __post_init__(self):
        if not 0 <= self.two_colour_share <= 1:
            raise ValueError("two_colour_share must lie in [0, 1]")
        if self.batch < 1 or self.n_images < self.batch:
            raise ValueError("n_images must be at least the batch size")


def _emit(on_event, **event):
    event.setdefault("time", round(time.time(), 1))
    if on_event is not None:
        on_event(event)


def _log(out: Path, event: dict):
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")


# ---------------------------------------------------------------- stage 1: data
def make_data(out: Path, recipe: Recipe, seed: int, n: int):
    if not (out / "captions.json").exists():
        images, captions, _ = world.dataset(n, seed, two_colour_share=recipe.two_colour_share)
        save_file({"images": torch.from_numpy(images)}, str(out / "data.safetensors"))
        (out / "captions.json").write_text(json.dumps(captions))
    images = load_file(str(out / "data.safetensors"))["images"]
    return images, json.loads((out / "captions.json").read_text())


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- stage 2: vae
def train_vae(out: Path, images, recipe: Recipe, seed: int, steps, on_event):
    if (out / "vae" / "config.json").exists():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True)
    torch.manual_seed(seed)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), recipe.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    budget = recipe.vae_minutes * 60
    start, step = time.time(), 0
    while (step < steps) if steps else (time.time() - start < budget):
        progress = step / steps if steps else (time.time() - start) / budget
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
        x = to_pixels(images[torch.randint(len(images), (recipe.vae_batch,), generator=g)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            _emit(on_event, stage="vae", step=step, mse=round(mse.item(), 5),
                  elapsed=round(time.time() - start, 1))
    # Latents at unit scale, as SD's scaling_factor does for its VAE.
    with torch.no_grad():
        z = vae.encode(to_pixels(images[:512])).latent_dist.sample(generator=g)
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    vae.save_pretrained(out / "vae", safe_serialization=True)
    _emit(on_event, stage="vae", done=True, steps=step, mse=round(mse.item(), 5),
          scaling_factor=vae.config.scaling_factor)
    return vae


# ---------------------------------------------------------------- stage 3: latents
@torch.no_grad()
def encode_latents(out: Path, vae, images):
    path = out / "latents.safetensors"
    if not path.exists():
        means, logvars = [], []
        for i in range(0, len(images), 256):
            dist = vae.encode(to_pixels(images[i:i + 256])).latent_dist
            means.append(dist.mean)
            logvars.append(dist.logvar)
        save_file({"mean": torch.cat(means).contiguous(), "logvar": torch.cat(logvars).contiguous()},
                  str(path))
    t = load_file(str(path))
    return t["mean"], t["logvar"]


# ---------------------------------------------------------------- stage 3b: decoder
def polish_decoder(out: Path, vae, images, latents, recipe: Recipe, seed: int, steps, on_event):
    """Train the VAE decoder alone on the frozen encoder's latents -> vae_polished/.

    The latents (and so the UNet's target distribution) do not change; edges get sharper.
    """
    from diffusers import AutoencoderKL

    if (out / "vae_polished" / "config.json").exists():
        return AutoencoderKL.from_pretrained(out / "vae_polished", use_safetensors=True)
    if not steps and recipe.decoder_minutes <= 0:
        return vae
    vae = deepcopy(vae)
    vae.requires_grad_(False)
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, recipe.vae_lr * 0.5, weight_decay=0.0)
    mean, logvar = latents
    g = torch.Generator().manual_seed(seed + 1)
    budget = recipe.decoder_minutes * 60
    start, step = time.time(), 0
    while (step < steps) if steps else (time.time() - start < budget):
        progress = step / steps if steps else (time.time() - start) / budget
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * 0.25 * (1 + math.cos(math.pi * min(progress, 1)))
        idx = torch.randint(len(images), (recipe.vae_batch,), generator=g)
        z = mean[idx] + (0.5 * logvar[idx]).exp() * torch.randn(mean[idx].shape, generator=g)
        x = to_pixels(images[idx])
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            _emit(on_event, stage="decoder", step=step, mse=round(mse.item(), 5),
                  elapsed=round(time.time() - start, 1))
    vae.requires_grad_(False)
    vae.save_pretrained(out / "vae_polished", safe_serialization=True)
    _emit(on_event, stage="decoder", done=True, steps=step, mse=round(mse.item(), 5))
    return vae


# ---------------------------------------------------------------- stage 4: joint
def encode_prompts(te1, te2, input_ids):
    """SDXL's conditioning: penultimate hidden states of both encoders, concatenated,
    and text encoder 2's projected pooled output. (B, 77, 128), (B, 64)."""
    h1 = te1(input_ids, output_hidden_states=True).hidden_states[-2]
    o2 = te2(input_ids, output_hidden_states=True)
    return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds


def min_snr_weight(alphas_cumprod_t, gamma):
    """Min-SNR-gamma loss weight for v-prediction (Hang et al. 2023, eq. for v)."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / (snr + 1)


def diffusion_inputs(latents, alphas_cumprod, g):
    """Noisy latents, timesteps, v-prediction target and per-sample SNR weights' input."""
    t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=g)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=g)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * latents
    return noisy, t, v, alphas_cumprod[t]


def lr_at(recipe: Recipe, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup_steps)
    return recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _opt_state_tensors(opt):
    sd = opt.state_dict()
    return {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}


def _load_opt_state(opt, tensors):
    sd = opt.state_dict()
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(jdir: Path, modules: dict, opt, state: dict):
    tensors = {f"{name}.{k}": v.detach().contiguous()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    tensors.update(_opt_state_tensors(opt))
    with atomic_file(jdir / "ckpt.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(jdir / "state.json", state)


def load_checkpoint(jdir: Path, modules: dict, opt):
    tensors = load_file(str(jdir / "ckpt.safetensors"))
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    _load_opt_state(opt, tensors)
    return json.loads((jdir / "state.json").read_text())


def train_joint(out: Path, latents, captions, tokenizer, vae, recipe: Recipe, seed: int,
                steps, budget_s, on_event, override_budget_s=None):
    jdir = out / "joint"
    jdir.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    te1, te2 = models.make_text_encoders(len(tokenizer), tokenizer.bos_token_id,
                                         tokenizer.eos_token_id)
    unet = models.make_unet(recipe.unet_channels)
    ema = {k: deepcopy(m).requires_grad_(False) for k, m in
           (("unet", unet), ("te1", te1), ("te2", te2))}
    live = {"unet": unet, "te1": te1, "te2": te2}
    params = [p for m in live.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, recipe.lr, weight_decay=recipe.weight_decay)
    state = {"step": 0, "elapsed_s": 0.0, "budget_s": budget_s, "seed": seed,
             "recipe": asdict(recipe)}
    if (jdir / "state.json").exists():
        state = load_checkpoint(jdir, {**live, **{f"ema_{k}": m for k, m in ema.items()}}, opt)
        if override_budget_s is not None:
            state["budget_s"] = override_budget_s  # e.g. to extend a resumed build
        _emit(on_event, stage="joint", resumed=True, step=state["step"],
              elapsed=state["elapsed_s"])
    mean, logvar = latents
    std = (0.5 * logvar).exp()
    scale = vae.config.scaling_factor
    input_ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH,
                          truncation=True, return_tensors="pt").input_ids
    alphas_cumprod = models.make_scheduler().alphas_cumprod
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(recipe.batch, 1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + state["step"])
    last_ckpt = last_eval = time.time()
    t0, elapsed0 = time.time(), state["elapsed_s"]
    for m in live.values():
        m.train()
    while True:
        step, elapsed = state["step"], elapsed0 + time.time() - t0
        progress = step / steps if steps else elapsed / state["budget_s"]
        if progress >= 1:
            break
        lr = lr_at(recipe, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(mean), (recipe.batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        ctx, pooled = encode_prompts(te1, te2, input_ids[idx])
        keep = (torch.rand(recipe.batch, generator=g) >= recipe.uncond_share).float()
        ctx, pooled = ctx * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        noisy, t, v, a_t = diffusion_inputs(z, alphas_cumprod, g)
        pred = unet(noisy, t, ctx, added_cond_kwargs={"text_embeds": pooled,
                                                      "time_ids": time_ids}).sample
        per_sample = F.mse_loss(pred, v, reduction="none").mean(dim=(1, 2, 3))
        loss = (min_snr_weight(a_t, recipe.min_snr_gamma) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in live.items():
                for pe, p in zip(ema[k].parameters(), m.parameters()):
                    pe.lerp_(p, 1 - decay)
        state["step"] = step + 1
        state["elapsed_s"] = elapsed0 + time.time() - t0
        if state["step"] % 50 == 0:
            event = dict(stage="joint", step=state["step"], loss=round(loss.item(), 5),
                         lr=round(lr, 7), elapsed=round(state["elapsed_s"], 1),
                         progress=round(progress, 4))
            _emit(on_event, **event)
            _log(out, event)
        now = time.time()
        if not steps and now - last_ckpt > recipe.checkpoint_minutes * 60:
            save_checkpoint(jdir, {**live, **{f"ema_{k}": m for k, m in ema.items()}}, opt, state)
            last_ckpt = now
        if not steps and now - last_eval > recipe.eval_minutes * 60:
            _eval_during_training(out, ema, vae, tokenizer, recipe, seed, state, on_event)
            last_eval = time.time()
            t0, elapsed0 = time.time(), state["elapsed_s"]  # evaluation time is not training
    save_checkpoint(jdir, {**live, **{f"ema_{k}": m for k, m in ema.items()}}, opt, state)
    _emit(on_event, stage="joint", done=True, step=state["step"], elapsed=state["elapsed_s"])
    return ema, state


def _eval_during_training(out, ema, vae, tokenizer, recipe, seed, state, on_event):
    try:  # imported (and reloaded) late so the reader can evolve while a long build runs
        import importlib

        from . import reader, scoring

        importlib.reload(reader)
        evaluate = importlib.reload(scoring).evaluate
        pipe = assemble(vae, ema, tokenizer)
        scores = evaluate(pipe, n=recipe.eval_captions, seed=seed + 7)
        event = dict(stage="eval", step=state["step"], elapsed=round(state["elapsed_s"], 1),
                     **scores)
    except Exception as exc:  # an evaluation bug must not kill hours of training
        event = dict(stage="eval", step=state["step"], error=repr(exc))
    _emit(on_event, **event)
    _log(out, event)


# ---------------------------------------------------------------- stage 5: pipeline
@torch.no_grad()
def rescale_unseen_tokens(text_encoders, tokenizer, captions, seed: int = 0):
    """Give token rows that no training caption used the median norm of the used rows.

    Untrained rows keep their tiny random init (std 0.02), so "a sks square" embeds
    almost exactly like "a square" and DreamBooth cannot tell instance from class
    prompts apart (measured: the subject leaked into half the class samples). Real CLIP's
    rare tokens carry ordinary-sized embeddings; this gives ours the same. The base's
    behaviour on training-style captions is unchanged.
    """
    used = set()
    for ids in tokenizer(captions).input_ids:
        used.update(ids)
    unseen = torch.tensor(sorted(set(range(len(tokenizer))) - used
                                 - {tokenizer.bos_token_id, tokenizer.eos_token_id}))
    g = torch.Generator().manual_seed(seed)
    for te in text_encoders:
        table = te.get_input_embeddings().weight
        norm = table[sorted(used)].norm(dim=1).median()
        rows = torch.randn((len(unseen), table.shape[1]), generator=g)
        table[unseen] = rows / rows.norm(dim=1, keepdim=True) * norm
    return len(unseen)


def assemble(vae, ema: dict, tokenizer):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=ema["te1"], text_encoder_2=ema["te2"], tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=ema["unet"], scheduler=models.make_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_pipeline(pipe, folder: Path):
    import shutil

    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt, as CLIP ships them
        shutil.rmtree(folder / sub)
        write_tokenizer(folder / sub)


def build(out_dir, minutes: float = 120.0, seed: int = 0, on_event=None, steps: int | None = None,
          recipe: Recipe | None = None, joint_minutes: float | None = None):
    """Train the toy SDXL into `out_dir/pipeline` (resumable; see module docstring).

    `minutes` is the wall-clock budget of the whole build (the joint stage gets what the
    earlier stages leave); `joint_minutes` overrides the joint stage's budget, e.g. to
    extend a resumed build. `steps` runs that many steps per stage on a tiny world.
    """
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = recipe or Recipe()
    if steps:
        recipe = Recipe(**{**asdict(recipe), "n_images": max(64, recipe.batch), "batch": 8,
                           "vae_batch": 8})
    (out / "recipe.json").write_text(json.dumps({**asdict(recipe), "seed": seed}, indent=1))
    images, captions = make_data(out, recipe, seed, recipe.n_images)
    _emit(on_event, stage="data", images=len(images))
    vae = train_vae(out, images, recipe, seed, steps, on_event)
    vae.requires_grad_(False).eval()
    latents = encode_latents(out, vae, images)
    _emit(on_event, stage="latents", shape=list(latents[0].shape))
    decoder_vae = polish_decoder(out, vae, images, latents, recipe, seed, steps, on_event)
    tokenizer = load_tokenizer(write_tokenizer(out / "tokenizer"))
    override = None if joint_minutes is None else joint_minutes * 60
    budget_s = override or max(60.0, minutes * 60 - (time.time() - start) - 60)
    ema, state = train_joint(out, latents, captions, tokenizer, vae, recipe, seed, steps,
                             None if steps else budget_s, on_event, override)
    rescale_unseen_tokens((ema["te1"], ema["te2"]), tokenizer, captions, seed)
    pipe = assemble(decoder_vae, ema, tokenizer)
    save_pipeline(pipe, out / "pipeline")
    _emit(on_event, stage="pipeline", done=True, path=str(out / "pipeline"),
          steps=state["step"], wall_s=round(time.time() - start, 1))
    return out / "pipeline"


def pipeline_from_checkpoint(out_dir, rescale_unseen: bool = True):
    """The EMA weights of a (possibly unfinished) build's last checkpoint as a pipeline."""
    from diffusers import AutoencoderKL

    out = Path(out_dir)
    polished = out / "vae_polished"
    vae = AutoencoderKL.from_pretrained(polished if polished.exists() else out / "vae", use_safetensors=True)
    tokenizer = load_tokenizer(out / "tokenizer")
    channels = tuple(json.loads((out / "joint" / "state.json").read_text())["recipe"]["unet_channels"])
    te1, te2 = models.make_text_encoders(len(tokenizer), tokenizer.bos_token_id,
                                         tokenizer.eos_token_id)
    ema = {"unet": models.make_unet(channels), "te1": te1, "te2": te2}
    tensors = load_file(str(out / "joint" / "ckpt.safetensors"))
    for name, m in ema.items():
        prefix = f"ema_{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        m.eval()
    if rescale_unseen:
        captions = json.loads((out / "captions.json").read_text())
        rescale_unseen_tokens((te1, te2), tokenizer, captions, seed=0)
    return assemble(vae, ema, tokenizer)
