"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def bitsandbytes_problem() -> str | None:
    """None when bitsandbytes' 8-bit AdamW can run here (it imports and CUDA is available),
    else why not, in words."""
    try:
        import bitsandbytes
        bitsandbytes.optim.AdamW8bit  # noqa: B018 - fails on builds without the optimizers
    except Exception as e:
        return f"bitsandbytes is not usable ({type(e).__name__}: {e}); `pip install bitsandbytes` on a CUDA machine"
    if not torch.cuda.is_available():
        return "bitsandbytes' 8-bit AdamW needs a CUDA GPU"
    return None


def check_optimizer_available(name: str) -> None:
    """Raise ValueError, naming the flag to change, when ``name`` cannot run here."""
    problem = bitsandbytes_problem() if name == "adamw8bit" else None
    if problem:
        raise ValueError(f"optimizer adamw8bit: {problem}; use --optimizer adamw on this machine")


def make_optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig):
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

