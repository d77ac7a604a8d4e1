"""What `generate` and `sample` are asked for: one dataclass each, the one place their defaults are declared (the
command line is built from them). Standard library only, so `ldm-finetune --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GenerateSettings:
    prompts: list[str]
    n: int = 4  # images per prompt
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    negative_prompt: str = ""
    scheduler: str | None = None  # None: the model's own
    height: int | None = None  # None: the model's native size
    width: int | None = None
    grayscale: bool = False  # save single-channel PNGs (CT slices are grey)
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file or folder, scale)
    embeddings: list[str] = field(default_factory=list)
    format: str = "png"  # png (8-bit RGB, or grey with grayscale) | tiff (scanner grey levels, see scanner.py)
    window: tuple[float, float] | None = None  # tiff: the scanner window (default: the one the run recorded)
    tile: int | None = None  # MultiDiffusion tile side in px (default: the model's native size, when larger)
    tile_overlap: float = 0.5  # share of a tile its neighbour also covers (0.75: ~twice the UNet calls per tiled
    # axis, and with the moving grid no better at the joins: benchmarks/README.md)
    seamless: bool = False  # periodic slices: the image tiles with itself


@dataclass
class SampleSettings:
    """What `ldm-finetune sample` asks for (the CLI's flags, one field each)."""
    out: Path
    model: Path | None = None  # a pixel DDPM model folder; or baseline="local-score"
    class_name: str | None = None  # e.g. dry/thickness (class-conditional models)
    n: int = 8
    sampler: str = "ddim"  # ddpm (all T steps) or ddim (`steps`)
    steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0
    guidance_rescale: float = 0.0  # guided estimate's contrast brought back to the conditional one's (0: off)
    seed: int = 0
    trajectory: str | None = None  # "999,500,100": also save x_t at these timesteps
    bits: int = 8
    baseline: str | None = None  # "local-score": the training-free baseline instead of a model
    patch: int = 5
    train_dir: Path | None = None
    resolution: int = 64
    max_images: int = 64
    schedule: str = "cosine"
    format: str = "png"  # png, or tiff: scanner grey levels (generation/scanner.py)
    window: str | None = None  # tiff: "LO,HI" instead of the window the model's training data recorded
