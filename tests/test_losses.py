"""The objective's pieces against their definitions."""

import pytest
import torch
from diffusers import DDPMScheduler

from dorabooth import losses


def _scheduler(kind="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=kind)


def test_targets_per_prediction_type():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    assert torch.equal(losses.diffusion_target(_scheduler("epsilon"), x0, noise, t), noise)
    v = losses.diffusion_target(_scheduler("v_prediction"), x0, noise, t)
    abar = _scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    assert torch.equal(losses.diffusion_target(_scheduler("sample"), x0, noise, t), x0)


def test_min_snr_weights():
    t = torch.tensor([0, 500, 999])
    s = losses.snr(_scheduler(), t)
    assert s[0] > 5 > s[2]
    eps = losses.min_snr_weight(_scheduler("epsilon"), t, 5.0)
    v = losses.min_snr_weight(_scheduler("v_prediction"), t, 5.0)
    torch.testing.assert_close(eps, torch.clamp(s, max=5) / s)
    torch.testing.assert_close(v, torch.clamp(s, max=5) / (s + 1))
    assert torch.equal(losses.min_snr_weight(_scheduler(), t, None), torch.ones(3))
    assert torch.equal(losses.min_snr_weight(_scheduler(), t, 0.0), torch.ones(3))   # 0: plain MSE
    assert eps[2] == pytest.approx(1.0) and eps[0] < 1.0   # noisy steps untouched, clean steps down-weighted


def test_prior_loss_split_and_weight():
    pred = torch.zeros(4, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    loss, parts = losses.dreambooth_loss(pred, target, torch.ones(4), 2, prior_weight=0.5)
    assert parts == {"instance": 1.0, "prior": 4.0}
    assert float(loss) == pytest.approx(1.0 + 0.5 * 4.0)
    loss, parts = losses.dreambooth_loss(pred[:2], target[:2], torch.ones(2), 2, prior_weight=1.0)
    assert "prior" not in parts and float(loss) == 1.0


def test_noise_offset_and_seeded_draws():
    a = losses.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(1), 0.1)
    b = losses.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(1), 0.1)
    c = losses.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(1), 0.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = losses.sample_timesteps(1000, _scheduler(), torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000
