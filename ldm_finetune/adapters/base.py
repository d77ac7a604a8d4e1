"""The adapter interface: one object per kind of "what trains", which owns every fact about that kind.

An adapter says which modules it trains (`attach`, `parameter_groups`, `trained_models`), what it checks in a
recipe config (`check_config`), whether the text encoder trains, hooks around the optimizer step, how to get the
frozen base model's prediction (DreamBooth's base-model prior), what to average (EMA), which files it writes
(`save`) and how those files are used (`usage_lines`, `card_rows`, `sharing_note` for the model card).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ldm_finetune.core.errors import UserError


class Adapter:
    recipe = "adapter"  # the `recipe:` value that chooses it (the registry key)
    kind = "adapter"  # what the model card calls it
    modelspec_suffix: str | None = None  # ModelSpec's architecture suffix ("lora", "textual-inversion"); None: a
    # whole model, whose architecture id is the base's own
    supports_dreambooth = False  # may be combined with the DreamBooth objective (a `dreambooth:` section)
    sections: tuple[str, ...] = ()  # the adapter-specific config sections it reads (others are a mistake)

    def __init__(self, cfg):
        self.cfg = cfg

    # --- facts about a recipe config (no model needed) -----------------------------------------------------------

    @classmethod
    def check_config(cls, cfg) -> None:
        """Cross-field rules for this adapter's recipes; raise UserError naming the key."""

    @classmethod
    def trains_text_encoder(cls, cfg) -> bool:
        return False

    # --- training ------------------------------------------------------------------------------------------------

    def attach(self, components) -> None:
        """Add / unfreeze the trainable parts (everything is frozen before this is called)."""

    def trained_models(self, components) -> dict:
        """The models holding trainable parameters: they go through accelerate.prepare (DDP, autocast)."""
        out = {"unet": components.unet}
        if self.trains_text_encoder(self.cfg):
            out["text_encoder"] = components.text_encoder
        return out

    def parameter_groups(self, components) -> list[dict]:
        """The UNet's trainable parameters, and the text encoder's when it trains (at its own rate when set)."""
        lr = self.cfg.train.learning_rate
        groups = [trainable_group(components.unet.parameters(), lr)]
        if self.trains_text_encoder(self.cfg):
            groups.append(trainable_group(components.text_encoder.parameters(), self.text_encoder_lr() or lr))
        return groups

    def text_encoder_lr(self) -> float | None:
        """The text encoder's learning rate when it differs from train.learning_rate."""
        return None

    def before_optimizer_step(self, step: int) -> None:
        """Called with the gradients in place, before optimizer.step (step = optimizer steps done so far)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step that updated the weights."""

    def expand_token(self, token: str) -> str:
        return token

    def ema_settings(self, components):
        """(model to average, decay, keep on CPU) when this adapter exports an EMA of its weights, else None."""
        return None

    def checkpoint_objects(self) -> list:
        """Extra state that checkpoints must hold."""
        return []

    @contextlib.contextmanager
    def base_model(self, unet):
        """Inside: `unet` predicts like the frozen base model (for DreamBooth's base-model prior)."""
        raise UserError(f"recipe {self.cfg.recipe} has no frozen base prediction; use dreambooth.prior=generate")
        yield  # pragma: no cover

    # --- the shareable result ------------------------------------------------------------------------------------

    def save(self, run, header: dict[str, str]) -> list[Path]:
        """Write the files others load; `run` is the training task (models, accelerator, layout, ema)."""
        raise NotImplementedError

    def usage_lines(self, base: str, prompt: str) -> list[str]:
        """The few lines of diffusers code that use the saved files (for the model card)."""
        raise NotImplementedError

    def card_rows(self) -> dict[str, str]:
        """Adapter settings for the model card's training table."""
        return {}

    def sharing_note(self) -> str | None:
        """How to use the files in other tools (A1111 / ComfyUI), for the model card."""
        return None


def trainable_group(params, lr: float) -> dict:
    """An optimizer parameter group of the parameters that require gradients."""
    return {"params": [p for p in params if p.requires_grad], "lr": lr}
