"""A seeded synthetic CT volume of a 3D-woven (layer-to-layer angle-interlock) carbon composite.

Real volumes are private, so tests, the demo and the benchmarks use this phantom. Axes are (z, y, x): z is the
thickness (page) axis. The textile is built analytically, voxel by voxel, so any slab of pages can be made on its own
(big volumes are generated and written slab by slab in bounded memory):
- weft yarns run along y, in `N_LAYERS` layers, one column every `pitch_x` along x, with a little crimp;
- warp (stuffer) yarns run along x, between the weft layers, one every `pitch_y` along y;
- binder yarns run along x between the stuffers and zig-zag through the whole thickness over two weft columns;
- each yarn carries a fibre texture: a fine 2D random field in its cross-section, extruded along the yarn, so fibres
  look like dots in cross-section and streaks lengthwise;
- between yarns: air (dry, dry-compacted) or resin with a few air voids (injected);
- then CT optics: Gaussian blur, Gaussian noise, and optional ring artefacts around the rotation (z) axis.

The three process states follow the study (DESIGN.md): dry-compacted is about 0.55 of the dry thickness with flattened,
wider yarns; injected about 0.8, resin-filled. `--shape` gives the dry volume; the others keep its H x W.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from ldm_finetune.core.io import atomic_path

STATES = ("dry", "dry-compacted", "injected")
N_LAYERS = 5  # weft layers through the thickness
# label values of `PhantomVolume.labels`
MATRIX, WARP, WEFT, BINDER, VOID = 0, 1, 2, 3, 4

# grey levels in [0, 1] before CT blur and noise
AIR, RESIN, YARN = 0.06, 0.42, 0.74
TEXTURE_AMPLITUDE = 0.07
BLUR_SIGMA = 0.8  # voxels: the CT point-spread function
NOISE_SIGMA = 0.035
# uint16 output: grey 0 -> 8000, grey 1 -> 58000 (headroom so noise never clips)
GREY_OFFSET, GREY_SCALE = 8000.0, 50000.0


@dataclass(frozen=True)
class StateSpec:
    depth_ratio: float  # thickness relative to the dry volume
    flatten: float  # yarn half-height relative to dry
    widen: float  # yarn half-width relative to dry
    matrix: float  # grey level between yarns
    voids_per_mvoxel: float  # air voids per million voxels (injected only)


STATE_SPECS = {
    "dry": StateSpec(1.0, 1.0, 1.0, AIR, 0.0),
    "dry-compacted": StateSpec(0.55, 0.62, 1.15, AIR, 0.0),
    "injected": StateSpec(0.8, 0.85, 1.05, RESIN, 4.0),
}


@dataclass(frozen=True)
class Weave:
    """Yarn geometry in voxels, derived from the dry thickness so the weave keeps its proportions at any size."""

    layer: float  # spacing between weft layers (z)
    top: float  # z of the first weft layer
    pitch_x: float  # weft column spacing
    pitch_y: float  # stuffer spacing
    weft_a: float  # weft half-width (x)
    weft_b: float  # weft half-height (z)
    warp_a: float  # stuffer half-width (y)
    warp_b: float
    binder_a: float
    binder_b: float
    crimp: float  # crimp amplitude (z)

    @staticmethod
    def for_state(dry_depth: int, spec: StateSpec) -> "Weave":
        unit = dry_depth / (N_LAYERS + 1)  # dry layer spacing
        layer = unit * spec.depth_ratio
        return Weave(
            layer=layer,
            top=layer,
            pitch_x=2.8 * unit,
            pitch_y=2.6 * unit,
            weft_a=1.15 * unit * spec.widen,
            weft_b=0.30 * unit * spec.flatten,
            warp_a=1.0 * unit * spec.widen,
            warp_b=0.21 * unit * spec.flatten,
            binder_a=0.45 * unit * spec.widen,
            binder_b=0.22 * unit * spec.flatten,
            crimp=0.06 * unit * spec.depth_ratio,
        )


def state_shape(state: str, dry_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    d, h, w = dry_shape
    return max(8, int(round(d * STATE_SPECS[state].depth_ratio))), h, w


def _periodic(u: np.ndarray, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Offset from the nearest yarn centre on a grid of `pitch` (centres at pitch/2 + k*pitch), and that k."""
    k = np.floor(u / pitch)
    return u - (k + 0.5) * pitch, k


class PhantomVolume:
    """Pages of one state's phantom, generated on demand: `labels(z0, z1)` and `grey(z0, z1)` / `pages(z0, z1)`."""

    def __init__(self, state: str, dry_shape: tuple[int, int, int], seed: int = 0, rings: bool = False):
        if state not in STATE_SPECS:
            raise ValueError(f"unknown phantom state {state!r}; expected one of {', '.join(STATES)}")
        self.state, self.spec, self.seed, self.rings = state, STATE_SPECS[state], seed, rings
        self.shape = state_shape(state, dry_shape)
        self.weave = Weave.for_state(dry_shape[0], self.spec)
        rng = np.random.default_rng([seed, STATES.index(state)])
        d, h, w = self.shape
        # fibre texture in each yarn family's cross-section: (z, y) for yarns along x, (z, x) for yarns along y
        self._tex_x = self._texture(rng, (d, h))
        self._tex_y = self._texture(rng, (d, w))
        self._phase = rng.uniform(0, 2 * math.pi, size=4)
        self._voids = self._void_list(rng)
        self._ring_profile = self._rings(rng) if rings else None

    @staticmethod
    def _texture(rng, shape) -> np.ndarray:
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.7)
        return field / (field.std() + 1e-8)

    def _void_list(self, rng) -> np.ndarray:
        d, h, w = self.shape
        n = rng.poisson(self.spec.voids_per_mvoxel * d * h * w / 1e6)
        centres = rng.uniform((0, 0, 0), (d, h, w), size=(n, 3))
        radii = rng.uniform(1.2, 3.5, size=(n, 1)) * np.array([[0.7, 1.0, 1.6]])  # flat, elongated along x
        return np.hstack([centres, radii])

    def _rings(self, rng) -> np.ndarray:
        h, w = self.shape[1:]
        r = np.hypot(*np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij"))
        profile = np.zeros_like(r, dtype=np.float32)
        for radius in rng.uniform(0, 0.5 * math.hypot(h, w), size=6):
            profile += rng.choice([-1, 1]) * 0.04 * np.exp(-0.5 * ((r - radius) / 0.8) ** 2)
        return profile

    def labels(self, z0: int, z1: int) -> np.ndarray:
        """Material label per voxel for pages z0..z1-1: MATRIX, WARP, WEFT, BINDER or VOID; shape (n, H, W)."""
        wv, (_, h, w) = self.weave, self.shape
        z = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        y = np.arange(h, dtype=np.float32)[None, :, None]
        x = np.arange(w, dtype=np.float32)[None, None, :]
        out = np.zeros((z1 - z0, h, w), np.uint8)
        # stuffer (warp) yarns: along x, between weft layers l and l+1, crimped along x
        dy, _ = _periodic(y, wv.pitch_y)
        zc = wv.top + 0.5 * wv.layer + wv.crimp * np.sin(2 * math.pi * x / wv.pitch_x + self._phase[0])
        dz = (z - zc) - wv.layer * np.clip(np.round((z - zc) / wv.layer), 0, N_LAYERS - 2)
        out[(dy / wv.warp_a) ** 2 + (dz / wv.warp_b) ** 2 < 1] = WARP
        # weft yarns: along y, one column every pitch_x, in N_LAYERS layers, crimped along y
        dx, _ = _periodic(x, wv.pitch_x)
        zc = wv.top + wv.crimp * np.sin(2 * math.pi * y / wv.pitch_y + self._phase[1])
        dz = (z - zc) - wv.layer * np.clip(np.round((z - zc) / wv.layer), 0, N_LAYERS - 1)
        out[(dx / wv.weft_a) ** 2 + (dz / wv.weft_b) ** 2 < 1] = WEFT
        # binders: along x, halfway between stuffers, zig-zagging from the top to the bottom layer and back over
        # two weft columns; neighbours are half a period out of phase (the angle-interlock pattern)
        dyb, kb = _periodic(y + 0.5 * wv.pitch_y, wv.pitch_y)
        period = 2 * wv.pitch_x
        t = ((x / period + 0.5 * kb) % 1.0)
        tri = 1 - np.abs(2 * t - 1)  # 0 -> 1 -> 0 over one period
        amplitude = (N_LAYERS - 1) * wv.layer + 2 * (wv.weft_b + wv.binder_b)
        zb = (wv.top - wv.weft_b - wv.binder_b) + tri * amplitude
        slope = amplitude / (0.5 * period)  # dz/dx along each straight leg
        half_height = wv.binder_b * math.sqrt(1 + slope**2)  # keep the yarn's thickness measured across its path
        out[(dyb / wv.binder_a) ** 2 + ((z - zb) / half_height) ** 2 < 1] = BINDER
        for cz, cy, cx, rz, ry, rx in self._voids:
            if z0 - rz <= cz < z1 + rz:
                inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
                out[inside & (out == MATRIX)] = VOID
        return out

    def grey(self, z0: int, z1: int) -> np.ndarray:
        """Noise-free, unblurred grey levels in [0, 1] for pages z0..z1-1 (float32)."""
        lab = self.labels(z0, z1)
        grey = np.full(lab.shape, self.spec.matrix, np.float32)
        grey[lab == VOID] = AIR
        along_x = (lab == WARP) | (lab == BINDER)
        along_y = lab == WEFT
        grey[along_x] = (YARN + TEXTURE_AMPLITUDE * self._tex_x[z0:z1, :, None].repeat(lab.shape[2], 2))[along_x]
        grey[along_y] = (YARN + TEXTURE_AMPLITUDE * self._tex_y[z0:z1, None, :].repeat(lab.shape[1], 1))[along_y]
        return grey

    def pages(self, z0: int, z1: int) -> np.ndarray:
        """Final CT-like uint16 pages z0..z1-1: blurred, noisy, with optional rings; independent of slab size."""
        d = self.shape[0]
        halo = int(math.ceil(4 * BLUR_SIGMA))
        a, b = max(0, z0 - halo), min(d, z1 + halo)
        grey = ndimage.gaussian_filter(self.grey(a, b), BLUR_SIGMA, mode="nearest")[z0 - a : z1 - a]
        for k, z in enumerate(range(z0, z1)):  # per-page noise streams: same volume whatever the slab size
            grey[k] += NOISE_SIGMA * np.random.default_rng([self.seed, STATES.index(self.state), 7, z]).standard_normal(
                grey.shape[1:], dtype=np.float32
            )
        if self._ring_profile is not None:
            grey += self._ring_profile
        return np.clip(GREY_OFFSET + GREY_SCALE * grey, 0, 65535).astype(np.uint16)

    def array(self) -> np.ndarray:
        return self.pages(0, self.shape[0])


def write_volume_tiff(path: Path, phantom: PhantomVolume, pages_per_slab: int = 16) -> Path:
    """Write the phantom as an uncompressed TIFF stack (BigTIFF past 2 GiB), slab by slab, atomically."""
    d, h, w = phantom.shape
    bigtiff = d * h * w * 2 > 2**31

    def page_iter():
        for z0 in range(0, d, pages_per_slab):
            yield from phantom.pages(z0, min(d, z0 + pages_per_slab))

    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            tif.write(page_iter(), shape=(d, h, w), dtype=np.uint16, photometric="minisblack",
                      metadata={"axes": "ZYX", "phantom_state": phantom.state, "seed": phantom.seed})
    return path


def write_phantoms(out_dir: str | os.PathLike, dry_shape=(96, 192, 256), seed: int = 0, rings: bool = False,
                   states=STATES) -> dict[str, Path]:
    """Write `OUT/{state}.tif` for each state; returns state -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {s: write_volume_tiff(out / f"{s}.tif", PhantomVolume(s, tuple(dry_shape), seed, rings)) for s in states}
