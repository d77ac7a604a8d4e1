"""DreamBooth's priors as the paper and diffusers' example define them: the base-model prior's target is the frozen
base model (UNet *and* text encoder), the prior term is not min-SNR weighted, class captions and prior prompts are
never dropped, and class images made with other settings are not reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from ldm_finetune.core.errors import UserError
from ldm_finetune.training.config import load_config
from ldm_finetune.training.recipes import make_task

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CLASS_PROMPT = "a texture"


def built_task(tiny_model_dir, prep_dataset, tmp_path, **extra):
    settings = {"model.pretrained": tiny_model_dir, "data.train_dir": prep_dataset / "train",
                "output_dir": tmp_path / "run", "data.resolution": 32, "data.num_workers": 0,
                "train.mixed_precision": "no", "lora.text_encoder": "true", "dreambooth.prior_preservation": "true",
                "dreambooth.prior": "base_model", "validation.prompts": "[]", **extra}
    cfg = load_config(RECIPES / "lora_dreambooth.yaml", [f"{k}={v}" for k, v in settings.items()])
    task = make_task(cfg)
    task.check()
    task.build(Accelerator(cpu=True))
    return task


def perturb(model, std=0.5, seed=0):
    """Stand-in for training: random LoRA up matrices (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_base_model_prior_sees_the_text_encoder_drift(tiny_model_dir, prep_dataset, tmp_path):
    """Only the text encoder has moved (the UNet's LoRA is still zero): the model's prediction on the class prompt
    now differs from the frozen base's, so the prior loss must be > 0. With the class prompt encoded by the trained
    encoder for the target too, it was exactly 0: the prior could not see the drift it exists to stop."""
    task = built_task(tiny_model_dir, prep_dataset, tmp_path)
    g = torch.Generator().manual_seed(0)
    noisy, timesteps = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 700])
    prompts = [CLASS_PROMPT, CLASS_PROMPT]
    with torch.no_grad():
        untouched = task.base_model_prior_loss(noisy, timesteps, prompts).mean().item()
        perturb(task.components.text_encoder)
        drifted = task.base_model_prior_loss(noisy, timesteps, prompts).mean().item()
    assert untouched == pytest.approx(0.0, abs=1e-10)  # nothing trained yet: the model is the base
    assert drifted > 1e-4


def test_class_captions_are_never_dropped(tiny_model_dir, prep_dataset, tmp_path):
    task = built_task(tiny_model_dir, prep_dataset, tmp_path, **{"data.caption_dropout": 0.9999})
    torch.manual_seed(0)
    with torch.no_grad():
        states = task.encoder_hidden_states(["a w17h3r texture", CLASS_PROMPT], droppable=1)
        empty, kept = task.encoder_hidden_states(["", CLASS_PROMPT], droppable=0)
    assert torch.equal(states[0], empty) and torch.equal(states[1], kept)


def test_min_snr_weights_the_instance_term_only(tiny_model_dir, prep_dataset, tmp_path):
    """The prior term is the same with and without min-SNR; the instance term is not."""
    losses = {}
    for gamma in ("null", 1.0):
        torch.manual_seed(0)
        task = built_task(tiny_model_dir, prep_dataset, tmp_path / str(gamma), **{"noise.min_snr_gamma": gamma,
                                                                                   "dreambooth.prior_loss_weight": 0})
        batch = next(iter(torch.utils.data.DataLoader(task_dataset(task), batch_size=2)))
        perturb(task.components.unet, 0.05)
        torch.manual_seed(1)
        with torch.no_grad():
            instance = task.loss(batch).item()
        g = torch.Generator().manual_seed(0)
        noisy, timesteps = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 700])
        with torch.no_grad():
            prior = task.base_model_prior_loss(noisy, timesteps, [CLASS_PROMPT] * 2).mean().item()
        losses[gamma] = (instance, prior)
    assert losses["null"][1] == losses[1.0][1] and losses["null"][1] > 0
    assert losses["null"][0] != losses[1.0][0]


def task_dataset(task):
    from ldm_finetune.training.stable_diffusion import build_dataset

    return build_dataset(task.cfg, task.records, [])[0]


def test_class_images_made_with_other_settings_are_not_reused(tmp_path, capsys):
    from ldm_finetune.models.stable_diffusion import build_pipeline
    from ldm_finetune.training.dreambooth import generate_class_images

    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "class"
    args = dict(prompt=CLASS_PROMPT, model="tiny", n=2, seed=0, guidance=7.5, resolution=32)
    assert generate_class_images(pipe, folder, steps=1, **args) == 2
    assert generate_class_images(pipe, folder, steps=1, **args) == 0  # same settings: reused
    assert generate_class_images(pipe, folder, steps=2, **args) == 2  # other steps: made again
    assert "steps 1 -> 2" in capsys.readouterr().err
    with pytest.raises(UserError, match="guidance 7.5 -> 3.0"):  # a user's own folder: an error, nothing deleted
        generate_class_images(pipe, folder, steps=2, owned=False, **(args | {"guidance": 3.0}))
    assert len(list(folder.glob("*.png"))) == 2
