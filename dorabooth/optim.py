"""The optimizer and the learning-rate schedule of a run.

Optimizers: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes: 2-byte moments; CUDA, and the CPU
in recent bitsandbytes), ``prodigy`` (prodigyopt: estimates its own step size, lr 1.0).
LoRA+ (Hayou et al. 2024, arXiv:2402.12354) gives the up matrices B their own learning rate,
``loraplus_ratio`` × lr.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from .config import TrainConfig


@cache
def bitsandbytes_problem(kind: str = "cuda") -> str | None:
    """None when bitsandbytes' 8-bit AdamW runs on a device of ``kind`` here, else why not, in
    words. On the CPU it is tried: one step on a 4096-element tensor must keep 8-bit moments
    (recent bitsandbytes has CPU optimizers, 0.50.2 works; older versions fail)."""
    try:
        import bitsandbytes
        bitsandbytes.optim.AdamW8bit  # noqa: B018 - fails on builds without the optimizers
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        return f"bitsandbytes is not usable ({type(e).__name__}: {e}); `pip install bitsandbytes`"
    if kind == "cuda":
        return None if torch.cuda.is_available() else "bitsandbytes' 8-bit AdamW needs a CUDA GPU"
    if kind != "cpu":
        return f"bitsandbytes' 8-bit AdamW does not run on {kind}"
    try:
        p = torch.nn.Parameter(torch.ones(4096))
        opt = bitsandbytes.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        if opt.state[p]["state1"].dtype != torch.uint8 or not torch.isfinite(p).all():
            return f"bitsandbytes {bitsandbytes.__version__} did not keep 8-bit moments on this CPU"
    except Exception as e:  # noqa: BLE001 - any failure of the trial step means "not here"
        return (f"bitsandbytes {getattr(bitsandbytes, '__version__', '?')}'s 8-bit AdamW does not run on this CPU "
                f"({type(e).__name__}: {str(e)[:120]}); `pip install -U bitsandbytes` or use a CUDA GPU")
    return None


def prodigy_problem() -> str | None:
    """None when prodigyopt imports, else the install line."""
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        return "the prodigyopt package is not installed; `pip install prodigyopt` (or `pip install dorabooth[prodigy]`)"
    return None


def _device_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def optimizer_problem(name: str) -> str | None:
    """Why optimizer ``name`` cannot run on this machine, or None."""
    if name == "adamw8bit":
        return bitsandbytes_problem(_device_kind())
    if name == "prodigy":
        return prodigy_problem()
    return None


def check_optimizer_available(name: str) -> None:
    """Raise ValueError, naming the flag to change, when ``name`` cannot run here."""
    problem = optimizer_problem(name)
    if problem:
        raise ValueError(f"optimizer {name}: {problem}; or use --optimizer adamw on this machine")


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Magnitudes, biases and vectors: no weight decay (decay would pull DoRA's m towards 0, not ‖W0‖)."""
    return name.endswith(("lora_magnitude_vector", ".bias")) or p.ndim < 2


def _is_up(name: str) -> bool:
    """LoRA+'s "B": the up matrix (``lora_B.weight``, (out, r)); A and the magnitude keep lr."""
    return ".lora_B." in name


PIVOTAL_ROWS = ".pivotal_rows"         # dorabooth.pivotal's trainable token embedding rows


def _is_pivotal(name: str) -> bool:
    return name.endswith(PIVOTAL_ROWS)


def param_groups(params: dict[str, torch.nn.Parameter], config: TrainConfig) -> list[dict]:
    """Parameter groups by (component lr, decay, LoRA+ up matrix), in a fixed order so that a
    checkpoint's optimizer state maps back onto them: UNet before text encoders, decayed before
    not, A before B. With ``loraplus_ratio`` λ the B matrices get λ · lr (LoRA+, arXiv:2402.12354 §4).
    Pivotal tuning's token rows come last, in a group of their own (``pivotal_lr``, no weight
    decay: decay would pull the embeddings towards 0, away from the vocabulary's scale)."""
    ratio = config.loraplus_ratio or 1.0
    groups = []
    for component_lr, in_component in ((config.lr, lambda n: n.startswith("unet.")),
                                       (config.text_encoder_lr, lambda n: not n.startswith("unet.")
                                        and not _is_pivotal(n))):
        for decay in (True, False):
            for up in (False, True):
                chosen = [p for n, p in params.items() if in_component(n) and _no_decay(n, p) != decay
                          and (config.loraplus_ratio is not None and _is_up(n)) == up]
                if chosen:
                    groups.append({"params": chosen, "lr": component_lr * (ratio if up else 1.0),
                                   "weight_decay": config.weight_decay if decay else 0.0})
    rows = [p for n, p in params.items() if _is_pivotal(n)]
    if rows:
        groups.append({"params": rows, "lr": config.pivotal_lr or config.text_encoder_lr, "weight_decay": 0.0,
                       "pivotal": True})
    return groups


def make_optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig):
    """AdamW (torch or bitsandbytes 8-bit) or Prodigy over :func:`param_groups`."""
    groups = param_groups(params, config)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy
        # what prodigyopt's README and diffusers' DreamBooth scripts advise for diffusion models
        return Prodigy(groups, betas=config.adam_betas, eps=config.adam_eps, use_bias_correction=True,
                       safeguard_warmup=True)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, betas=config.adam_betas, eps=config.adam_eps)
    return torch.optim.AdamW(groups, betas=config.adam_betas, eps=config.adam_eps)


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


def pivotal_factor(step: int, config: TrainConfig) -> float:
    """The pivotal rows' multiplier: :func:`lr_factor`, and 0 from ``pivotal_stop`` × steps on
    (lr 0: AdamW and Prodigy leave the rows exactly as they are)."""
    if config.pivotal_stop is not None and step >= math.ceil(config.pivotal_stop * config.steps):
        return 0.0
    return lr_factor(step, config)


def make_lr_schedule(optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda step: pivotal_factor(step, config)) if group.get("pivotal")
                    else (lambda step: lr_factor(step, config)) for group in optimizer.param_groups])
