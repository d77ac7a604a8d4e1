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
    # optimizer steps of each SD recipe: LoRA+DreamBooth's distance in floors is 0.41-0.47x the base's at 900 (3
    # training seeds), 0.47-0.57x at 300 (benchmarks/README.md, demo_concepts)
    sd_steps: int = 900
    ddpm_steps: int = 1000  # optimizer steps of the pixel DDPM (benchmarks/README.md, pixel_demo)
    ddpm_resolution: int = 32
    eval_images: int = 8  # generated images per class and model in the evaluation
    seed: int = 0
    quiet: bool = False  # no progress bars
