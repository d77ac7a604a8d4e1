"""Where every training image comes from: slice planes, square tiles and the leakage-free split.

Volume axes are (z, y, x): z is the page (depth / thickness) axis, y and x the in-plane axes.

- thickness: the plane at page z, an image of rows y and columns x;
- warp and weft: the two in-plane cuts, full depth. With `warp_axis="y"` (the study's volumes) a warp image is the
  plane at fixed y (rows z, columns x) and a weft image the plane at fixed x (rows z, columns y); "x" swaps them.

Rows along z are counted in the *resampled* depth grid (anisotropic voxels are stretched to isotropic first).

The split: adjacent slices are near-duplicates, so a random split leaks. Validation is a block at the far end of one
in-plane axis, separated from the training block by a gap; every image is placed from its 3D footprint (the voxel box
it was cut from), tiles are laid out inside each block separately, and anything touching the gap is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ldm_finetune.core.errors import UserError

ORIENTATIONS = ("thickness", "warp", "weft")
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Plane:
    """How one orientation's images sit in the volume: the axis they are indexed along, and their row/col axes."""

    orientation: str
    normal: str  # "z", "y" or "x"
    rows: str
    cols: str


def planes(warp_axis: str) -> dict[str, Plane]:
    other = {"y": "x", "x": "y"}[warp_axis]
    return {
        "thickness": Plane("thickness", "z", "y", "x"),
        "warp": Plane("warp", warp_axis, "z", other),
        "weft": Plane("weft", other, "z", warp_axis),
    }


@dataclass(frozen=True)
class Footprint:
    """Half-open voxel box [z0, z1) x [y0, y1) x [x0, x1) in source voxels."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    def extent(self, axis: str) -> tuple[int, int]:
        return getattr(self, axis + "0"), getattr(self, axis + "1")


@dataclass(frozen=True)
class Tile:
    """One output image: a square box of one slice plane, and where it landed in the split."""

    orientation: str
    index: int  # position of the plane along its normal axis (source voxels)
    box: tuple[int, int, int, int]  # (r0, r1, c0, c1) in the plane's pixel grid (resampled depth rows)
    footprint: Footprint
    split: str


@dataclass(frozen=True)
class SplitBlocks:
    """Train block [0, train_end) and validation block [val_start, length) along `axis`; the gap lies between."""

    axis: str
    length: int
    train_end: int
    val_start: int

    def assign(self, fp: Footprint) -> str | None:
        a0, a1 = fp.extent(self.axis)
        if a1 <= self.train_end:
            return "train"
        if a0 >= self.val_start:
            return "validation"
        return None  # touches the gap (or straddles it): dropped

    def block(self, split: str) -> tuple[int, int]:
        return (0, self.train_end) if split == "train" else (self.val_start, self.length)


def resampled_depth(depth: int, z_scale: float) -> int:
    """Number of depth rows after stretching voxels of z-spacing z_scale (relative to in-plane) to isotropic."""
    return max(1, int(round(depth * z_scale)))


def tile_sides(shape: tuple[int, int, int], z_scale: float, resolution: int, tile_size: int | None) -> dict[str, int]:
    """Square tile side (in pixels of the plane) per orientation.

    Default (tile_size None): thickness tiles are native crops of `resolution` pixels; warp/weft tiles are full-depth
    squares, resized to `resolution` (their scale is recorded). A tile_size gives every orientation the same voxel
    scale instead.
    """
    if tile_size is not None:
        return {o: tile_size for o in ORIENTATIONS}
    depth = resampled_depth(shape[0], z_scale)
    return {"thickness": resolution, "warp": depth, "weft": depth}


def _extent(axis: str, shape: tuple[int, int, int], z_rows: int) -> int:
    return {"z": z_rows, "y": shape[1], "x": shape[2]}[axis]


def spread(start: int, stop: int, side: int) -> list[int]:
    """Starts of the fewest `side`-long tiles covering [start, stop), evenly spaced (the last one flush with stop)."""
    length = stop - start
    if length < side:
        return []
    n = math.ceil((length - side) / side) + 1
    return sorted({start + int(p) for p in np.linspace(0, length - side, n).round()})


def split_blocks(shape, sides, plane_map, axis: str, fraction: float, gap: int | None, where: str) -> SplitBlocks:
    """Lay out the validation block and the gap along `axis`.

    The validation block is at least as wide as the widest tile spanning the axis, so every orientation can have
    validation images; the default gap is one tile (the narrowest one spanning the axis): no two images on either
    side of it share structure closer than a tile apart.
    """
    length = shape[1] if axis == "y" else shape[2]
    along = [sides[o] for o, p in plane_map.items() if axis in (p.rows, p.cols)]
    widest = max(along) if along else 1
    val = max(int(round(fraction * length)), widest)
    gap = (min(along) if along else 1) if gap is None else gap
    train_end = length - val - gap
    if train_end < 1:
        raise UserError(
            f"{where}: {length} voxels along {axis} cannot hold a validation block of {val} and a gap of {gap} "
            f"(tiles are {widest} voxels wide); lower split.fraction / split.gap, use a smaller tile_size, "
            "or split along the other axis"
        )
    return SplitBlocks(axis, length, train_end, length - val)


def plan_tiles(
    shape: tuple[int, int, int],
    *,
    resolution: int,
    warp_axis: str = "y",
    z_scale: float = 1.0,
    tile_size: int | None = None,
    strides: dict[str, int] | None = None,
    split_axis: str = "x",
    split_fraction: float = 0.2,
    split_gap: int | None = None,
    orientations: tuple[str, ...] = ORIENTATIONS,
    where: str = "volume",
) -> tuple[list[Tile], SplitBlocks]:
    """Every tile to cut from a volume of `shape` (D, H, W), already assigned to train or validation."""
    strides = {o: 1 for o in ORIENTATIONS} | dict(strides or {})
    z_rows = resampled_depth(shape[0], z_scale)
    plane_map = {o: p for o, p in planes(warp_axis).items() if o in orientations}
    sides = tile_sides(shape, z_scale, resolution, tile_size)
    for o, p in plane_map.items():
        rows, cols = _extent(p.rows, shape, z_rows), _extent(p.cols, shape, z_rows)
        if sides[o] > min(rows, cols):
            raise UserError(
                f"{where}: {o} tile of {sides[o]} px is larger than the {rows}x{cols} {o} slice; "
                "lower --resolution or --tile-size"
            )
    blocks = split_blocks(shape, sides, plane_map, split_axis, split_fraction, split_gap, where)
    tiles = []
    for split in SPLITS:
        lo, hi = blocks.block(split)
        for o, p in plane_map.items():
            tiles += _plane_tiles(p, shape, z_rows, z_scale, sides[o], strides[o], split_axis, lo, hi, split, blocks)
    return tiles, blocks


def _plane_tiles(p: Plane, shape, z_rows, z_scale, side, stride, split_axis, lo, hi, split, blocks) -> list[Tile]:
    def span(axis: str, length: int) -> tuple[int, int]:
        return (lo, hi) if axis == split_axis else (0, length)

    n_index = shape[0] if p.normal == "z" else _extent(p.normal, shape, z_rows)
    i0, i1 = span(p.normal, n_index)
    rows = spread(*span(p.rows, _extent(p.rows, shape, z_rows)), side)
    cols = spread(*span(p.cols, _extent(p.cols, shape, z_rows)), side)
    tiles = []
    for index in range(0, n_index, stride):
        if not i0 <= index < i1:
            continue
        for r in rows:
            for c in cols:
                box = (r, r + side, c, c + side)
                fp = _footprint(p, index, box, z_scale, shape[0])
                if blocks.assign(fp) == split:
                    tiles.append(Tile(p.orientation, index, box, fp, split))
    return tiles


def _footprint(p: Plane, index: int, box, z_scale: float, depth: int) -> Footprint:
    ext = {p.normal: (index, index + 1)}
    for axis, (a, b) in ((p.rows, box[:2]), (p.cols, box[2:])):
        if axis == "z":  # resampled rows back to source pages, rounding outwards
            a, b = int(math.floor(a / z_scale)), min(depth, int(math.ceil(b / z_scale)))
        ext[axis] = (a, b)
    return Footprint(*ext["z"], *ext["y"], *ext["x"])
