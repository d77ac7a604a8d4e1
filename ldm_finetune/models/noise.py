"""The diffusion objective every task trains with (`DiffusionObjective`: the SD recipes, the pixel DDPM, the mini
base), and its options, one implementation each. A new option is a NoiseConfig field and a line in the objective.

- offset noise (Guttenberg 2023): add a per-image, per-channel constant to the noise so the model can shift a whole
  frame's mean; without it SD cannot reach near-black / near-white frames, which CT slices are full of (the study
  used 0.1);
- input perturbation (Ning et al. 2023): the noisy input is built with slightly perturbed noise while the target keeps
  the original noise, reducing the train/sample exposure bias;
- min-SNR-gamma loss weighting (Hang et al. 2023): clamp each timestep's weight at SNR = gamma, written for the
  prediction target actually used (epsilon or v);
- zero-terminal SNR (Lin et al. 2024): rescale the betas so the last timestep is pure noise (needs v-prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.training_utils import compute_snr


def sample_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like `latents` (B, C, h, w), plus `offset` x a (B, C, 1, 1) Gaussian when offset > 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset > 0:
        shift = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device,
                            dtype=latents.dtype)
        noise = noise + offset * shift
    return noise


def perturb_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise used to build the noisy input under input perturbation: noise + gamma * fresh Gaussian."""
    if gamma <= 0:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample MSE weights for min-SNR-gamma.

    The paper weights the x0-loss by min(SNR, gamma). An epsilon-MSE equals SNR x the x0-MSE, so its weight is
    min(SNR, gamma) / SNR; a v-MSE equals (SNR + 1) x the x0-MSE, so its weight is min(SNR, gamma) / (SNR + 1).
    """
    s = compute_snr(noise_scheduler, timesteps).float()  # alpha_bar / (1 - alpha_bar), diffusers' own
    clamped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clamped / s
    if prediction_type == "v_prediction":
        return clamped / (s + 1.0)
    raise ValueError(f"min-SNR weighting: unknown prediction type {prediction_type!r}")


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = sqrt(a) * noise - sqrt(1 - a) * x0."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """Per-sample MSE (B,), min-SNR weighted when gamma is set. Computed in fp32 whatever the autocast dtype."""
    per_sample = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma,
                                                  noise_scheduler.config.prediction_type)
    return per_sample


@dataclass
class Noised:
    """A batch as the objective noised it: the model's input x_t at `timesteps`, and what it must predict."""
    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor

    def part(self, index: slice) -> "Noised":
        return Noised(self.x_t[index], self.timesteps[index], self.target[index])


@dataclass
class DiffusionObjective:
    """Denoising training: noise (with offset), uniform timesteps, the noisy input (with input perturbation), the
    target of the schedule's prediction type (epsilon or v; zero-terminal SNR lives in the schedule's betas) and the
    per-sample loss (min-SNR weighted)."""
    scheduler: Any  # a diffusers DDPMScheduler: betas, num_train_timesteps, prediction_type
    offset: float = 0.0
    input_perturbation: float = 0.0
    min_snr_gamma: float | None = None

    @classmethod
    def from_config(cls, noise, scheduler) -> "DiffusionObjective":
        """From a recipe's `noise:` section (training/config.py NoiseConfig)."""
        return cls(scheduler, noise.offset, noise.input_perturbation, noise.min_snr_gamma)

    def noised(self, x0: torch.Tensor) -> Noised:
        noise = sample_noise(x0, self.offset)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],),
                                  device=x0.device).long()
        x_t = self.scheduler.add_noise(x0, perturb_noise(noise, self.input_perturbation), timesteps)
        return Noised(x_t, timesteps, training_target(self.scheduler, x0, noise, timesteps))

    def loss(self, model_pred: torch.Tensor, noised: Noised, weighted: bool = True) -> torch.Tensor:
        """Per-sample loss (B,); `weighted=False` leaves min-SNR out (DreamBooth's prior term is a plain MSE)."""
        gamma = self.min_snr_gamma if weighted else None
        return diffusion_loss(model_pred, noised.target, noised.timesteps, self.scheduler, gamma)
