"""The DreamBooth loop (Ruiz et al. 2023) for DoRA, LoRA or a full UNet fine-tune.

``train(config, on_event)`` prepares a run folder (DESIGN §6), generates class images,
resolves every choice (family, method, prior preservation, text-encoder training, caching)
into small functions, then runs one loop: draw a batch, compute the loss, step, report,
checkpoint. Checkpoints hold the trainable tensors, the optimizer, the LR schedule and the
random state of every process, so ``resume=True`` continues exactly where a run stopped.
Device placement, mixed precision and multi-process data parallelism come from accelerate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from . import adapters, losses
from . import families as fam
from .config import TrainConfig, read_run_config, write_run_config
from .data import (Example, batch_stream, class_examples, flipped_crop_left, instance_caption, list_images,
                   prepare_images, read_manifest, to_tensor)
from .events import EventLog
from .formats.files import atomic_folder
from .families import Family, detect_family
from .models import BaseModel, load_pipeline
from .version import __version__

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter.safetensors"
FULL_UNET = "unet"                       # method "full": a diffusers UNet folder in the run


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class RunResult:
    run_dir: Path
    adapter: Path | None                 # adapter.safetensors, or the unet/ folder for method "full"
    step: int
    stopped: bool = False
    main_process: bool = True            # False in the other processes of a multi-process run


# =============================================================================================
# The loop
# =============================================================================================
def train(config: TrainConfig, on_event: Callable[[dict], None] | None = None, *, stop=None) -> RunResult:
    """Train a DreamBooth adapter as ``config`` says; returns where the result is.

    ``on_event(event: dict)`` receives every progress event (also appended to
    ``events.jsonl``). ``stop`` is anything with ``is_set()`` (a ``threading.Event``): when
    set, the run writes a checkpoint after the current step and returns ``stopped=True``.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=_cpu_processes())
    run = Path(config.out)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        with run_lock(run) if accelerator.is_main_process else nullcontext():
            emit = EventLog(run / "events.jsonl", on_event) if accelerator.is_main_process else EventLog()
            try:
                return _train(config, accelerator, run, emit, stop)
            except Exception as e:
                emit("error", message=f"{type(e).__name__}: {e}")
                raise
    finally:
        _release(accelerator)


LOCK = ".training.lock"


class RunBusy(RuntimeError):
    """Another process (or thread) is training this run folder right now."""


@contextmanager
def run_lock(run: Path):
    """One trainer per run folder: a second ``train`` / ``--resume`` of the same folder fails at
    once instead of interleaving checkpoints with the first. The lock file holds
    ``host:pid``; one left by a process that no longer runs on this machine is taken over."""
    lock = run / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = lock.read_text().strip()
            except OSError:
                owner = ""
            if attempt == 0 and not _lock_owner_alive(owner):
                lock.unlink(missing_ok=True)              # left by a killed run: take it over
                continue
            raise RunBusy(f"{run} is being trained by another process ({owner or 'unknown'}); wait for it to "
                          f"finish or stop it, then --resume. If nothing is training it, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def run_busy(run: str | os.PathLike) -> str | None:
    """``host:pid`` of another live process training ``run`` now (its lock), or None (no lock, a
    dead owner's, or this process's own: its threads know their runs)."""
    try:
        owner = (Path(run) / LOCK).read_text().strip()
    except OSError:
        return None
    mine = owner == f"{socket.gethostname()}:{os.getpid()}"
    return owner if not mine and _lock_owner_alive(owner) else None


def _stop_requested(stop) -> bool:
    """``stop`` (anything with ``is_set()``, or None) asks the run to stop."""
    return stop is not None and stop.is_set()


def _lock_owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True                                   # another machine's, or unreadable: assume it runs
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train(config: TrainConfig, accelerator, run: Path, emit: EventLog, stop) -> RunResult:
    started = time.monotonic()
    check_optimizer_available(config.optimizer)
    pipe, base = load_pipeline(config.model, single_file_config=config.model_config)
    family = detect_family(pipe)
    config = resolve_config(config, pipe, family, run)
    accelerator.wait_for_everyone()                    # every process has checked the folder first
    if accelerator.is_main_process:
        write_run_config(run / "config.json", config, run_metadata(config, base, family, pipe, accelerator))
    pipe.set_progress_bar_config(disable=True)
    device, weight_dtype = accelerator.device, _weight_dtype(config.mixed_precision)

    # ---- data: prepared once, class images generated once ----------------------------------
    instance = prepare_instance(config, run, pipe, accelerator, emit)
    class_pool = prepare_class_images(config, pipe, family, base, instance, accelerator, emit, device, stop)
    if _stop_requested(stop):                           # stopped while drawing class images: those drawn are kept
        emit("stopped", step=0)
        return RunResult(run, None, 0, stopped=True, main_process=accelerator.is_main_process)
    sizes = sorted({e.size for e in instance})
    emit("prepared", images=len(instance), sizes=[f"{w}x{h}" for h, w in sizes],
         class_images=sum(len(v) for v in class_pool.values()))

    # ---- model: the method decides what trains ---------------------------------------------
    with torch.random.fork_rng(devices=[]):            # the caller's global RNG is left as it was
        torch.manual_seed(config.seed)                 # adapter init (A) is the same on every process
        params = setup_method(pipe, config)            # {name: parameter} that train
    trainable_modules = [m for m in (pipe.unet, *text_encoders(pipe, family)) if _has_trainable(m)]
    place(pipe, family, config, device, weight_dtype)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(pipe, family, config)

    # ---- choices resolved before the loop --------------------------------------------------
    encode = make_text_encoder(pipe, family, config, instance, class_pool, device)
    latents_of = make_latent_source(pipe, config, instance, class_pool, device)
    add_conds = lambda pooled, examples, flips: fam.added_conditions(        # noqa: E731
        family, pooled, [_time_ids(e, f) for e, f in zip(examples, flips)])
    draw_class = make_class_sampler(class_pool, config.batch_size)
    optimizer = make_optimizer(pipe, params, config)
    schedule = make_lr_schedule(optimizer, config)
    prepared = accelerator.prepare(*trainable_modules, optimizer)
    wrapped, optimizer = list(prepared[:-1]), prepared[-1]
    unet = wrapped[0]                                  # the UNet always trains (adapter or full)
    live_text_encoders = wrapped[1:] or None

    step = 0
    gen = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
    if config.resume:
        step = restore_checkpoint(run, params, optimizer, schedule, gen, accelerator, emit)
    world = accelerator.num_processes
    per_step = config.grad_accum * world
    batches = islice(batch_stream(_groups(instance), config.batch_size, config.seed, start=step * per_step),
                     accelerator.process_index, None, world)
    scheduler = pipe.scheduler
    total = config.steps
    emit("start", family=family.name, model=base.id, method=config.method, step=step, total=total,
         processes=world, device=str(device), trainable=sum(p.numel() for p in params.values()))

    def training_loss(idx: list[int]):
        """DreamBooth loss of one micro-batch: subject images ``idx`` + as many class images."""
        examples = [instance[i] for i in idx] + draw_class(instance[idx[0]].size, gen)
        flips = _flips(len(examples), config.flip, gen)
        latents = latents_of(examples, flips, gen).to(device)                    # (B, 4, h, w)
        noise = losses.sample_noise(latents.shape, gen, config.noise_offset).to(device)
        timesteps = losses.sample_timesteps(len(examples), scheduler, gen).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = encode([e.prompt for e in examples], live_text_encoders)
        pred = unet(noisy.to(weight_dtype), timesteps, encoder_hidden_states=embeds.to(weight_dtype),
                    added_cond_kwargs=add_conds(pooled, examples, flips)).sample
        target = losses.diffusion_target(scheduler, latents, noise, timesteps)
        weights = losses.min_snr_weight(scheduler, timesteps, config.min_snr_gamma)
        return losses.dreambooth_loss(pred, target, weights, len(idx), config.prior_loss_weight)

    last_good = latest_checkpoint(run)
    window: list[float] = []
    for m in wrapped:
        m.train()

    while step < total:
        t0 = time.monotonic()
        step_loss = 0.0
        for micro in range(config.grad_accum):
            last_micro = micro + 1 == config.grad_accum
            with nullcontext() if last_micro else accelerator.no_sync(unet):   # sync grads once per step
                loss, parts = training_loss(next(batches))
                check_finite(loss, step + 1, last_good, accelerator)
                accelerator.backward(loss / config.grad_accum)
            step_loss = step_loss + loss.detach().float() / config.grad_accum
        if config.max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        window = (window + [time.monotonic() - t0])[-20:]
        it_s = len(window) / sum(window)
        mean_loss = float(accelerator.reduce(step_loss, "mean"))
        emit("step", step=step, total=total, loss=round(mean_loss, 6), lr=schedule.get_last_lr()[0],
             it_s=round(it_s, 3), eta_s=round((total - step) / it_s, 1), **{k: round(v, 6) for k, v in parts.items()})
        stopping = _stop_requested(stop)
        if _due(step, config.checkpoint_every, total) or stopping:
            last_good = save_checkpoint(run, step, pipe, params, optimizer, schedule, gen, config, accelerator, emit)
        if _due(step, config.sample_every, total) or step == total:
            save_samples(pipe, family, config, run, step, accelerator, emit)
        if stopping and step < total:
            emit("stopped", step=step)
            return RunResult(run, None, step, stopped=True, main_process=accelerator.is_main_process)

    adapter = save_final(pipe, config, run, base, accelerator)
    emit("done", adapter=str(adapter), steps=step, seconds=round(time.monotonic() - started, 1))
    return RunResult(run, adapter, step, main_process=accelerator.is_main_process)


# =============================================================================================
# Setup: config, run folder, data
# =============================================================================================
def resolve_config(config: TrainConfig, pipe, family: Family, run: Path) -> TrainConfig:
    """Family defaults filled in; checks that need the model; --resume consistency."""
    resolved = config.with_defaults(fam.train_defaults(family, pipe))
    multiple = fam.size_multiple(pipe)
    if resolved.resolution % multiple:
        raise ValueError(f"resolution {resolved.resolution} is not a multiple of {multiple} for this model; "
                         f"use e.g. {max(multiple, resolved.resolution // multiple * multiple)}")
    existing = run / "config.json"
    if resolved.resume:
        if not existing.is_file():
            raise FileNotFoundError(f"--resume: {run} has no config.json, so there is no run to continue; "
                                    f"start it without --resume")
        previous, _ = read_run_config(run)
        changed = previous.recipe_differences(resolved)
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from the run in {run}; resume with the same "
                             f"settings or start a new run folder")
    elif existing.is_file():
        raise FileExistsError(f"{run} already holds a run (config.json); pass --resume to continue it, "
                              f"or choose another --out")
    return resolved


def run_metadata(config, base: BaseModel, family: Family, pipe, accelerator) -> dict:
    return {
        "dorabooth_version": __version__,
        "base_model": base.to_dict(),
        "family": family.name,
        "prediction_type": family.prediction_type,
        "preset": fam.preset_name(family, pipe),
        "processes": accelerator.num_processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def prepare_instance(config: TrainConfig, run: Path, pipe, accelerator, emit) -> list[Example]:
    """The subject images, validated and fitted once into ``run/instance`` (reused on resume)."""
    folder = run / "instance"
    if accelerator.is_main_process and not (config.resume and (folder / "manifest.json").is_file()):
        if folder.exists():
            shutil.rmtree(folder)
        prompt = config.resolved_instance_prompt
        prepare_images(config.images, folder, resolution=config.resolution, multiple=fam.size_multiple(pipe),
                       buckets=config.buckets,
                       prompt_for=lambda caption: instance_caption(caption, config.token.strip(), prompt),
                       on_skip=lambda s: emit("skip", path=s.path, reason=s.reason))
    accelerator.wait_for_everyone()
    examples, _ = read_manifest(folder)
    return [Example(str(folder / e.path), e.prompt, e.size, e.original_size, e.crop_top_left, e.source)
            for e in examples]


def prepare_class_images(config, pipe, family, base: BaseModel, instance, accelerator, emit, device, stop=None):
    """{size: [(Example, image)]}: class images fitted to every subject size (empty without prior,
    or when ``stop`` was set while they were being drawn)."""
    if not config.prior_preservation:
        return {}
    folder = config.class_dir
    if accelerator.is_main_process:
        generate_class_images(pipe, family, config, base, folder, emit, accelerator, stop)
    accelerator.wait_for_everyone()
    if _stop_requested(stop):
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
        if _stop_requested(stop):
            return
        ks = list(range(start, min(start + batch, want)))
        images = sample_images(pipe, [prompt] * len(ks), [config.seed + k for k in ks], config.class_image_steps,
                               gen_defaults["guidance"], config.resolution, accelerator)
        for k, image in zip(ks, images):
            info = PngInfo()
            info.add_text("dorabooth", json.dumps({"prompt": prompt, "seed": config.seed + k,
                                                   "steps": config.class_image_steps, "base_model": base.hash}))
            path = folder / f"class-{k:05d}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        emit("class_images", done=ks[-1] + 1, total=want)


def _groups(examples: list[Example]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.size, []).append(i)
    return groups


# =============================================================================================
# Setup: model
# =============================================================================================
def text_encoders(pipe, family: Family) -> list:
    return [getattr(pipe, n) for n in family.text_encoders]


def setup_method(pipe, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Attach adapters (dora/lora) or unfreeze the UNet, and with ``train_text_encoders`` the
    text encoders (full); returns the trainable parameters by pipeline-qualified name
    (``unet.…``, ``text_encoder.…``)."""
    if config.method == "full":
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(name == "unet" or (bool(config.train_text_encoders)
                                                             and name.startswith("text_encoder")))
    else:
        adapters.attach(pipe, method=config.method, rank=config.effective_rank, alpha=config.effective_alpha,
                         unet_targets=config.targets, text_encoders=config.train_text_encoders,
                         magnitude_axis=config.magnitude_axis, rslora=config.rslora)
    params = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            params.update({f"{name}.{n}": p for n, p in component.named_parameters() if p.requires_grad})
    return params


def _has_trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def place(pipe, family: Family, config: TrainConfig, device, weight_dtype) -> None:
    """Frozen weights in the mixed-precision dtype, trainable ones in fp32, all on ``device``.
    The VAE stays fp32 (SDXL's VAE overflows in fp16)."""
    for name in ("unet", *family.text_encoders):
        module = getattr(pipe, name)
        for p in module.parameters():
            p.data = p.data.to(device, torch.float32 if p.requires_grad else weight_dtype)
        for b in module.buffers():
            b.data = b.data.to(device)
    pipe.vae.to(device)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)


def enable_gradient_checkpointing(pipe, family: Family, config: TrainConfig) -> None:
    pipe.unet.enable_gradient_checkpointing()
    if config.train_text_encoders:
        for te in text_encoders(pipe, family):
            te.gradient_checkpointing_enable()


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def make_text_encoder(pipe, family: Family, config: TrainConfig, instance, class_pool, device):
    """``encode(prompts, live_encoders) -> (embeds, pooled)``: live when the text encoders train,
    else every prompt of the run encoded once and looked up."""
    if config.train_text_encoders:
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


def _flips(n: int, enabled: bool, gen) -> list[bool]:
    if not enabled:
        return [False] * n
    return (torch.rand(n, generator=gen) < 0.5).tolist()


def _time_ids(e: Example, flipped: bool) -> list[float]:
    top, left = e.crop_top_left
    if flipped:
        left = flipped_crop_left(e)
    return fam.sdxl_time_ids(e.original_size, (top, left), e.size)


# =============================================================================================
# Optimisation
# =============================================================================================
def check_optimizer_available(name: str) -> None:
    if name != "adamw8bit":
        return
    try:
        import bitsandbytes
        bitsandbytes.optim.AdamW8bit  # noqa: B018 - fails on builds without the optimizers
    except Exception as e:
        raise RuntimeError(f"optimizer adamw8bit needs bitsandbytes ({type(e).__name__}: {e}); install it with "
                           f"`pip install bitsandbytes` on a CUDA machine, or use --optimizer adamw") from e
    if not torch.cuda.is_available():
        raise RuntimeError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW); "
                           "use --optimizer adamw on this machine")


def make_optimizer(pipe, params: dict[str, torch.nn.Parameter], config: TrainConfig):
    """AdamW over two groups per learning rate: magnitudes and biases get no weight decay
    (decay would pull DoRA's m towards 0, not towards ‖W0‖)."""
    groups = []
    for component_lr, prefix_ok in ((config.lr, lambda n: n.startswith("unet.")),
                                    (config.text_encoder_lr, lambda n: not n.startswith("unet."))):
        names = [n for n in params if prefix_ok(n)]
        no_decay = [params[n] for n in names if n.endswith("lora_magnitude_vector") or n.endswith(".bias")
                    or params[n].ndim < 2]
        decay = [params[n] for n in names if not (n.endswith("lora_magnitude_vector") or n.endswith(".bias")
                                                   or params[n].ndim < 2)]
        if decay:
            groups.append({"params": decay, "lr": component_lr, "weight_decay": config.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": component_lr, "weight_decay": 0.0})
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(groups, betas=config.adam_betas, eps=config.adam_eps)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps: linear warm-up, then
    constant, cosine to 0, or linear to 0 over the remaining steps."""
    warm = config.warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, config.steps - warm))
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_lr_schedule(optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


def check_finite(loss: torch.Tensor, step: int, last_good: Path | None, accelerator) -> None:
    """Stop the run on a NaN/inf loss (every process agrees), pointing at the last good checkpoint."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if float(accelerator.reduce(bad, "sum")) == 0:
        return
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    raise TrainingDiverged(f"loss became {float(loss.detach())} at step {step}; training stopped and {kept}. "
                           f"Lower --lr, use --mixed-precision bf16 or no, or raise --max-grad-norm limits; "
                           f"--resume continues from the last checkpoint")


def _due(step: int, every: int, total: int) -> bool:
    return bool(every) and step % every == 0 and step < total


# =============================================================================================
# Checkpoints, samples, final adapter
# =============================================================================================
def checkpoint_steps(run: Path) -> list[int]:
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
                  and (p / "state.json").is_file())


def latest_checkpoint(run: Path) -> Path | None:
    steps = checkpoint_steps(run)
    return run / CHECKPOINTS / f"step-{steps[-1]}" if steps else None


def _optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict split into tensors (safetensors) and the rest (JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def save_checkpoint(run: Path, step: int, pipe, params, optimizer, schedule, gen, config, accelerator,
                    emit) -> Path:
    """``checkpoints/step-N/``: trainable tensors, optimizer (safetensors + JSON), LR schedule,
    data position and every process's RNG, plus ``adapter.safetensors`` (usable with generate);
    written under a temporary name and renamed, then older checkpoints beyond
    ``keep_checkpoints`` are removed."""
    root = run / CHECKPOINTS
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_state(gen), str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()},
                  str(tmp / "trainable.safetensors"), metadata={"method": config.method})
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "processes": accelerator.num_processes, "optimizer": opt_meta,
                 "lr_schedule": schedule.state_dict(), "dorabooth_version": __version__}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        if config.method != "full":                     # the same adapter as a user-facing file
            adapters.save_adapter(pipe, tmp / ADAPTER, base_model=config.model)
        if final.exists():                              # re-saving a step (stop right after a checkpoint)
            old = root / f".old-step-{step}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        for s in checkpoint_steps(run)[:-config.keep_checkpoints]:
            shutil.rmtree(root / f"step-{s}", ignore_errors=True)
        emit("checkpoint", step=step, path=str(final))
    accelerator.wait_for_everyone()
    return final


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


def restore_checkpoint(run: Path, params, optimizer, schedule, gen, accelerator, emit) -> int:
    """Load the newest checkpoint into the live objects; returns its step (0 if none)."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        emit("resume", step=0, message=f"no checkpoint in {run / CHECKPOINTS}; starting from step 0")
        return 0
    state = json.loads((ckpt / "state.json").read_text())
    if state["processes"] != accelerator.num_processes:
        raise ValueError(f"{ckpt} was written by {state['processes']} process(es) and this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes")
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    missing = sorted(set(params) - set(tensors))
    if missing or len(tensors) != len(params):
        raise ValueError(f"{ckpt}: trainable tensors do not match this run (missing e.g. {missing[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    _load_optimizer_state(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    schedule.load_state_dict(state["lr_schedule"])
    rng = load_file(str(ckpt / f"rng-{accelerator.process_index}.safetensors"))
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))])
    emit("resume", step=state["step"], path=str(ckpt))
    return state["step"]


@torch.no_grad()
def save_samples(pipe, family, config: TrainConfig, run: Path, step: int, accelerator, emit) -> None:
    """``samples/step-N/NN.png`` for the validation prompts, seeded, with the live adapter."""
    if not accelerator.is_main_process or not config.validation_prompts:
        accelerator.wait_for_everyone()
        return
    defaults = fam.generate_defaults(family, pipe)
    folder = run / "samples" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    modules = [pipe.unet, *text_encoders(pipe, family)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    paths = []
    for i, prompt in enumerate(config.validation_prompts):
        image = sample_images(pipe, [prompt], [config.seed + i], defaults["steps"], defaults["guidance"],
                              config.resolution, accelerator)[0]
        path = folder / f"{i:02d}.png"
        info = PngInfo()
        info.add_text("dorabooth", json.dumps({"prompt": prompt, "step": step, "seed": config.seed + i}))
        image.save(path, pnginfo=info)
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


def save_final(pipe, config: TrainConfig, run: Path, base: BaseModel, accelerator) -> Path:
    """``adapter.safetensors`` (diffusers/PEFT format) for dora/lora; for ``full`` a diffusers
    UNet folder ``unet/`` (``diffusion_pytorch_model.safetensors`` + ``config.json``) and, when
    they trained, the text encoders beside it (``text_encoder/``, ``text_encoder_2/``: the
    pipeline's own folder names). Returns the adapter file or the ``unet/`` folder."""
    accelerator.wait_for_everyone()
    if config.method == "full":
        target = run / FULL_UNET
        if accelerator.is_main_process:
            trained = [n for n, c in pipe.components.items()
                       if isinstance(c, torch.nn.Module) and (n == FULL_UNET or n.startswith("text_encoder"))
                       and _has_trainable(c)]
            for name in trained:                       # check all before writing any
                if not all(torch.isfinite(p).all() for p in getattr(pipe, name).parameters()):
                    raise TrainingDiverged(f"the fine-tuned {name} has NaN/inf weights; not writing it")
            for name in sorted(trained, key=lambda n: n == FULL_UNET):   # unet/ last: it marks the run finished
                with atomic_folder(run / name, overwrite=True) as tmp:
                    getattr(pipe, name).save_pretrained(tmp, safe_serialization=True)
    else:
        target = run / ADAPTER
        if accelerator.is_main_process:
            adapters.save_adapter(pipe, target, base_model=base.id)
    accelerator.wait_for_everyone()
    return target


def _cpu_processes() -> bool:
    """True when launched as several processes on a machine without CUDA: accelerate then
    needs ``cpu=True`` to join them with gloo (``accelerate launch --multi_gpu`` or torchrun on
    a CPU box would otherwise start independent single-process runs on one folder)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _release(accelerator) -> None:
    """Let another ``train`` in this process choose its own mixed precision: accelerate keeps
    process-wide state (a private reset, as accelerate's own tests do); distributed runs keep theirs."""
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()


__all__ = ["train", "TrainConfig", "RunResult", "TrainingDiverged", "latest_checkpoint", "lr_factor"]
