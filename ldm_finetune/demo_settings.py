"""What `ldm-finetune demo` is asked for: the one place its defaults are declared (the command line is built from
it). Standard library only, so `ldm-finetune --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoSettings:
    out: Path = Path("demo_out")
    shape: tuple[int, int, int] = (96, 192, 256)  # dry phantom volume (D, H, W)
    resolution: int = 64  # prep image side
    sd_resolution: int = 32  # the SD recipes train and generate at the mini base's own size
    # optimizer steps of LoRA+DreamBooth (every target, 36 slices per concept): at 1,800 its slices read as the
    # concept asked for in the VAE's space ~78 % of the time, at 900 ~46 % (benchmarks/README.md, demo_concepts)
    lora_steps: int = 1800
    sd_steps: int = 900  # optimizer steps of Textual Inversion
    ddpm_steps: int = 1000  # optimizer steps of the pixel DDPM (benchmarks/README.md, pixel_demo)
    ddpm_resolution: int = 32
    eval_images: int = 8  # generated images per class and model in the evaluation
    seed: int = 0
    quiet: bool = False  # no progress bars
