"""What `ldm-finetune mini-base --rebuild` builds: the one place the mini base's settings and their defaults are
declared (the command line is built from them). Standard library only, so `ldm-finetune --help` stays fast: the
architecture and noise sections are made by their own (heavier) modules when a settings object is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names for the annotations only: importing them here would load torch
    from ldm_finetune.models.mini_base import MiniArchitecture
    from ldm_finetune.training.config import NoiseConfig


def _architecture():
    from ldm_finetune.models.mini_base import MiniArchitecture

    return MiniArchitecture()


def _noise():
    from ldm_finetune.training.config import NoiseConfig

    return NoiseConfig()


@dataclass
class MiniBaseSettings:
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # share of world images in the VAE's data (the rest: generic grey textures); the world's colours need most of it
    vae_world_share: float = 0.67
    steps: int = 2900  # text-to-image steps
    # the last `decay_steps` of them anneal the rate to 0; before that it is constant. A constant rate to the end
    # left colour words half-learned (world probe 73.5 %); a cosine decay over the whole phase followed them (100 %)
    # but made a base a LoRA learns CT from less well (0.78x against 0.34x): this keeps both (benchmarks/README.md)
    decay_steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    world_images: int = 8192  # distinct world images the text-to-image phase sees
    caption_dropout: float = 0.1
    # 800 read 97.5 % of fresh world images right once class-noun captions came in; 1200: 99.6 %
    probe_steps: int = 1200
    eval_seeds: int = 2  # generations per world prompt when scoring the base
    guidance: float = 4.0
    noise: NoiseConfig = field(default_factory=_noise)  # the recipes' noise options, through the same objective
    arch: MiniArchitecture = field(default_factory=_architecture)
