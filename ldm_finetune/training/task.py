"""What a training task supplies to `fit` (fit.py): its models, its loss, its validation images and its files.

A task is one object per run. fit calls, in order: `check` (read and check the data; nothing heavy loads before),
`build` (load or create the models, attach what trains; returns the dataset), `parameter_groups`,
`trained_models` (they go through accelerate.prepare), `use_prepared`, `make_ema`, `checkpoint_objects`; then
per step `loss(batch)` and the hooks around the optimizer step; `validate(step, tag)` every
`validation.every_steps`; and on the main process `save(global_step)` at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_finetune.models.ema import EMA


class Task:
    ema: EMA | None = None  # the task's average of its weights, made by make_ema

    def check(self) -> None:
        """Read and check the training data (fails fast, before any model loads)."""

    def num_examples(self) -> int | None:
        """Training examples per epoch once check() has run (None: not counted up front)."""
        return None

    def build(self, accelerator) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        raise NotImplementedError

    def trained_models(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def use_prepared(self, models: dict[str, torch.nn.Module]) -> None:
        """The trained models as accelerate wrapped them (DDP), by the names trained_models gave."""

    def make_ema(self) -> EMA | None:
        """The task's EMA of the weights it exports (kept as self.ema), or None; fit updates it after every optimizer
        step and checkpoints it."""
        return None

    def checkpoint_objects(self) -> list:
        """Extra state a checkpoint must hold (anything with state_dict / load_state_dict)."""
        return []

    def before_optimizer_step(self, step: int) -> None:
        """With the gradients in place, before optimizer.step (step = optimizer steps done so far)."""

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step that updated the weights."""

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, step: int, tag: str) -> Path | None:
        """Sample the validation images (main process); returns the saved grid."""
        return None

    def save(self, global_step: int) -> list[Path]:
        """Write the run's results (main process only); returns the files and folders written."""
        raise NotImplementedError
