"""Pixel-space diffusion: noise schedules and the project's own DDPM and DDIM samplers.

The samplers take any *denoiser* `(x_t, t) -> x0_hat`, the model's estimate of the clean image: a trained U-Net
(pixel.unet_denoiser), or a closed-form optimal one (denoisers.py: a Gaussian mixture's, the empirical data's, the
locally constrained one of Kamb & Ganguli 2024). Closed-form denoisers make the samplers testable without training:
schedule, indexing and variance bugs show up as samples that miss the known distribution.

Notation (Ho et al. 2020): beta_t, alpha_t = 1 - beta_t, abar_t = prod alpha;
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


# the diffusers name of each schedule, so a saved model's DDPMScheduler config reproduces the same betas
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass
class Schedule:
    betas: torch.Tensor  # (T,) float64

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    def abar(self, t: int) -> float:
        """abar_t, with abar_{-1} = 1 (the clean image)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])


def make_schedule(kind: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """linear: Ho et al. 2020 (1e-4 -> 0.02); cosine: Nichol & Dhariwal 2021 (abar follows cos^2, beta <= 0.999)."""
    if kind == "linear":
        return Schedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))
    if kind == "cosine":
        def abar(s):
            return math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2

        return Schedule(torch.tensor([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(T)], dtype=torch.float64))
    raise ValueError(f"unknown schedule {kind!r}; expected linear or cosine")


def x0_from_prediction(x_t: torch.Tensor, prediction: torch.Tensor, abar: float, kind: str) -> torch.Tensor:
    """The clean-image estimate from a network output that predicts epsilon or v (Salimans & Ho 2022)."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if kind == "epsilon":
        return (x_t - s * prediction) / a
    if kind == "v_prediction":
        return a * x_t - s * prediction
    raise ValueError(f"unknown prediction type {kind!r}")


def seeded(seed: int | list[int], n: int, device="cpu") -> torch.Generator | list[torch.Generator]:
    """The generator of a batch of n images: one seed for the batch, or a list of n seeds, one per image."""
    if isinstance(seed, int):
        return torch.Generator(device).manual_seed(seed)
    if len(seed) != n:
        raise ValueError(f"{len(seed)} seeds for {n} images")
    return [torch.Generator(device).manual_seed(s) for s in seed]


def _randn(shape, generator, device, dtype):
    """Noise of `shape`; with a list of generators, one per image, each image's noise is what its generator alone
    would draw for a batch of one (so a batch reproduces the images sampled one by one, as diffusers does)."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, shape, schedule: Schedule, generator=None, clip: tuple | None = None,
                trajectory: set[int] = frozenset(), device="cpu", dtype=torch.float32):
    """Ancestral sampling with the posterior q(x_{t-1} | x_t, x0_hat) and its variance beta~_t ("fixed small").

    Returns (x_0, {t: x_t for t in trajectory}).
    """
    x = _randn(shape, generator, device, dtype)
    saved = {}
    for t in reversed(range(schedule.T)):
        if t in trajectory:
            saved[t] = x.clone()
        x0 = denoiser(x, t)
        if clip is not None:
            x0 = x0.clamp(*clip)
        abar_t, abar_prev = schedule.abar(t), schedule.abar(t - 1)
        beta_t = float(schedule.betas[t])
        # posterior mean: coefficients of x0 and x_t (Ho et al. 2020, eq. 7)
        mean = (math.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + \
               (math.sqrt(1 - beta_t) * (1 - abar_prev) / (1 - abar_t)) * x
        if t > 0:
            variance = (1 - abar_prev) / (1 - abar_t) * beta_t
            x = mean + math.sqrt(variance) * _randn(shape, generator, device, dtype)
        else:
            x = mean  # abar_{-1} = 1: the mean is x0_hat itself
    return x, saved


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (the first is T-1: sampling starts from pure noise)."""
    return sorted({round(v) for v in torch.linspace(T - 1, 0, steps).tolist()}, reverse=True)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, shape, schedule: Schedule, steps: int = 50, eta: float = 0.0, generator=None,
                clip: tuple | None = None, trajectory: set[int] = frozenset(), device="cpu", dtype=torch.float32):
    """DDIM (Song et al. 2021): eta = 0 is deterministic, eta = 1 matches DDPM's variance on the same steps."""
    x = _randn(shape, generator, device, dtype)
    saved = {}
    timesteps = ddim_timesteps(schedule.T, steps)
    for i, t in enumerate(timesteps):
        if t in trajectory:
            saved[t] = x.clone()
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        abar_t, abar_prev = schedule.abar(t), schedule.abar(prev)
        x0 = denoiser(x, t)
        if clip is not None:
            x0 = x0.clamp(*clip)
        eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and prev >= 0:
            x = x + sigma * _randn(shape, generator, device, dtype)
    return x, saved


def sample(denoiser: Denoiser, shape, schedule: Schedule, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           **kw):
    """The sampler by name: ddpm (all T steps) or ddim (`steps` steps)."""
    if sampler == "ddpm":
        return ddpm_sample(denoiser, shape, schedule, **kw)
    if sampler == "ddim":
        return ddim_sample(denoiser, shape, schedule, steps=steps, eta=eta, **kw)
    raise ValueError(f"unknown sampler {sampler!r}; expected ddpm or ddim")
