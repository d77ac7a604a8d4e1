"""Noise and loss-weighting math against hand-computed values."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_finetune.models.noise import (
    DiffusionObjective,
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


# --- one objective for every task -----------------------------------------------------------------------------------

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NOISE = {"noise.offset": 0.5, "noise.input_perturbation": 0.1, "noise.min_snr_gamma": 5.0}
TASKS = {
    "lora_dreambooth.yaml": {"data.resolution": 32, "dreambooth.prior_preservation": "true",
                             "dreambooth.prior": "base_model", "validation.prompts": "[]"},
    "ddpm_pixel.yaml": {"data.resolution": 16, "model.base_channels": 8, "model.channel_mult": "[1,2]",
                        "model.layers_per_block": 1, "model.attention_resolutions": "[]",
                        "model.norm_num_groups": 4},
}


@pytest.mark.parametrize("recipe", list(TASKS))
def test_every_task_trains_through_the_one_objective_with_its_noise_options(recipe, tiny_model_dir, prep_dataset,
                                                                           tmp_path, monkeypatch):
    """A noise option is a NoiseConfig field read in one place (DiffusionObjective.from_config): each task's loss
    noises its batch through that objective, with the recipe's options."""
    from accelerate import Accelerator

    from ldm_finetune.data.images import collate
    from ldm_finetune.models.noise import DiffusionObjective
    from ldm_finetune.training.config import load_config
    from ldm_finetune.training.recipes import make_task

    seen = []
    real = DiffusionObjective.noised
    monkeypatch.setattr(DiffusionObjective, "noised", lambda self, x0: seen.append(self) or real(self, x0))
    settings = {"model.pretrained": tiny_model_dir, "data.train_dir": prep_dataset / "train",
                "output_dir": tmp_path / "run", "data.num_workers": 0, "train.mixed_precision": "no",
                **NOISE, **TASKS[recipe]}
    if recipe == "ddpm_pixel.yaml":
        del settings["model.pretrained"]
    cfg = load_config(RECIPES / recipe, [f"{k}={v}" for k, v in settings.items()])
    task = make_task(cfg)
    task.check()
    dataset = task.build(Accelerator(cpu=True))
    task.use_prepared(task.trained_models())
    batch = collate([dataset[0], dataset[1]])
    loss = task.loss(batch)
    assert torch.isfinite(loss)
    assert len(seen) == 1 and seen[0] is task.objective
    assert (seen[0].offset, seen[0].input_perturbation, seen[0].min_snr_gamma) == (0.5, 0.1, 5.0)


def test_the_mini_base_trains_through_the_same_objective(tmp_path, monkeypatch):
    """The mini base's text-to-image phase takes the recipes' noise options (MiniBaseSettings.noise) to the same
    objective."""
    from accelerate import Accelerator

    from ldm_finetune.models.mini_base import MiniArchitecture, build_vae
    from ldm_finetune.models.noise import DiffusionObjective
    from ldm_finetune.training.config import NoiseConfig
    from ldm_finetune.training.mini_base import MiniBaseSettings, TextToImageTask

    seen = []
    real = DiffusionObjective.noised
    monkeypatch.setattr(DiffusionObjective, "noised", lambda self, x0: seen.append(self) or real(self, x0))
    build_vae(MiniArchitecture()).save_pretrained(tmp_path / "vae")
    settings = MiniBaseSettings(world_images=4, noise=NoiseConfig(offset=0.5, input_perturbation=0.1,
                                                                  min_snr_gamma=5.0))
    task = TextToImageTask(settings, tmp_path / "vae", tmp_path / "tokenizer")
    task.build(Accelerator(cpu=True))
    task.use_prepared(task.trained_models())
    assert torch.isfinite(task.loss({"index": torch.tensor([0, 1])}))
    assert len(seen) == 1 and seen[0] is task.objective
    assert (seen[0].offset, seen[0].input_perturbation, seen[0].min_snr_gamma) == (0.5, 0.1, 5.0)


def test_dreambooth_priors_wrap_the_objective():
    from ldm_finetune.training.config import DreamBoothConfig
    from ldm_finetune.training.dreambooth import BaseModelPrior, ClassImagePrior, InstanceLoss, make_prior

    objective = DiffusionObjective(DDPMScheduler(), min_snr_gamma=5.0)
    assert type(make_prior(None, objective, None)) is InstanceLoss
    assert type(make_prior(DreamBoothConfig(prior_preservation=False), objective, None)) is InstanceLoss
    assert type(make_prior(DreamBoothConfig(prior="generate"), objective, None)) is ClassImagePrior
    assert type(make_prior(DreamBoothConfig(prior="base_model"), objective, None)) is BaseModelPrior
    # instance and class halves of one batch: the class half's prior term is a plain, unweighted MSE
    prior = make_prior(DreamBoothConfig(prior="generate", prior_loss_weight=0.5), objective, None)
    torch.manual_seed(0)
    noised = objective.noised(torch.randn(4, 4, 8, 8))
    pred = torch.randn(4, 4, 8, 8)
    head, tail = slice(0, 2), slice(2, None)
    expected = objective.loss(pred[head], noised.part(head)).mean() + 0.5 * torch.nn.functional.mse_loss(
        pred[tail], noised.target[tail])
    torch.testing.assert_close(prior.loss(pred, noised, 2, {}), expected)
