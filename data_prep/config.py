"""Settings of `ldm-finetune prep`: a YAML file, command-line flags, or both (flags win)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from data_prep.captions import resolve_template
from data_prep.geometry import ORIENTATIONS
from ldm_finetune.core.configtools import NonNegativeInt, PositiveInt
from ldm_finetune.core.errors import UserError

# A state becomes part of file names and captions: letters, digits, '.', '_' and '-' only.
_STATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class VolumeSpec:
    state: str  # the user's name for the process state ("dry", "injected", "batch-7", ...)
    path: Path  # a TIFF stack, or a folder of 2D TIFF slices
    channel: Optional[int] = None  # which channel of a multi-channel file
    warp_axis: Optional[Literal["y", "x"]] = None  # default: PrepConfig.warp_axis
    spacing: Optional[tuple[float, float, float]] = None  # voxel size (z, y, x); default: PrepConfig.spacing
    window: Optional[tuple[float, float]] = None  # fixed grey-level window for this volume only

    def __post_init__(self):
        if not _STATE_NAME.match(self.state):
            raise UserError(
                f"state name {self.state!r} cannot be used in file names; use letters, digits, '.', '_' or '-'"
            )


@dataclass
class SplitConfig:
    axis: Literal["y", "x"] = "x"  # in-plane axis along which the validation block is cut off
    fraction: float = 0.2  # share of that axis for validation (at least one tile)
    gap: Optional[NonNegativeInt] = None  # voxels dropped between the blocks; default one tile (>= one weave repeat)

    def __post_init__(self):
        if not 0 < self.fraction < 0.5:
            raise UserError(f"split.fraction: {self.fraction} must be between 0 and 0.5")


@dataclass
class CaptionConfig:
    style: Literal["prefix", "dreambooth", "textual_inversion"] = "prefix"
    template: Optional[str] = None  # overrides the style's template
    identifiers: dict[str, str] = field(default_factory=dict)  # state/orientation -> identifier (dreambooth)
    class_noun: str = "texture"

    def __post_init__(self):
        self.template = resolve_template(self.style, self.template)


@dataclass
class PrepConfig:
    volumes: list[VolumeSpec]
    out: Path
    resolution: int = 512  # output image side in pixels
    tile_size: Optional[int] = None  # tile side in voxels (default: native crops for thickness, full depth for cuts)
    stride: Union[int, dict[str, int]] = 1  # keep every n-th slice (per orientation with a mapping)
    orientations: list[Literal["thickness", "warp", "weft"]] = field(default_factory=lambda: list(ORIENTATIONS))
    warp_axis: Literal["y", "x"] = "y"  # warp images are planes at fixed y (the study's volumes) or fixed x
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # voxel size (z, y, x), any unit
    spacing_unit: Optional[str] = None  # unit of spacing ("um", "mm", ...); None: voxels, or unnamed if spacing is set
    bits: Literal[8, 16] = 8  # PNG bit depth
    window: Union[Literal["auto", "shared"], tuple[float, float]] = "auto"  # per volume, pooled, or fixed [lo, hi]
    percentiles: tuple[float, float] = (0.5, 99.5)  # for auto/shared windows
    sample_pages: PositiveInt = 16  # pages sampled for the window histogram
    memory_budget_mb: PositiveInt = 2048  # most volume data held in memory at once; larger volumes stream through disk
    split: SplitConfig = field(default_factory=SplitConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    overwrite: bool = False
    hash_sources: bool = True  # sha256 of every source file in the manifest

    def __post_init__(self):
        if not self.volumes:
            raise UserError("no volumes given: pass --volume STATE=PATH (or 'volumes:' in the prep config)")
        if not 8 <= self.resolution <= 4096:
            raise UserError(f"resolution: {self.resolution} px is out of range (8..4096)")
        if self.tile_size is not None and self.tile_size < 8:
            raise UserError(f"tile_size: {self.tile_size} voxels is too small (at least 8)")
        strides = self.stride if isinstance(self.stride, dict) else {o: self.stride for o in ORIENTATIONS}
        for name, value in strides.items():
            if name not in ORIENTATIONS:
                raise UserError(f"stride: unknown orientation {name!r}; expected {', '.join(ORIENTATIONS)}")
            if value < 1:
                raise UserError(f"stride.{name}: {value} must be >= 1")
        self.stride = {o: 1 for o in ORIENTATIONS} | strides
        if not self.orientations:
            raise UserError("orientations: at least one of thickness, warp, weft")
        if any(s <= 0 for s in self.spacing):
            raise UserError(f"spacing: {list(self.spacing)} must be positive")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise UserError(f"percentiles: {list(self.percentiles)} must satisfy 0 <= low < high <= 100")
        if isinstance(self.window, tuple) and not self.window[1] > self.window[0]:
            raise UserError(f"window: {list(self.window)} must be [low, high] with high > low")
        names = [(v.state, str(v.path)) for v in self.volumes]
        if len(set(names)) != len(names):
            raise UserError("volumes: the same state and path are listed twice")

    def volume_warp_axis(self, v: VolumeSpec) -> str:
        return v.warp_axis or self.warp_axis

    def pixel_unit(self, v: VolumeSpec) -> str:
        """The unit a slice's pixel size is given in: spacing_unit, else 'voxel' while no spacing was given (a pixel
        size of 2 means each pixel spans two source voxels)."""
        if self.spacing_unit:
            return self.spacing_unit
        return "voxel" if v.spacing is None and self.spacing == (1.0, 1.0, 1.0) else "spacing unit"

    def z_scale(self, v: VolumeSpec) -> float:
        """Depth spacing relative to in-plane spacing: depth rows are stretched by this factor."""
        z, y, x = v.spacing or self.spacing
        if abs(y - x) > 1e-6 * max(y, x):
            raise UserError(f"{v.path}: in-plane spacing y={y} and x={x} differ; only depth may be anisotropic")
        return z / x
