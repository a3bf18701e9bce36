"""Writing and restoring a run's training state (DESIGN §6), and its final result.

``checkpoints/step-N/`` holds the trainable tensors, the optimizer (tensors as safetensors,
the rest as JSON), the LR schedule, the data position and every process's RNG, with
``--ema-decay`` the EMA of the trainable tensors (``ema.safetensors``), plus the adapter as a
user-facing file (the EMA weights when on); it is written under a temporary name and renamed, so a
killed run resumes from the last complete one. The final result is ``adapter.safetensors``
(dora/lora) or the fine-tuned ``unet/`` and text encoders (full).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import adapters, faults, inject, pivotal, sharding
from . import rundir as rd
from .config import TrainConfig
from .diskfull import DiskFull
from .ema import EMA, NoEMA
from .formats.files import atomic_folder, read_safetensors, write_json, write_safetensors
from .models import BaseModel
from .version import __version__


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the run stopped and kept its last good checkpoint."""


def diverged(what: str, step: int, last_good: Path | None) -> TrainingDiverged:
    """The error of a run whose ``what`` ("the loss became nan") went non-finite at ``step``: it
    names the last good checkpoint and the overrides ``--resume`` accepts."""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    again = ("--resume with a lower --lr (or --max-grad-norm) continues from it" if last_good
             else "run the command again with a lower --lr")
    return TrainingDiverged(f"training diverged: {what} at step {step}; it stopped and {kept}. Lower --lr, clip "
                            f"harder with a lower --max-grad-norm, or use --mixed-precision bf16 or no: {again}")


def check_finite_weights(params: dict[str, torch.nn.Parameter], step: int, last_good: Path | None) -> None:
    """Stop a run whose trainable weights hold NaN/inf before anything is written from them (every
    process stops together when the weights are sharded)."""
    bad = next((name for name, p in params.items() if not bool(torch.isfinite(sharding.local(p).detach()).all())),
               None)
    if sharding.anyone(bad is not None, params):
        raise diverged(f"the weights became NaN/inf ({bad or 'in another process'})", step, last_good)


@dataclass(frozen=True)
class TrainState:
    """The live objects a checkpoint saves and restores."""

    params: dict[str, torch.nn.Parameter]     # trainable, by pipeline-qualified name (unet.…, text_encoder.…)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator                      # this process's data/noise generator
    ema: EMA | NoEMA = field(default_factory=NoEMA)


EMA_FILE = "ema.safetensors"                  # a checkpoint's EMA of the trainable tensors (--ema-decay)


def _optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict split into tensors (safetensors) and the rest (JSON). A state
    entry that is itself a dict (bitsandbytes' ``__bnb_optimizer_quant_state__``: 8-bit moments,
    quantisation maps, absmax) is stored entry by entry as ``name/entry``."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in _flat(state):
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _flat(state: dict):
    for name, value in state.items():
        if isinstance(value, dict):
            yield from ((f"{name}/{k}", v) for k, v in value.items())
        else:
            yield name, value


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """:func:`_optimizer_state`'s parts as an optimizer state_dict again."""
    state: dict[int, dict] = {}
    entries = [(*key.split(".", 2)[1:], value) for key, value in tensors.items()]
    entries += [(*key.split(".", 1), value) for key, value in meta["scalars"].items()]
    for idx, name, value in entries:
        into = state.setdefault(int(idx), {})
        if "/" in name:                                 # an entry of a nested dict (_flat)
            name, entry = name.split("/", 1)
            into = into.setdefault(name, {})
            name = entry
        into[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def save_checkpoint(run: Path, step: int, state: TrainState, pipe, config: TrainConfig, accelerator, emit,
                    batches: int) -> Path:
    """:func:`write_checkpoint`; when it fails (disk full, a NaN) its temporary folder goes, and
    running out of space says what a checkpoint of this run needs."""
    tmp = _tmp_dir(run, step)
    try:
        return write_checkpoint(run, step, state, pipe, config, accelerator, emit, batches)
    except BaseException as e:
        if not accelerator.is_main_process:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskFull):
            raise e.carry_on(e.way_out, needs=_checkpoint_bytes(state, config)) from e
        raise


def _tmp_dir(run: Path, step: int) -> Path:
    final = rd.checkpoint_dir(run, step)
    return final.with_name(f".tmp-{final.name}")


def _checkpoint_bytes(state: TrainState, config: TrainConfig) -> int:
    """About what a checkpoint takes: the trainable tensors in fp32, their copy as the adapter
    file (dora/lora) and the optimizer's state tensors."""
    trainable = sum(p.numel() for p in state.params.values()) * 4 + sum(t.nbytes for t in state.ema.tensors.values())
    moments = sum(t.nbytes for s in state.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return trainable * (1 if config.method == "full" else 2) + moments


def write_checkpoint(run: Path, step: int, state: TrainState, pipe, config: TrainConfig, accelerator, emit,
                     batches: int) -> Path:
    """``checkpoints/step-N/``: trainable tensors, optimizer (safetensors + JSON), LR schedule,
    data position (``batches``: micro-batches of the shared batch stream used so far, all processes
    together) and every process's RNG, plus ``adapter.safetensors`` (usable with generate);
    written under a temporary name and renamed, then older checkpoints beyond
    ``keep_checkpoints`` are removed (renamed away, then deleted). Weights that are not finite
    stop the run (:func:`diverged`) before anything is written."""
    check_finite_weights(state.params, step, rd.latest_checkpoint(run))
    final = rd.checkpoint_dir(run, step)
    tmp = _tmp_dir(run, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_safetensors(tmp / f"rng-{accelerator.process_index}.safetensors", _rng_state(state.gen))
    trainable = sharding.full_tensors(state.params)            # gathered by every process when sharded
    optimizer = sharding.optimizer_state_dict(state.optimizer, state.params, pipe)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_safetensors(tmp / rd.TRAINABLE, trainable, {"method": config.method})
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        write_safetensors(tmp / rd.OPTIMIZER, opt_tensors)
        if state.ema.tensors:
            write_safetensors(tmp / EMA_FILE, state.ema.tensors)
        faults.reach("checkpoint", step)
        meta = {"step": step, "processes": accelerator.num_processes, "batches": batches, "optimizer": opt_meta,
                "lr_schedule": state.schedule.state_dict(), "dorabooth_version": __version__}
        write_json(tmp / rd.STATE, meta, default=_json_default)
        if config.method != "full":                     # the same adapter (its EMA when on) as a user-facing file
            with state.ema.applied():
                adapters.save_adapter(pipe, tmp / rd.ADAPTER, base_model=config.model,
                                      subject=rd.subject_of(config, run))
                if config.pivotal_tokens:               # the token rows, beside the adapter they trained with
                    pivotal.save_embeddings(pipe, tmp / pivotal.EMBEDDINGS)
        replaced = final.with_name(f".old-{final.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        if final.exists():                              # re-saving a step: renamed away, deleted once replaced
            os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for s in rd.checkpoint_steps(run)[:-config.keep_checkpoints]:
            rd.remove_checkpoint(run, s)
        emit("checkpoint", step=step, path=str(final))
    accelerator.wait_for_everyone()
    return final


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


@dataclass(frozen=True)
class Resumed:
    """Where a restored run continues: its optimizer step and its position in the shared batch
    stream (micro-batches used, all processes together)."""

    step: int
    batches: int


def restore_checkpoint(run: Path, state: TrainState, accelerator, emit, grad_accum: int = 1, pipe=None) -> Resumed:
    """Load the newest checkpoint into the live objects (step 0 if none).

    The number of processes may differ from the checkpoint's (DDP keeps the same weights and
    optimizer state on every process): the data order continues where the checkpoint's processes
    left it, and each process's noise generator starts a new stream seeded by (seed, step,
    process) instead of the saved one, which only the same process count can continue exactly.
    Checkpoints hold whole tensors and the unsharded optimizer state, so a sharded run (FSDP,
    ``pipe`` needed) takes its part of each (``dorabooth.sharding``)."""
    ckpt = rd.latest_checkpoint(run)
    if ckpt is None:
        emit("resume", step=0, message=f"no checkpoint in {run / rd.CHECKPOINTS}; starting from step 0")
        return Resumed(0, 0)
    meta = json.loads((ckpt / rd.STATE).read_text())
    before, now = meta["processes"], accelerator.num_processes
    batches = meta.get("batches", meta["step"] * grad_accum * before)   # checkpoints before 0.x kept no position
    tensors, _ = read_safetensors(ckpt / rd.TRAINABLE, "checkpoint")
    params = state.params
    missing = sorted(set(params) - set(tensors))
    if missing or len(tensors) != len(params):
        raise ValueError(f"{ckpt}: trainable tensors do not match this run (missing e.g. {missing[:3]})")
    sharding.load_tensors(params, tensors)
    if isinstance(state.ema, EMA):
        if not (ckpt / EMA_FILE).is_file():
            raise ValueError(f"{ckpt} has no {EMA_FILE} although this run keeps an EMA (--ema-decay); resume "
                             f"without --ema-decay, as the run was started")
        state.ema.load(read_safetensors(ckpt / EMA_FILE, "checkpoint")[0])
    wanted = [group["initial_lr"] for group in state.optimizer.param_groups]      # this run's, before loading
    saved = _optimizer_state_dict(read_safetensors(ckpt / rd.OPTIMIZER, "checkpoint")[0], meta["optimizer"])
    sharding.load_optimizer_state_dict(state.optimizer, saved, params, pipe)
    state.schedule.load_state_dict(meta["lr_schedule"])
    _use_learning_rates(state.optimizer, state.schedule, wanted)
    if before == now:
        rng, _ = read_safetensors(ckpt / f"rng-{accelerator.process_index}.safetensors", "checkpoint")
        state.gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))])
        emit("resume", step=meta["step"], path=str(ckpt))
    else:
        state.gen.manual_seed(state.gen.initial_seed() + 1_000_003 * meta["step"])
        emit("resume", step=meta["step"], path=str(ckpt), processes_before=before, processes=now,
             message=f"{ckpt} was written by {before} process(es) and this run has {now}: each step now "
                     f"trains on {now / before:g}× as many images as before (the lr schedule counts steps); "
                     f"the data order continues, the noise draws start a new seeded stream")
    return Resumed(meta["step"], batches)


def _use_learning_rates(optimizer, schedule, base_lrs: list[float]) -> None:
    """After a restore, the LR schedule continues from its step with this run's learning rates
    (``--resume --lr`` may lower them) instead of the checkpoint's."""
    if list(schedule.base_lrs) == list(base_lrs):
        return
    schedule.base_lrs = list(base_lrs)
    for group, base, factor in zip(optimizer.param_groups, base_lrs, schedule.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def save_final(pipe, config: TrainConfig, run: Path, base: BaseModel, accelerator) -> Path:
    """``adapter.safetensors`` (diffusers/PEFT format) for dora/lora; for ``full`` a diffusers
    UNet folder ``unet/`` (``diffusion_pytorch_model.safetensors`` + ``config.json``) and, when
    they trained, the text encoders beside it (``text_encoder/``, ``text_encoder_2/``: the
    pipeline's own folder names). Returns the adapter file or the ``unet/`` folder."""
    accelerator.wait_for_everyone()
    if config.method == "full":
        target = run / rd.FULL_UNET
        trained = [n for n, c in pipe.components.items()
                   if isinstance(c, torch.nn.Module) and (n == rd.FULL_UNET or n.startswith("text_encoder"))
                   and inject.has_trainable(c)]
        sharded = sharding.is_sharded(accelerator)
        whole = {n: sharding.full_component_state(getattr(pipe, n)) for n in trained} if sharded else {}
        if accelerator.is_main_process:
            for name in trained:                       # check all before writing any
                weights = whole[name].values() if sharded else getattr(pipe, name).parameters()
                if not all(torch.isfinite(p).all() for p in weights):
                    raise TrainingDiverged(f"the fine-tuned {name} has NaN/inf weights; not writing it")
            for name in sorted(trained, key=lambda n: n == rd.FULL_UNET):   # unet/ last: it marks the run finished
                with atomic_folder(run / name, overwrite=True) as tmp:
                    if sharded:
                        _save_whole(getattr(pipe, name), whole[name], tmp)
                    else:
                        getattr(pipe, name).save_pretrained(tmp, safe_serialization=True)
    else:
        target = run / rd.ADAPTER
        if accelerator.is_main_process:
            if config.pivotal_tokens:                  # first: adapter.safetensors marks the run finished
                pivotal.save_embeddings(pipe, run / pivotal.EMBEDDINGS)
            adapters.save_adapter(pipe, target, base_model=base.id, subject=rd.subject_of(config, run), base_hash=base.hash)
    accelerator.wait_for_everyone()
    return target


def _save_whole(module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """A sharded component's gathered weights as its ``save_pretrained`` folder: the config and one
    safetensors file (diffusers' and transformers' single-file names)."""
    if hasattr(module, "save_config"):                 # diffusers (the UNet)
        module.save_config(folder)
        write_safetensors(folder / "diffusion_pytorch_model.safetensors", state, {"format": "pt"})
    else:                                              # transformers (a text encoder)
        module.save_pretrained(folder, state_dict=state, safe_serialization=True)
