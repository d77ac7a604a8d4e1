"""The project's DDPM and DDIM samplers with closed-form optimal denoisers, for both schedules: no training, so any
schedule, indexing or variance bug shows up as samples that miss the known answer."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_finetune.models.denoisers import (
    empirical_denoiser,
    gmm_denoiser,
    local_denoiser,
)
from ldm_finetune.models.diffusion import (
    DIFFUSERS_SCHEDULE,
    ddim_timesteps,
    make_schedule,
    sample,
    seeded,
    x0_from_prediction,
)

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
STD = 0.3
N = 4000


def mixture(n, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MEANS[k] + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


def sliced_wasserstein(a, b, projections=128):
    d = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    d = d / d.norm(dim=0)
    return ((a @ d).sort(0).values - (b @ d).sort(0).values).abs().mean().item()


def stats(x):
    """(share of samples per component, spread around the nearest mean)."""
    nearest = torch.cdist(x, MEANS).argmin(1)
    shares = torch.bincount(nearest, minlength=3).double() / len(x)
    return shares, (x - MEANS[nearest]).std().item()


# Two independent 4,000-sample sets of the true mixture are 0.03-0.06 apart in this sliced Wasserstein distance.
BOUND = 0.1


@pytest.mark.parametrize("kind", ["linear", "cosine"])
# eta = 1 (stochastic) needs smaller strides than eta = 0: with 50 steps its samples come out ~10 % too narrow
@pytest.mark.parametrize("sampler, kw", [("ddpm", {}), ("ddim", {"steps": 50}), ("ddim", {"steps": 250, "eta": 1.0})])
def test_samplers_reproduce_a_gaussian_mixture(kind, sampler, kw):
    schedule = make_schedule(kind)
    x, _ = sample(gmm_denoiser(MEANS, STD, WEIGHTS, schedule), (N, 2), schedule, sampler,
                  generator=torch.Generator().manual_seed(0), dtype=torch.float64, **kw)
    assert sliced_wasserstein(x, mixture(N, 1)) < BOUND
    shares, spread = stats(x)
    assert torch.allclose(shares, WEIGHTS, atol=0.03) and spread == pytest.approx(STD, rel=0.05)


def test_a_sampler_bug_is_caught():
    """Evaluating the denoiser one DDIM stride late (an indexing bug) leaves visible noise: the test would fail."""
    schedule = make_schedule("linear")
    denoise = gmm_denoiser(MEANS, STD, WEIGHTS, schedule)
    x, _ = sample(lambda x, t: denoise(x, min(t + 20, 999)), (N, 2), schedule, "ddim", steps=50,
                  generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, spread = stats(x)
    assert abs(spread - STD) > 0.05 * STD or sliced_wasserstein(x, mixture(N, 1)) > BOUND


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_empirical_denoiser_samples_land_on_training_images(kind, sampler):
    schedule = make_schedule(kind)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    x, _ = sample(empirical_denoiser(images, schedule), (12, 1, 8, 8), schedule, sampler, steps=50,
                  generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    nearest = torch.cdist(x.flatten(1), images.flatten(1)).min(1).values
    assert nearest.max() < 1e-3 * math.sqrt(64)  # every sample is (numerically) a training image
    assert len(set(torch.cdist(x.flatten(1), images.flatten(1)).argmin(1).tolist())) >= 3  # and not just one


@pytest.mark.parametrize("sampler, kw", [("ddpm", {}), ("ddim", {"steps": 20, "eta": 1.0})])
def test_one_seed_per_image_gives_a_batch_of_the_images_sampled_alone(sampler, kw):
    """The evaluation samples each class as one batch with a seed per image: every image must be the one its seed
    gives alone, through the first noise and every stochastic step's."""
    schedule = make_schedule("cosine")
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    denoise = local_denoiser(images, 3, schedule)
    seeds = [4, 0, 9]
    batch, _ = sample(denoise, (3, 1, 8, 8), schedule, sampler, generator=seeded(seeds, 3), dtype=torch.float64,
                      **kw)
    alone = [sample(denoise, (1, 1, 8, 8), schedule, sampler, generator=seeded(s, 1), dtype=torch.float64, **kw)[0]
             for s in seeds]
    assert torch.equal(batch, torch.cat(alone))
    # one generator for the batch (what `ldm-finetune sample --seed` does) draws other images: the test can fail
    one_generator, _ = sample(denoise, (3, 1, 8, 8), schedule, sampler, generator=seeded(4, 3), dtype=torch.float64,
                              **kw)
    assert not torch.equal(one_generator, batch)
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        seeded([1, 2], 3)


def test_local_denoiser_with_a_whole_image_patch_is_the_empirical_one():
    schedule = make_schedule("cosine")
    images = torch.rand(4, 1, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_t = torch.randn(3, 1, 7, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for t in (10, 300, 900):
        # a 13x13 patch centred anywhere in a 7x7 image covers all of it
        local = local_denoiser(images, 13, schedule)(x_t, t)
        assert torch.allclose(local, empirical_denoiser(images, schedule)(x_t, t), atol=1e-10)


def test_local_score_sampling_is_locally_consistent():
    """Theorem 1 of seed 000: each final pixel is the centre pixel of the training patch nearest to its own
    neighbourhood — the output is a mosaic of training pixels, not a copy of one image."""
    schedule = make_schedule("cosine")
    g = torch.Generator().manual_seed(5)
    images = (torch.rand(6, 1, 12, 12, generator=g, dtype=torch.float64) > 0.5).double() * 2 - 1
    x, _ = sample(local_denoiser(images, 3, schedule), (4, 1, 12, 12), schedule, "ddim", steps=100,
                  generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    values = images.flatten()
    assert (x.flatten()[:, None] - values[None]).abs().min(1).values.max() < 1e-3  # pixels come from the data
    assert torch.cdist(x.flatten(1), images.flatten(1)).min().item() > 1.0  # yet no sample is a training image


def test_schedules_match_diffusers_and_timesteps_start_at_pure_noise():
    from diffusers import DDPMScheduler

    for kind in ("linear", "cosine"):
        reference = DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[kind], beta_start=1e-4, beta_end=0.02)
        assert torch.allclose(reference.alphas_cumprod.double(), make_schedule(kind).alphas_cumprod, atol=1e-6)
    steps = ddim_timesteps(1000, 50)
    assert steps[0] == 999 and steps[-1] == 0 and len(steps) == 50 and steps == sorted(steps, reverse=True)


def test_x0_from_epsilon_and_v():
    x0, eps, a = torch.randn(4), torch.randn(4), 0.3
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
    assert torch.allclose(x0_from_prediction(x_t, eps, a, "epsilon"), x0, atol=1e-6)
    assert torch.allclose(x0_from_prediction(x_t, v, a, "v_prediction"), x0, atol=1e-6)
