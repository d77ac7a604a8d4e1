"""Cut every planned tile out of a volume in one pass over its pages, within a memory budget.

Thickness tiles are cut as their page streams by. A warp or weft plane needs every page, so while the pages stream
the selected planes are gathered into a *spool* (one (D, L) array per plane, in the source dtype): in memory when it
fits in half the budget, otherwise in a scratch file written with plain `pwrite` (file pages then live in the OS
cache, not in this process). After the pass each plane is read back once, windowed, stretched along depth to
isotropic voxels and tiled.

Every tile goes raw -> [0, 1] through the window -> resized to the output resolution in float32 -> quantized once to
8 or 16 bits, so 16-bit output never passes through 8 bits.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from data_prep.geometry import Plane, Tile, planes, resampled_depth
from data_prep.volume import Volume
from data_prep.window import to_unit
from ldm_finetune.core.io import quantize

# How the memory budget is shared: a slab of pages (25 %), its per-plane copy for the spools (at most the same), and
# the spools themselves when they fit in the remaining half; beyond that they go to scratch files.
_SLAB_SHARE = 0.25
_SPOOL_SHARE = 0.5


@dataclass(frozen=True)
class CutSettings:
    resolution: int
    bits: int
    window: tuple[float, float]
    z_scale: float
    warp_axis: str
    budget_bytes: int


def resize_unit(unit: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a float32 image (antialiased when shrinking), clipped back to [0, 1]."""
    if unit.shape == (rows, cols):
        return unit
    out = np.asarray(Image.fromarray(unit, mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def render_tile(unit_plane: np.ndarray, box, resolution: int, bits: int) -> np.ndarray:
    r0, r1, c0, c1 = box
    return quantize(resize_unit(unit_plane[r0:r1, c0:c1], resolution, resolution), bits)


class Spool:
    """(n_planes, D, L) gathering area for warp/weft planes: a numpy array, or a scratch file on disk."""

    def __init__(self, n: int, depth: int, length: int, dtype: np.dtype, scratch: Path | None):
        self.shape, self.dtype = (n, depth, length), np.dtype(dtype)
        self._plane_bytes = depth * length * self.dtype.itemsize
        self._row_bytes = length * self.dtype.itemsize
        if scratch is None:
            self._array, self._fd = np.empty(self.shape, self.dtype), None
        else:
            self._array = None
            self._fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, n * self._plane_bytes)

    def write(self, z0: int, rows: np.ndarray) -> None:
        """rows: (n_planes, k, L) = pages z0..z0+k-1 of every plane."""
        if self._array is not None:
            self._array[:, z0 : z0 + rows.shape[1]] = rows
            return
        for k in range(rows.shape[0]):
            os.pwrite(self._fd, np.ascontiguousarray(rows[k]).tobytes(), k * self._plane_bytes + z0 * self._row_bytes)

    def read(self, k: int) -> np.ndarray:
        if self._array is not None:
            return self._array[k]
        data = os.pread(self._fd, self._plane_bytes, k * self._plane_bytes)
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._array = None


def _take(slab: np.ndarray, plane: Plane, indices: list[int]) -> np.ndarray:
    """Rows of the selected planes from a slab (k, H, W) -> (n_planes, k, L)."""
    if plane.normal == "y":
        return slab[:, indices, :].transpose(1, 0, 2)
    return slab[:, :, indices].transpose(2, 0, 1)


def cut_volume(
    volume: Volume,
    tiles: Iterable[Tile],
    settings: CutSettings,
    emit: Callable[[Tile, np.ndarray], None],
    scratch_dir: Path,
    progress: Callable[[int], None] = lambda n: None,
) -> dict:
    """Render every tile (emit(tile, image) for each) in one pass over `volume`; returns memory-plan facts.

    `progress(n)` is called with the number of pages of each slab read.
    """
    d, h, w = volume.shape
    by_plane: dict[str, dict[int, list[Tile]]] = defaultdict(lambda: defaultdict(list))
    for t in tiles:
        by_plane[t.orientation][t.index].append(t)
    plane_map = planes(settings.warp_axis)
    cuts = [o for o in ("warp", "weft") if by_plane.get(o)]
    lengths = {o: (w if plane_map[o].normal == "y" else h) for o in cuts}
    spool_bytes = sum(len(by_plane[o]) * d * lengths[o] * volume.dtype.itemsize for o in cuts)
    on_disk = spool_bytes > _SPOOL_SHARE * settings.budget_bytes
    slab_pages = int(max(1, min(d, _SLAB_SHARE * settings.budget_bytes // volume.page_nbytes)))
    spools = {
        o: Spool(len(by_plane[o]), d, lengths[o], volume.dtype, scratch_dir / f"spool-{o}.bin" if on_disk else None)
        for o in cuts
    }
    indices = {o: sorted(by_plane[o]) for o in cuts}
    thickness = by_plane.get("thickness", {})
    try:
        for z0, slab in volume.iter_slabs(slab_pages):
            for k in range(slab.shape[0]):
                for tile in thickness.get(z0 + k, ()):
                    r0, r1, c0, c1 = tile.box
                    unit = to_unit(slab[k, r0:r1, c0:c1], settings.window)
                    emit(tile, render_tile(unit, (0, r1 - r0, 0, c1 - c0), settings.resolution, settings.bits))
            for o in cuts:
                spools[o].write(z0, _take(slab, plane_map[o], indices[o]))
            progress(slab.shape[0])
            del slab
        z_rows = resampled_depth(d, settings.z_scale)
        for o in cuts:
            for k, index in enumerate(indices[o]):
                unit = to_unit(spools[o].read(k), settings.window)
                unit = resize_unit(unit, z_rows, unit.shape[1])  # stretch depth to isotropic voxels
                for tile in by_plane[o][index]:
                    emit(tile, render_tile(unit, tile.box, settings.resolution, settings.bits))
    finally:
        for spool in spools.values():
            spool.close()
    return {"slab_pages": slab_pages, "spool_bytes": int(spool_bytes), "spool_on_disk": bool(on_disk)}
