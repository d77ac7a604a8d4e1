"""The from-scratch pixel-space DDPM task: a class-conditional diffusers UNet2DModel on grey CT slices.

    accelerate launch -m ldm_finetune.train recipes/ddpm_pixel.yaml

One channel, 16-bit slices read at full precision, labels = (state, orientation) by default, classifier-free
guidance through a "no class" label (label dropout while training). Everything around the step (accelerate, EMA,
checkpoints, resume, logging, validation cadence) is fit.py's, shared with the Stable Diffusion recipes. The saved
model folder is a diffusers DDPMPipeline (+ classes.json); sampling uses the project's DDPM / DDIM samplers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_finetune.core.layout import RunLayout
from ldm_finetune.data.images import LabelledSlices
from ldm_finetune.data.records import pixel_sizes, read_records, scanner_windows, training_classes
from ldm_finetune.models.diffusion import make_schedule
from ldm_finetune.models.ema import EMA
from ldm_finetune.models.noise import DiffusionObjective
from ldm_finetune.models.pixel_unet import PixelModel, build_unet, noise_scheduler_for, save_pixel_model, to_grey_arrays
from ldm_finetune.sharing.metadata import PIXEL_SIZES_KEY, WINDOWS_KEY
from ldm_finetune.training.task import Task


class PixelDDPMTask(Task):
    def __init__(self, cfg):
        self.cfg = cfg
        self.layout = RunLayout(cfg.output_dir)
        self.records, self.classes = None, []
        self.accelerator = self.unet = self.model = self.noise_scheduler = None

    @property
    def null_label(self) -> int | None:
        """The "no class" label, None when unconditional."""
        return len(self.classes) if self.classes else None

    def check(self) -> None:
        self.records = read_records(self.cfg.data.train_dir)
        if self.cfg.model.class_conditional:
            self.classes = training_classes(self.records, self.cfg.data.class_columns)

    def num_examples(self) -> int:
        return len(self.records) * self.cfg.data.repeats

    def build(self, accelerator) -> torch.utils.data.Dataset:
        cfg = self.cfg
        self.accelerator = accelerator
        self.unet = build_unet(cfg, len(self.classes)).to(accelerator.device)
        self.noise_scheduler = noise_scheduler_for(cfg)
        self.objective = DiffusionObjective.from_config(cfg.noise, self.noise_scheduler)
        return LabelledSlices(self.records, cfg.data.resolution, self.classes, cfg.data.class_columns,
                              cfg.data.random_flip, cfg.data.repeats)

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.unet.parameters()), "lr": self.cfg.train.learning_rate}]

    def trained_models(self) -> dict:
        return {"unet": self.unet}

    def use_prepared(self, models: dict) -> None:
        self.model = torch.compile(models["unet"]) if self.cfg.model.compile else models["unet"]

    def make_ema(self):
        e = self.cfg.ema
        self.ema = EMA.of(self.unet, e.decay, e.on_cpu) if e.enabled else None
        return self.ema

    def loss(self, batch: dict):
        """Noise the slices, predict epsilon or v: the objective's loss (models/noise.py)."""
        noised = self.objective.noised(batch["pixel_values"])  # (B, 1, R, R) slices
        labels = None
        if self.null_label is not None:
            labels = batch["label"].clone()
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.model.label_dropout
            labels[drop] = self.null_label  # classifier-free guidance: learn the unconditional model too
        model_pred = self.model(noised.x_t, noised.timesteps, class_labels=labels).sample
        return self.objective.loss(model_pred, noised).mean()

    def averaged_unet(self):
        """A copy of the UNet with the EMA weights (or the raw ones without EMA), for sampling and export."""
        unet = self.accelerator.unwrap_model(self.model)
        return self.ema.averaged_copy(unet) if self.ema is not None else copy.deepcopy(unet)

    def validate(self, step: int, tag: str) -> Path | None:
        """images_per_class samples of every class (rows) with the EMA weights; saved under samples/."""
        if not self.accelerator.is_main_process:
            return None
        v, d = self.cfg.validation, self.cfg.diffusion
        model = PixelModel(self.averaged_unet(), make_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end),
                           d.prediction_type, self.classes, {})
        rows = []
        for name in self.classes or [None]:
            images, _ = model.sample(v.images_per_class, name, v.sampler, v.steps, eta=v.eta, guidance=v.guidance,
                                     seed=v.seed, device=self.accelerator.device)
            rows.append(np.concatenate(to_grey_arrays(images), axis=1))
        path = self.layout.sample_grid(tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
        return path

    def save(self, global_step: int) -> list[Path]:
        cfg = self.cfg
        info = {"class_columns": cfg.data.class_columns, "resolution": cfg.data.resolution,
                "global_step": global_step, "ema": cfg.ema.enabled, "train_dir": str(cfg.data.train_dir),
                WINDOWS_KEY: scanner_windows(self.records),
                PIXEL_SIZES_KEY: pixel_sizes(self.records, cfg.data.resolution)}
        folder = save_pixel_model(self.layout.pixel_model, self.averaged_unet(), self.noise_scheduler,
                                  self.classes, info)
        self.validate(global_step, "final")
        return [folder]
