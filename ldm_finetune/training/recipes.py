"""A recipe config -> its training task, and `train(cfg)`: what `accelerate launch -m ldm_finetune.train` runs."""

from __future__ import annotations

from pathlib import Path

from ldm_finetune.training.fit import fit
from ldm_finetune.training.pixel import PixelDDPMTask
from ldm_finetune.training.stable_diffusion import StableDiffusionTask
from ldm_finetune.training.task import Task

# recipe: -> task; every other recipe is a Stable Diffusion adapter (adapters/registry.py)
TASKS = {"ddpm_pixel": PixelDDPMTask}


def make_task(cfg) -> Task:
    return TASKS.get(cfg.recipe, StableDiffusionTask)(cfg)


def train(cfg) -> Path:
    """Run the recipe; returns the output folder."""
    return fit(cfg, make_task(cfg))
