"""Closed-form optimal denoisers E[x0 | x_t], for testing the samplers and as the training-free patch baseline.

- `gmm_denoiser`: data from an isotropic Gaussian mixture; the posterior is exact, so the samplers must reproduce
  the mixture.
- `empirical_denoiser`: the optimum over a finite training set (eq. 5-6 of seed 000): a softmax over the training
  images; the samplers then return training images (it memorises, by construction).
- `local_denoiser`: the optimum under a locality constraint (Kamb & Ganguli 2024; eq. 8-9 and algorithm 1 of
  seed 000): each pixel's weights over training images come only from the patch around it, at the same position.
  Reverse diffusion with it composes "patch mosaics" of the training slices — the reference a trained model should
  beat on innovation.
"""

from __future__ import annotations

import math

import torch

from ldm_finetune.models.diffusion import Schedule


def gmm_denoiser(means: torch.Tensor, std: float, weights: torch.Tensor, schedule: Schedule):
    """x0 ~ sum_k pi_k N(mu_k, std^2 I) in R^d; means (K, d). Exact E[x0 | x_t]."""
    log_pi = torch.log(weights)

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        a = schedule.abar(t)
        var = a * std**2 + (1 - a)  # x_t | k ~ N(sqrt(a) mu_k, var I)
        d2 = torch.cdist(x_t, math.sqrt(a) * means) ** 2  # (B, K)
        resp = torch.softmax(log_pi - d2 / (2 * var), dim=1)  # posterior over components
        gain = math.sqrt(a) * std**2 / var  # E[x0 | x_t, k] = mu_k + gain (x_t - sqrt(a) mu_k)
        per_k = means[None] + gain * (x_t[:, None, :] - math.sqrt(a) * means[None])  # (B, K, d)
        return (resp[..., None] * per_k).sum(1)

    return denoise


def empirical_denoiser(images: torch.Tensor, schedule: Schedule):
    """The optimal denoiser of the empirical distribution of `images` (N, C, H, W)."""
    flat = images.flatten(1)

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        a = schedule.abar(t)
        d2 = torch.cdist(x_t.flatten(1).double(), math.sqrt(a) * flat.double()) ** 2  # (B, N)
        w = torch.softmax(-d2 / (2 * (1 - a)), dim=1).to(images.dtype)
        return (w @ flat).view(x_t.shape)

    return denoise


def local_denoiser(images: torch.Tensor, patch: int, schedule: Schedule, chunk: int = 4):
    """Locally constrained optimal denoiser over `images` (N, C, H, W) with square patches of side `patch` (odd).

    For pixel i: w_n(i) = softmax_n(-||y^Omega_i - x_n^Omega_i||^2 / (2 tau_t)), y = x_t / sqrt(abar_t),
    tau_t = (1 - abar_t) / abar_t, and x0_hat(i) = sum_n w_n(i) x_n(i). Patch distances are box sums of squared
    differences (zero padding: border patches are cropped). Patches equal to the whole image give the empirical
    denoiser.
    """
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch size must be odd and positive, got {patch}")
    n, c = images.shape[:2]
    box = torch.ones(1, 1, patch, patch, dtype=torch.float64)

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        a = schedule.abar(t)
        y = (x_t / math.sqrt(a)).double()
        tau = (1 - a) / a
        out = torch.empty_like(x_t)
        for b0 in range(0, y.shape[0], chunk):  # a few samples at a time: (chunk, N, H, W) distances
            yb = y[b0:b0 + chunk]
            diff2 = ((yb[:, None] - images[None].double()) ** 2).sum(2)  # (B, N, H, W), channels summed
            b, _, h, w = diff2.shape
            d = torch.nn.functional.conv2d(diff2.view(b * n, 1, h, w), box, padding=patch // 2).view(b, n, h, w)
            weights = torch.softmax(-d / (2 * tau), dim=1)  # over training images, per pixel
            out[b0:b0 + chunk] = (weights[:, :, None] * images[None].double()).sum(1).to(x_t.dtype)
        return out

    return denoise
