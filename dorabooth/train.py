"""The DreamBooth loop (Ruiz et al. 2023) for DoRA, LoRA or a full UNet fine-tune.

``train(config, on_event)`` prepares a run folder (DESIGN §6), generates class images,
resolves every choice (family, method, prior preservation, text-encoder training, caching)
into small functions, then runs one loop: draw a batch, compute the loss, step, report,
checkpoint. Checkpoints hold the trainable tensors, the optimizer, the LR schedule and the
random state of every process, so ``resume=True`` continues exactly where a run stopped.
Device placement, mixed precision and multi-process data parallelism come from accelerate.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch

from . import adapters, faults, losses, pivotal, sharding
from . import families as fam
from . import rundir as rd
from .checkpoints import (Resumed, TrainingDiverged, TrainState, check_finite_weights, diverged, restore_checkpoint,
                          save_checkpoint, save_final)
from .config import RESUME_OVERRIDES, TrainConfig
from .data import batch_stream, check_images
from .devices import EmulatedPrecisionWarning, detect_device
from .diskfull import DiskFull
from .ema import make_ema
from .events import EventLog, stop_requested
from .families import Family, detect_family
from .inject import has_trainable, trainable_parameters
from .inputs import (draw_flips, make_class_sampler, make_latent_source, make_text_encoder, prepare_class_images,
                     prepare_instance, size_groups, time_ids)
from .memory import RunPlan, fill_from_run, plan_run
from .models import BaseModel, load_weights, open_pipeline
from .optim import check_optimizer_available, make_lr_schedule, make_optimizer
from .preflight import check_request, check_resume_recipe, check_run_folder
from .quantize import check_quantize_available, quantize_adapted
from .rundir import run_lock
from .sampling import save_samples
from .specs import model_spec
from .version import __version__


@dataclass
class RunResult:
    run_dir: Path
    adapter: Path | None                 # adapter.safetensors, or the unet/ folder for method "full"
    step: int
    stopped: bool = False
    main_process: bool = True            # False in the other processes of a multi-process run
    finished: bool = False               # --resume of a run already finished: nothing was trained


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

    run = Path(config.out)
    plan = preflight(config)                           # all that can be checked: before a weight loads or a
    config = plan.config                               # file is written (and the Accelerator needs the precision)
    if config.resume and not rd.has_progress(run):     # nothing to continue: the run starts over in place
        config = replace(config, resume=False)
    done = already_finished(config, run, on_event)
    if done is not None:
        return done
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=_cpu_processes())
    sharding.enable_on_cpu(accelerator)                # tests only: FSDP2 over gloo (dorabooth.sharding)
    sharding.deepspeed_on_cpu(accelerator)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        with run_lock(run) if accelerator.is_main_process else nullcontext():
            emit = EventLog(run / rd.EVENTS, on_event) if accelerator.is_main_process else EventLog()
            if accelerator.is_main_process:
                remove_leftovers(config, run, emit)
                restart_in_place(config, run, emit)
                report_device(plan, emit)
            try:
                return _train(config, accelerator, run, emit, stop)
            except Exception as e:
                explained = _explained(e, config, run)
                with suppress(OSError):                # a full disk may refuse this line too
                    emit("error", message=f"{type(explained).__name__}: {explained}")
                if explained is e:
                    raise
                raise explained from e
    finally:
        _release(accelerator)


def _explained(e: Exception, config: TrainConfig, run: Path) -> Exception:
    """``e``, or for a full disk and a number that overflowed, an error that says how to carry on."""
    if isinstance(e, DiskFull):
        last = rd.latest_checkpoint(run)
        kept = f"the last complete checkpoint {last.name} is kept" if last else "no checkpoint was complete yet"
        return e.carry_on(f"continue with --resume; {kept}")
    if isinstance(e, OverflowError) or (isinstance(e, RuntimeError) and "without overflow" in str(e)):
        lrs = f"--lr {config.lr:g}" + (f" or --text-encoder-lr {config.text_encoder_lr:g}"
                                       if config.train_text_encoders and config.text_encoder_lr else "")
        return ValueError(f"a number overflowed while training {run} ({e}): {lrs} is far too large; use e.g. 1e-4 "
                          f"(typical 1e-5 … 1e-3)")
    return e


def _train(config: TrainConfig, accelerator, run: Path, emit: EventLog, stop) -> RunResult:
    started = time.monotonic()
    device, weight_dtype = accelerator.device, _weight_dtype(config.mixed_precision)
    pipe, base, weights = open_pipeline(config.model, single_file_config=config.model_config, dtype=weight_dtype)
    family = detect_family(pipe)                       # configs only so far: no weight is read yet
    config = resolve_config(config, pipe, family, run)
    sharding.check_supported(config, accelerator)
    if sharding.fsdp_asked() and not sharding.is_sharded(accelerator):
        emit("warning", message="the launcher asked for FSDP, which accelerate runs on GPUs only: these CPU "
                                "processes train with plain DDP (each holds the whole model)")
    accelerator.wait_for_everyone()                    # every process has checked the folder first
    if accelerator.is_main_process:
        rd.write_config(run, config, {**run_metadata(base, family, pipe, accelerator),
                                      **resume_overrides(config, run, emit)})
    load_weights(pipe, weights, weight_dtype, fp32=fp32_components(config, family))
    pipe.set_progress_bar_config(disable=True)

    # ---- data: prepared once, class images generated once ----------------------------------
    instance = prepare_instance(config, run, pipe, accelerator, emit)
    class_pool = prepare_class_images(config, pipe, family, base, instance, accelerator, emit, stop)
    if stop_requested(stop):                           # stopped while drawing class images: those drawn are kept
        emit("stopped", step=0)
        return RunResult(run, None, 0, stopped=True, main_process=accelerator.is_main_process)
    sizes = sorted({e.size for e in instance})
    emit("prepared", images=len(instance), sizes=[f"{w}x{h}" for h, w in sizes],
         class_images=sum(len(v) for v in class_pool.values()))

    # ---- model: the method decides what trains ---------------------------------------------
    with torch.random.fork_rng(devices=[]):            # the caller's global RNG is left as it was
        torch.manual_seed(config.seed)                 # adapter init (A) is the same on every process
        params = setup_method(pipe, config)            # {name: parameter} that train
    trainable_modules = [m for m in (pipe.unet, *fam.text_encoder_modules(pipe, family)) if has_trainable(m)]
    place(pipe, family, device, weight_dtype)
    quantize_adapted(trainable_modules, config.quantize_base)     # QDoRA: on the device, before the first step
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(pipe, family, config)

    # ---- choices resolved before the loop --------------------------------------------------
    encode = make_text_encoder(pipe, family, config, instance, class_pool)
    latents_of = make_latent_source(pipe, config, instance, class_pool, device)
    add_conds = lambda pooled, examples, flips: fam.added_conditions(        # noqa: E731
        family, pooled, [time_ids(e, f) for e, f in zip(examples, flips)])
    draw_class = make_class_sampler(class_pool, config.batch_size)
    optimizer = make_optimizer(params, config)
    schedule = make_lr_schedule(optimizer, config)
    ema = make_ema(params, config.ema_decay)          # --ema-decay: previews and the result use its weights
    if sharding.is_deepspeed(accelerator):
        sharding.configure_deepspeed(accelerator, config)
    prepared = sharding.prepare(accelerator, *trainable_modules, optimizer, params=params)
    wrapped, optimizer = list(prepared[:-1]), prepared[-1]
    unet = wrapped[0]                                  # the UNet always trains (adapter or full)
    if sharding.is_sharded(accelerator):               # FSDP2 put sharded parameters in their place
        params = sharding.live_params(pipe, list(params))
    live_text_encoders = wrapped[1:] or None

    gen = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
    state = TrainState(params, optimizer, schedule, gen, ema)
    resumed = (restore_checkpoint(run, state, accelerator, emit, config.grad_accum, pipe) if config.resume
               else Resumed(0, 0))
    step = resumed.step
    world = accelerator.num_processes
    per_step = config.grad_accum * world                # micro-batches of the shared stream per optimizer step
    used = lambda: resumed.batches + (step - resumed.step) * per_step                            # noqa: E731
    batches = islice(batch_stream(size_groups(instance), config.batch_size, config.seed, start=resumed.batches),
                     accelerator.process_index, None, world)
    scheduler = pipe.scheduler
    total = config.steps
    emit("start", family=family.name, model=base.id, method=config.method, step=step, total=total,
         processes=world, device=str(device), trainable=sum(p.numel() for p in params.values()),
         sharded=sharding.is_sharded(accelerator))

    def training_loss(idx: list[int]):
        """DreamBooth loss of one micro-batch: subject images ``idx`` + as many class images."""
        examples = [instance[i] for i in idx] + draw_class(instance[idx[0]].size, gen)
        flips = draw_flips(len(examples), config.flip, gen)
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

    last_good = rd.latest_checkpoint(run)
    backward_kwargs = {"scale_wrt_gas": False} if sharding.is_deepspeed(accelerator) else {}   # divided here already
    window: list[float] = []
    for m in wrapped:
        m.train()

    while step < total:
        t0 = time.monotonic()
        step_loss = 0.0
        for micro in range(config.grad_accum):
            last_micro = micro + 1 == config.grad_accum
            with nullcontext() if last_micro else sharding.no_sync(accelerator, unet):   # sync once per step
                loss, parts = training_loss(next(batches))
                check_finite(loss, step + 1, last_good, accelerator)
                accelerator.backward(loss / config.grad_accum, **backward_kwargs)
            step_loss = step_loss + loss.detach().float() / config.grad_accum
        if config.max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ema.update(step)
        faults.reach("step", step)

        window = (window + [time.monotonic() - t0])[-20:]
        it_s = len(window) / sum(window)
        mean_loss = float(accelerator.reduce(step_loss, "mean"))
        emit("step", step=step, total=total, loss=round(mean_loss, 6), lr=schedule.get_last_lr()[0],
             it_s=round(it_s, 3), eta_s=round((total - step) / it_s, 1), **{k: round(v, 6) for k, v in parts.items()})
        stopping = stop_requested(stop)
        if _due(step, config.checkpoint_every, total) or stopping:
            last_good = save_checkpoint(run, step, state, pipe, config, accelerator, emit, used())
        if _due(step, config.sample_every, total) or step == total:
            check_finite_weights(params, step, last_good)
            with ema.applied():
                save_samples(pipe, family, config, run, step, accelerator, emit)
        if stopping and step < total:
            emit("stopped", step=step)
            return RunResult(run, None, step, stopped=True, main_process=accelerator.is_main_process)

    check_finite_weights(params, step, last_good)
    with ema.applied():
        adapter = save_final(pipe, config, run, base, accelerator)
    emit("done", adapter=str(adapter), steps=step, seconds=round(time.monotonic() - started, 1))
    return RunResult(run, adapter, step, main_process=accelerator.is_main_process)


# =============================================================================================
# Setup: config, run folder, data
# =============================================================================================
def preflight(config: TrainConfig) -> RunPlan:
    """Everything ``train(config)`` can check before it loads a weight or writes a file, and the
    plan it would run: the request (``preflight.check_request``: subject folder, run folder),
    the base model's configs with the family defaults, the device settings and memory estimate,
    the optimizer, the subject images at the resolved resolution, --resume's recipe."""
    check_request(config)
    run = Path(config.out)
    plan = plan_device(config, run)
    check_optimizer_available(plan.config.optimizer)
    check_quantize_available(plan.config.quantize_base)
    check_images(plan.config.images, plan.config.resolution)
    check_resume_recipe(plan.config, run)
    return plan


def plan_device(config: TrainConfig, run: Path) -> RunPlan:
    """Family defaults and device settings (precision, checkpointing, optimizer) from the base
    model's configs, before a weight is loaded; on --resume, fields left on "auto" keep the run's
    own values (``memory.fill_from_run``)."""
    if config.resume and rd.is_run(run):
        config = fill_from_run(config, rd.read_config(run)[0])
    return plan_run(config, model_spec(config.model, config.model_config), detect_device())


def already_finished(config: TrainConfig, run: Path, on_event) -> RunResult | None:
    """--resume of a run whose result is there and that has trained ``config.steps`` already:
    nothing to train (a ``finished`` event says so and how to train longer; nothing is written)."""
    step = rd.finished_step(run, config.method) if config.resume else None
    if step is None or config.steps > step:
        return None
    result = rd.final_result(run, config.method)
    EventLog(None, on_event)("finished", step=step, adapter=str(result),
                             message=f"{run} is finished: {result.name} was written at step {step}; to train "
                                     f"longer pass --resume --steps N with N > {step}")
    return RunResult(run, result, step, finished=True)


def remove_leftovers(config: TrainConfig, run: Path, emit: EventLog) -> None:
    """What processes killed while writing left (temporaries, a checkpoint being written or
    deleted) goes before the run starts or resumes (``rundir.remove_stale_temporaries``)."""
    shared = (config.class_dir,) if config.prior_preservation else ()
    removed = rd.remove_stale_temporaries(run, also=shared)
    if removed:
        emit("cleaned", paths=[str(p) for p in removed])


def resume_overrides(config: TrainConfig, run: Path, emit: EventLog) -> dict:
    """On --resume, the changes of the fields a resume may change in what is learned
    (``config.RESUME_OVERRIDES``: learning rates, clipping) as ``{"overrides": [{step, field,
    old, new}, ...]}`` for ``config.json``, after those recorded by earlier resumes; each new
    one is an ``override`` event."""
    if not (config.resume and rd.is_run(run)):
        return {}
    previous, recorded = rd.read_config(run)
    history = list(recorded.get("overrides") or [])
    step = (rd.checkpoint_steps(run) or [0])[-1]
    for name in sorted(RESUME_OVERRIDES):
        old, new = getattr(previous, name), getattr(config, name)
        if old != new:
            history.append({"step": step, "field": name, "old": old, "new": new})
            emit("override", step=step, field=name, old=old, new=new,
                 message=f"resuming from step {step} with {name} {new} (was {old})")
    return {"overrides": history} if history else {}


def restart_in_place(config: TrainConfig, run: Path, emit: EventLog) -> None:
    """A folder whose run stopped or failed before its first checkpoint (``preflight``) starts
    over with ``config``: what that attempt left goes; its class images stay when they were
    drawn for the same class prompt, base model and resolution."""
    if config.resume or not rd.is_run(run):
        return
    try:
        before, _ = rd.read_config(run)
        same = all(getattr(before, k) == getattr(config, k) for k in ("model", "model_config", "resolution")) \
            and before.resolved_class_prompt == config.resolved_class_prompt
    except ValueError:                                 # an unreadable config.json: nothing in it to trust
        same = False
    own_class = config.class_dir.resolve() == (run / rd.CLASS).resolve()
    rd.clear_attempt(run, keep_class=same or not own_class)
    redraw = "" if same or not own_class else "; its class images were for other settings and are drawn again"
    emit("restart", message=f"{run} held a run that stopped before its first checkpoint: starting it again "
                            f"in place{redraw}")


def report_device(plan: RunPlan, emit: EventLog) -> None:
    """The resolved device settings and the memory estimate as a ``device`` event; each warning
    (bf16/fp16 emulated on this CPU) once, as a ``warning`` event and a Python warning."""
    emit("device", **plan.settings.to_dict(), memory_estimate=plan.estimate.to_dict())
    for message in plan.settings.warnings:
        emit("warning", message=message)
        warnings.warn(message, EmulatedPrecisionWarning, stacklevel=3)


def resolve_config(config: TrainConfig, pipe, family: Family, run: Path) -> TrainConfig:
    """Family defaults filled in (already done by ``plan_device``, from the configs); checks
    that need the model; --resume consistency."""
    resolved = config.with_defaults(fam.train_defaults(family, pipe))
    multiple = fam.size_multiple(pipe)
    if resolved.resolution % multiple:
        raise ValueError(f"resolution {resolved.resolution} is not a multiple of {multiple} for this model; "
                         f"use e.g. {max(multiple, resolved.resolution // multiple * multiple)}")
    check_run_folder(resolved, run)
    check_resume_recipe(resolved, run)
    return resolved


def dry_run(config: TrainConfig) -> RunPlan:
    """What ``train(config)`` would use, checked as far as it can be without loading a weight or
    writing a file: the resolved config, device settings and memory estimate (``--dry-run``)."""
    return preflight(config)


def run_metadata(base: BaseModel, family: Family, pipe, accelerator) -> dict:
    return {
        "dorabooth_version": __version__,
        "base_model": base.to_dict(),
        "family": family.name,
        "prediction_type": family.prediction_type,
        "preset": fam.preset_name(family, pipe),
        "processes": accelerator.num_processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# =============================================================================================
# Setup: model
# =============================================================================================
def setup_method(pipe, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Attach adapters (dora/lora/dvora; DVoRA's projections drawn from ``config.seed``) or unfreeze the UNet, and with ``train_text_encoders`` the
    text encoders (full); with ``pivotal_tokens`` the new token rows (:mod:`dorabooth.pivotal`); returns the trainable parameters by pipeline-qualified name
    (``unet.…``, ``text_encoder.…``)."""
    if config.method == "full":
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(name == "unet" or (bool(config.train_text_encoders)
                                                             and name.startswith("text_encoder")))
    else:
        adapters.attach(pipe, method=config.method, rank=config.effective_rank, alpha=config.effective_alpha,
                         unet_targets=config.targets, text_encoders=config.train_text_encoders,
                         magnitude_axis=config.magnitude_axis, rslora=config.rslora, vera_seed=config.seed)
    if config.pivotal_tokens:                          # after attach, which freezes what it does not adapt
        pivotal.attach_trainable(pipe, config.pivotal_tokens, config.pivotal_init, config.class_noun, config.seed)
    return trainable_parameters(pipe)


def fp32_components(config: TrainConfig, family: Family) -> tuple[str, ...]:
    """The components loaded in fp32 whatever the mixed precision: the VAE (SDXL's overflows in
    fp16; 84 M parameters) and what trains whole (``--method full``). The rest loads in the
    run's weight dtype; adapter parameters are made in fp32 when attached."""
    trained = ("unet", *(family.text_encoders if config.train_text_encoders else ())) if config.method == "full" else ()
    return ("vae", *trained)


def place(pipe, family: Family, device, weight_dtype) -> None:
    """Frozen weights in the mixed-precision dtype, trainable ones in fp32, all on ``device``.
    The VAE stays fp32 (SDXL's VAE overflows in fp16). Loaded that way already
    (:func:`fp32_components`), nothing is copied on the CPU."""
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
        for te in fam.text_encoder_modules(pipe, family):
            te.gradient_checkpointing_enable()


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def check_finite(loss: torch.Tensor, step: int, last_good: Path | None, accelerator) -> None:
    """Stop the run on a NaN/inf loss (every process agrees), pointing at the last good checkpoint."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if float(accelerator.reduce(bad, "sum")) == 0:
        return
    raise diverged(f"the loss became {float(loss.detach())}", step, last_good)


def _due(step: int, every: int, total: int) -> bool:
    return bool(every) and step % every == 0 and step < total


def _cpu_processes() -> bool:
    """True when launched as several processes on a machine without CUDA: accelerate then
    needs ``cpu=True`` to join them with gloo (``accelerate launch --multi_gpu`` or torchrun on
    a CPU box would otherwise start independent single-process runs on one folder). Not under
    DeepSpeed, which joins CPU processes itself (its CPU accelerator, gloo) and is off with ``cpu=True``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not sharding.deepspeed_asked()


def _release(accelerator) -> None:
    """Let another ``train`` in this process choose its own mixed precision: accelerate keeps
    process-wide state (a private reset, as accelerate's own tests do); distributed runs keep theirs."""
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()


__all__ = ["train", "dry_run", "TrainConfig", "RunResult", "TrainingDiverged"]
