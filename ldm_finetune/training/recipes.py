"""A recipe config -> its training task, and `train(cfg)`: what `accelerate launch -m ldm_finetune.train` runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ldm_finetune.training.fit import fit, resolve_precision
from ldm_finetune.training.pixel import PixelDDPMTask
from ldm_finetune.training.stable_diffusion import StableDiffusionTask
from ldm_finetune.training.task import Task

# recipe: -> task; every other recipe is a Stable Diffusion adapter (adapters/registry.py)
TASKS = {"ddpm_pixel": PixelDDPMTask}


def make_task(cfg) -> Task:
    return TASKS.get(cfg.recipe, StableDiffusionTask)(cfg)


def train(cfg) -> Path:
    """Run the recipe; returns the output folder. "auto" precision is resolved on this machine first, so the task,
    config.yaml and the model card all name the precision that ran (cfg itself is left as it was)."""
    cfg = replace(cfg, train=replace(cfg.train, mixed_precision=resolve_precision(cfg.train.mixed_precision)))
    return fit(cfg.run_settings(), make_task(cfg))
