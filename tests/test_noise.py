"""Noise and loss-weighting math against hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_finetune.models.noise import (
    min_snr_weights,
    perturb_noise,
    sample_noise,
    training_target,
)

SCHEDULE = SimpleNamespace(alphas_cumprod=torch.tensor([0.9, 0.5, 0.1]))  # SNR = 9, 1, 1/9
ALPHAS = SCHEDULE
T = torch.tensor([0, 1, 2])


def test_min_snr_weights_epsilon_and_v():
    # epsilon: min(SNR, 5) / SNR ; v: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(min_snr_weights(ALPHAS, T, 5.0, "epsilon"), torch.tensor([5 / 9, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weights(ALPHAS, T, 5.0, "v_prediction"),
                               torch.tensor([0.5, 0.5, (1 / 9) / (1 / 9 + 1)]))
    with pytest.raises(ValueError):
        min_snr_weights(ALPHAS, T, 5.0, "sample")


def test_offset_noise_is_plain_noise_plus_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(latents.shape, generator=g)
    expected = expected + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(sample_noise(latents, 0.1, torch.Generator().manual_seed(0)), expected)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)))
    # the offset shows up as spread of the per-channel means
    big = torch.zeros(64, 4, 32, 32)
    assert sample_noise(big, 1.0).mean(dim=(2, 3)).std() > 0.8
    assert sample_noise(big, 0.0).mean(dim=(2, 3)).std() < 0.1


def test_input_perturbation():
    noise = torch.ones(1, 4, 2, 2)
    assert perturb_noise(noise, 0.0) is noise
    g = torch.Generator().manual_seed(1)
    expected = noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(perturb_noise(noise, 0.1, g), expected)


def test_v_prediction_target_by_hand():
    sched = DDPMScheduler(prediction_type="v_prediction")
    x0, noise, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([500])
    a = sched.alphas_cumprod[500]
    torch.testing.assert_close(training_target(sched, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert training_target(DDPMScheduler(), x0, noise, t) is noise


def test_zero_terminal_snr_option_reaches_pure_noise():
    sched = DDPMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    assert sched.alphas_cumprod[-1] < 1e-6  # last timestep: (almost) no signal left
    assert DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[-1] > 1e-3
