"""The DreamBooth objective: noise, timesteps, targets, Min-SNR weights, prior split.

Pure tensor functions; the scheduler is only read (``alphas_cumprod``, ``config``). All
randomness comes from an explicit ``torch.Generator`` so that a resumed run draws the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(shape, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise (B, C, H, W); with ``offset`` > 0 a per-channel constant is added
    (noise offset, Guttenberg 2023) so the model can learn very dark/bright images."""
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def sample_timesteps(n: int, scheduler, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps): (n,) int64."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict, per the scheduler's ``prediction_type``:
    ``epsilon`` → the noise; ``v_prediction`` → v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022);
    ``sample`` → the clean latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at each timestep: (n,) float32."""
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return abar / (1.0 - abar)


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556, Eq. 9),
    written for the loss in the model's own parametrisation:
    ε-prediction: min(SNR, γ) / SNR; v-prediction: min(SNR, γ) / (SNR + 1); x₀: min(SNR, γ).
    ``gamma`` 0 or None gives ones (plain MSE)."""
    if not gamma:
        return torch.ones(timesteps.shape[0])
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / s
    if kind == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def prior_split(t: torch.Tensor, n_instance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch laid out [subject images | class images] → (subject part, class part)."""
    return t[:n_instance], t[n_instance:]


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, n_instance: int,
                    prior_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted MSE on the subject half plus ``prior_weight`` × weighted MSE on the class half
    (Ruiz et al. 2023, Eq. 2: class-specific prior-preservation loss).

    pred, target: (B, C, H, W) with the first ``n_instance`` rows the subject; weights: (B,).
    Returns the loss and its parts as floats (``instance``, ``prior``) for the event log.
    """
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))   # (B,)
    per_sample = per_sample * weights.to(per_sample.device)
    instance, prior = prior_split(per_sample, n_instance)
    loss = instance.mean()
    parts = {"instance": float(loss.detach())}
    if prior.numel():
        prior_loss = prior.mean()
        loss = loss + prior_weight * prior_loss
        parts["prior"] = float(prior_loss.detach())
    return loss, parts
