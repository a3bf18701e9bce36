"""Sharded training: FSDP (PyTorch's FSDP2, through accelerate) for ``--method full`` (issue 15).

``accelerate launch --config_file configs/accelerate/fsdp-full-shard.yaml -m dorabooth train
--method full …`` shards every trained weight, its gradient and its AdamW moments across the processes
(DTensors: each process holds 1/N), where DDP keeps all of them on every process. Adapters
(dora/lora/dvora) are small enough for DDP on one GPU each and are refused under FSDP.

A sharded run writes the same run folder as an unsharded one: a checkpoint holds the gathered
full tensors and the optimizer state in ``torch.optim.Optimizer.state_dict``'s own layout
(state keyed by position in the optimizer), so a checkpoint written by N sharded processes
resumes on any number of processes, sharded or not, and an unsharded one resumes sharded
(``checkpoints.restore_checkpoint``). Gathering and scattering use PyTorch's
``torch.distributed.checkpoint.state_dict`` helpers, keyed by the pipeline-qualified parameter
names the trainer uses everywhere (``unet.conv_in.weight``). Every function here that gathers
is collective: every process calls it, in the same order.

accelerate enables FSDP on accelerators only (on a CPU box its launcher falls back to DDP over
gloo); ``DORABOOTH_FSDP_ON_CPU=1`` lets the tests run the real FSDP2 sharding over gloo
(:func:`enable_on_cpu`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .inject import trainable_parameters

CPU_FLAG = "DORABOOTH_FSDP_ON_CPU"


def fsdp_asked() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_on_cpu(accelerator) -> None:
    """With ``DORABOOTH_FSDP_ON_CPU=1``, an FSDP launch on CPU processes (which accelerate turns into
    DDP over gloo) shards with FSDP2 over gloo instead, configured from the launcher's ``FSDP_*``
    variables: the tests' way to run the real sharded path without GPUs (:func:`prepare`)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not (os.environ.get(CPU_FLAG) == "1" and fsdp_asked()
            and accelerator.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(f"{CPU_FLAG}: only FSDP2 (fsdp_version: 2) shards on CPUs")
    accelerator.state.fsdp_plugin = plugin
    accelerator.dorabooth_fsdp_on_cpu = True


def prepare(accelerator, *objects):
    """``accelerator.prepare``; after :func:`enable_on_cpu`, as FSDP2 (accelerate's FSDP type only for
    the preparing: its barriers and collectives stay those of gloo DDP, which CPUs run)."""
    if not getattr(accelerator, "dorabooth_fsdp_on_cpu", False):
        return accelerator.prepare(*objects)
    from accelerate.utils import DistributedType

    state = accelerator.state
    before, state.distributed_type = state.distributed_type, DistributedType.FSDP
    try:
        return accelerator.prepare(*objects)
    finally:
        state.distributed_type = before


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or getattr(accelerator, "dorabooth_fsdp_on_cpu", False)


@contextmanager
def no_sync(accelerator, model):
    """Gradients kept local during a micro-batch of gradient accumulation: FSDP2's own switch on a
    sharded model, ``accelerator.no_sync`` otherwise."""
    if not is_sharded(accelerator):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def check_supported(config, accelerator) -> None:
    """FSDP shards full fine-tunes; DeepSpeed is not wired into the trainer (docs/scaling.md)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("DeepSpeed: dorabooth's trainer does not drive a DeepSpeed engine; for a sharded full "
                         "fine-tune launch with configs/accelerate/fsdp-full-shard.yaml (ZeRO-3's sharding) or "
                         "fsdp-shard-grad-op.yaml (ZeRO-2's), for adapters with configs/accelerate/ddp.yaml")
    if is_sharded(accelerator) and config.method != "full":
        raise ValueError(f"FSDP shards full fine-tunes (--method full); a {config.method} adapter is small enough "
                         f"for plain DDP: launch with configs/accelerate/ddp.yaml")
    if is_sharded(accelerator) and config.train_text_encoders:
        raise ValueError("FSDP shards the UNet alone (accelerate's FSDP2 prepares one model): add "
                         "--no-train-text-encoders, or train the text encoders too with configs/accelerate/ddp.yaml")


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (all of it when ``t`` is not sharded)."""
    return t.to_local() if is_dtensor(t) else t


def live_params(pipe, names) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by the same names, looked up again: FSDP2 replaces a module's
    parameters with sharded ones when accelerate prepares it."""
    found = trainable_parameters(pipe)
    missing = [n for n in names if n not in found]
    if missing or len(found) != len(names):
        raise RuntimeError(f"the trainable parameters changed while the model was sharded (e.g. {missing[:3]})")
    return {n: found[n] for n in names}


def any_sharded(params: dict[str, torch.Tensor]) -> bool:
    return any(is_dtensor(p) for p in params.values())


def full_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, in fp32 on the CPU (collective when sharded: each process
    gets the whole tensors)."""
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().float().cpu() for n, p in params.items()}


def load_tensors(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the live parameters; a sharded parameter takes its own part."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, p in params.items():
            whole = tensors[name].to(p.device, p.dtype)
            if is_dtensor(p):
                p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(whole)


def optimizer_names(optimizer, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """The name of each parameter in the optimizer's order (its state_dict's keys 0, 1, …)."""
    by_id = {id(p): n for n, p in params.items()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _model(params: dict[str, torch.nn.Parameter], pipe) -> torch.nn.Module:
    """The trained components under their pipeline names, as one module (its parameter names are
    the trainer's), for PyTorch's state-dict helpers."""
    parts = {n.split(".", 1)[0] for n in params}
    return torch.nn.ModuleDict({c: getattr(pipe, c) for c in sorted(parts)})


def optimizer_state_dict(optimizer, params, pipe) -> dict:
    """``optimizer.state_dict()`` of the whole, unsharded optimizer (collective when sharded; the
    main process gets it, the others an empty state)."""
    if not any_sharded(params):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(_model(params, pipe), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {n: i for i, n in enumerate(optimizer_names(optimizer, params))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full.get("param_groups", [])]
    return {"state": {index[n]: s for n, s in full.get("state", {}).items()}, "param_groups": groups}


def load_optimizer_state_dict(optimizer, state_dict: dict, params, pipe) -> None:
    """Load an unsharded optimizer state (``optimizer.state_dict()``'s layout, as every checkpoint
    holds it) into the live optimizer, sharded or not."""
    if not any_sharded(params):
        optimizer.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = optimizer_names(optimizer, params)
    by_name = {"state": {names[int(i)]: s for i, s in state_dict["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in state_dict["param_groups"]]}
    set_optimizer_state_dict(_model(params, pipe), optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def full_component_state(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded component's whole state dict on the main process (None on the others); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if state else None


def anyone(flag: bool, params: dict[str, torch.Tensor]) -> bool:
    """``flag`` on any process, when the parameters are sharded (each process sees its own part)."""
    if not any_sharded(params):
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value)
    return bool(value.item())
