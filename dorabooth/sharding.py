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

**DeepSpeed ZeRO-2/3** (``configs/accelerate/deepspeed-zero{2,3}.yaml``) shards the same run the
same way through a DeepSpeed engine: ZeRO-2 splits the gradients and AdamW's moments (and its
fp32 master weights), ZeRO-3 the weights too. accelerate builds the engine around the trainer's
own torch AdamW (the lr schedule keeps driving its param groups); the engine owns the step, the
clipping (``gradient_clipping`` = ``--max-grad-norm``) and the accumulation boundary
(:func:`no_sync` marks the micro-batches that are not one). Checkpoints are the trainer's, not
DeepSpeed's: whole tensors and ``optimizer.state_dict()``'s layout, gathered and scattered with
DeepSpeed's tensor-fragment API (``deepspeed.utils.safe_get_full_*`` / ``safe_set_full_*``), so
they resume on any process count, with or without DeepSpeed. DeepSpeed runs on CPU processes
too (its CPU accelerator over gloo): the tests use the real engine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .inject import trainable_parameters

CPU_FLAG = "DORABOOTH_FSDP_ON_CPU"


def deepspeed_asked() -> bool:
    """Whether the launcher asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_on_cpu(accelerator) -> None:
    """DeepSpeed on CPU processes (its CPU accelerator joins them over gloo): accelerate 1.x then
    finds no backend of its own and counts one process of index 0 on each, although the processes
    are joined; the counts are set from torch.distributed (process-wide state, as accelerate's)."""
    import torch.distributed as dist

    if not (is_deepspeed(accelerator) and accelerator.device.type == "cpu" and dist.is_initialized()):
        return
    from accelerate.state import PartialState

    for state in (PartialState(), accelerator.state):
        state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def configure_deepspeed(accelerator, config) -> None:
    """The engine's batch bookkeeping, accumulation and clipping from the run's config (the shipped
    DeepSpeed configs leave them to the trainer): micro-batch = ``--batch-size``, accumulation =
    ``--grad-accum`` (boundaries marked by :func:`no_sync`), clipping = ``--max-grad-norm``."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update({"train_micro_batch_size_per_gpu": config.batch_size, "gradient_accumulation_steps": config.grad_accum,
               "train_batch_size": config.batch_size * config.grad_accum * accelerator.num_processes,
               "gradient_clipping": config.max_grad_norm or 0.0})


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


def prepare(accelerator, *objects, params: dict | None = None):
    """``accelerator.prepare``; after :func:`enable_on_cpu`, as FSDP2 (accelerate's FSDP type only for
    the preparing: its barriers and collectives stay those of gloo DDP, which CPUs run). Under
    DeepSpeed the optimizer (last of ``objects``) becomes the engine's, whose groups hold flat
    partitions: the parameters' names (``params``) in the optimizer's order and its groups'
    settings are kept on it first, for checkpoints (:func:`optimizer_state_dict`)."""
    if is_deepspeed(accelerator):
        optimizer = objects[-1]
        names = optimizer_names(optimizer, params)
        groups, start = [], 0
        for group in optimizer.param_groups:
            n = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        prepared = accelerator.prepare(*objects)
        prepared[-1].dorabooth_names, prepared[-1].dorabooth_groups = names, groups
        return prepared
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
    """FSDP or DeepSpeed: previews and the final weights are then collective (every process takes part)."""
    from accelerate.utils import DistributedType

    return (accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            or getattr(accelerator, "dorabooth_fsdp_on_cpu", False))


@contextmanager
def no_sync(accelerator, model):
    """Gradients kept local during a micro-batch of gradient accumulation: FSDP2's own switch on a
    sharded model, ``accelerator.no_sync`` otherwise."""
    if is_deepspeed(accelerator):                   # the engine steps at a boundary accelerate marks
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
        return
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
    """FSDP and DeepSpeed shard full fine-tunes of the UNet (docs/scaling.md)."""
    if not is_sharded(accelerator):
        return
    name = "DeepSpeed" if is_deepspeed(accelerator) else "FSDP"
    if config.method != "full":
        raise ValueError(f"{name} shards full fine-tunes (--method full); a {config.method} adapter is small enough "
                         f"for plain DDP: launch with configs/accelerate/ddp.yaml")
    if config.train_text_encoders or config.pivotal_tokens:
        raise ValueError(f"{name} shards the UNet alone (accelerate prepares one model for it): add "
                         f"--no-train-text-encoders (and no --pivotal), or train the text encoders too with "
                         f"configs/accelerate/ddp.yaml")
    if is_deepspeed(accelerator) and (config.optimizer or "adamw") != "adamw":
        raise ValueError(f"DeepSpeed: --optimizer {config.optimizer} is not wired (its checkpoints gather AdamW's "
                         f"moments); use --optimizer adamw, or FSDP (configs/accelerate/fsdp-full-shard.yaml)")
    if is_deepspeed(accelerator) and config.ema_decay:
        raise ValueError("DeepSpeed: --ema-decay is not wired (ZeRO-3 holds no whole weight to average); "
                         "leave it off, or use FSDP (configs/accelerate/fsdp-full-shard.yaml)")


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_zero(t) -> bool:
    """A parameter a DeepSpeed ZeRO engine manages (ZeRO-3: ``ds_id``; ZeRO-1/2: ``_hp_mapping``, None
    on the processes whose partition holds none of it: they still take part in its gathers)."""
    return hasattr(t, "ds_id") or hasattr(t, "_hp_mapping")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (all of it when ``t`` is not sharded)."""
    if hasattr(t, "ds_tensor"):                     # ZeRO-3: the parameter itself is empty between gathers
        return t.ds_tensor
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
    return any(is_dtensor(p) or is_zero(p) for p in params.values())


def _whole(p) -> torch.Tensor:
    if is_zero(p):                                  # DeepSpeed's fp32 master weight, gathered
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return p.full_tensor() if is_dtensor(p) else p


def full_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, in fp32 on the CPU (collective when sharded: each process
    gets the whole tensors)."""
    return {n: _whole(p).detach().float().cpu() for n, p in params.items()}


def load_tensors(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the live parameters; a sharded parameter takes its own part (under
    DeepSpeed both the engine's fp32 master and the weight the forward uses; collective)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, p in params.items():
            whole = tensors[name].to(p.device)
            if is_zero(p):
                _load_zero(p, whole)
            elif is_dtensor(p):
                p.to_local().copy_(distribute_tensor(whole.to(p.dtype), p.device_mesh, p.placements).to_local())
            else:
                p.copy_(whole.to(p.dtype))


def _load_zero(p, whole: torch.Tensor) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, whole.float())
    if hasattr(p, "ds_id"):                         # ZeRO-3: gathered, written, split again
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(whole.to(p.dtype))
    else:
        p.data.copy_(whole.to(p.dtype))


def optimizer_names(optimizer, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """The name of each parameter in the optimizer's order (its state_dict's keys 0, 1, …)."""
    by_id = {id(p): n for n, p in params.items()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _model(params: dict[str, torch.nn.Parameter], pipe) -> torch.nn.Module:
    """The trained components under their pipeline names, as one module (its parameter names are
    the trainer's), for PyTorch's state-dict helpers."""
    parts = {n.split(".", 1)[0] for n in params}
    return torch.nn.ModuleDict({c: getattr(pipe, c) for c in sorted(parts)})


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_base(optimizer):
    """The torch AdamW inside accelerate's wrapper of a DeepSpeed ZeRO optimizer (its state is
    keyed by this process's flat partitions)."""
    return optimizer.optimizer.optimizer


def _link_zero_moments(optimizer) -> None:
    """ZeRO-1/2 links each weight to its AdamW moments once, after its first step, while only the
    first param group has stepped (DeepSpeed 0.19): linked again, every group's moments are found."""
    zero = optimizer.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _zero_optimizer_state_dict(optimizer, params) -> dict:
    """AdamW's state_dict layout from a ZeRO engine: each parameter's moments gathered whole; the
    step count, the same for every partition, from this process's own (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _zero_base(optimizer)
    steps = [s["step"] for s in base.state.values() if "step" in s]
    if not steps:                                   # no step taken yet: AdamW has no state
        return {"state": {}, "param_groups": optimizer.dorabooth_groups}
    _link_zero_moments(optimizer)
    state = {}
    for i, name in enumerate(optimizer.dorabooth_names):
        state[i] = {"step": steps[0].detach().clone().cpu(),
                    **{k: safe_get_full_optimizer_state(params[name], k).detach().float().cpu() for k in ADAM_MOMENTS}}
    groups = [{**g, **{k: v for k, v in live.items() if k != "params"}, "params": g["params"]}
              for g, live in zip(optimizer.dorabooth_groups, base.param_groups)]
    return {"state": state, "param_groups": groups}


def _load_zero_optimizer_state_dict(optimizer, state_dict: dict, params) -> None:
    """The inverse: AdamW's state made for this process's partitions (AdamW makes it at its first
    step only), then each parameter's part of the saved whole moments (collective)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    saved = state_dict["state"]
    if not saved:
        return
    base, zero = _zero_base(optimizer), optimizer.optimizer
    step = next(iter(saved.values()))["step"]
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups   # ZeRO-3, -1/2
    for flat in flats:
        base.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                            **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in ADAM_MOMENTS}}
    _link_zero_moments(optimizer)
    for i, name in enumerate(optimizer.dorabooth_names):
        for k in ADAM_MOMENTS:
            safe_set_full_optimizer_state(params[name], saved[i][k].to(params[name].device), k)


def optimizer_state_dict(optimizer, params, pipe) -> dict:
    """``optimizer.state_dict()`` of the whole, unsharded optimizer (collective when sharded; the
    main process gets it, the others an empty state)."""
    if hasattr(optimizer, "dorabooth_names"):
        return _zero_optimizer_state_dict(optimizer, params)
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
    if hasattr(optimizer, "dorabooth_names"):
        _load_zero_optimizer_state_dict(optimizer, state_dict, params)
        return
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
    if any(hasattr(p, "ds_id") for p in module.parameters()):      # ZeRO-3: gathered while read
        import deepspeed
        import torch.distributed as dist

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else {}
        return state or None
    if any(is_zero(p) for p in module.parameters()):               # ZeRO-1/2: every process holds the weights
        import torch.distributed as dist

        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None
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
