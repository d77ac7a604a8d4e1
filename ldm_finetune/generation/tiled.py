"""Any field of view from a model trained at one size: MultiDiffusion tiles (Bar-Tal et al. 2023) and seamless
(periodic) slices.

A UNet asked for an image larger than its training size repeats itself: it has never seen a field that large. Here
the UNet only ever sees tiles of its native size. At every sampling step the latent canvas is cut into overlapping
tiles, the UNet predicts each tile's noise, and the predictions are blended into one canvas-sized prediction with a
Hann weight (highest at a tile's centre, where it saw the most context, and near zero at its edges, where it saw the
least: a tile's edge is where a join would show). The diffusers pipeline then takes its ordinary scheduler step on
the whole canvas.

The tile grid moves by one latent pixel at every UNet call, cycling through its stride from the same start in every
sampling run (the first and last tiles stay flush with the canvas edges). With a fixed grid the tile edges sit on
the same latent columns at every step, and those columns show: a seamless slice's wrap edge, always a tile edge,
scored 1.22 (benchmarks/README.md, on the pooled seam score of the time; 1.08 with the moving grid). Moving the
grid makes every column an edge equally often. Side-by-side tiles (overlap 0) keep their grid: they are the
reference that shows what a seam looks like.

Blending the noise prediction instead of each tile's stepped latent (the paper's form) gives the same result for
DDIM and every other scheduler whose step is linear in the prediction, and it keeps multistep schedulers' state
(DPM++, PNDM, UniPC) and ancestral samplers' fresh noise whole, drawn once for the canvas rather than averaged over
tiles. The UNet's memory is bounded by TILE_SAMPLES, not by the output; the VAE decodes in diffusers' own
overlapping tiles once the output is larger than its training size.

`seamless` makes the slice periodic, like the weave it depicts: the tiles wrap around the canvas edges, and along an
axis that one tile covers whole the UNet's convolutions pad circularly; the VAE decodes the whole canvas with
circular padding (its memory then grows with the output).
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn
from torch.nn import functional as F

from ldm_finetune.core.errors import UserError
from ldm_finetune.generation.settings import GenerateSettings
from ldm_finetune.models.stable_diffusion import native_side

TILE_SAMPLES = 16  # tile samples per UNet call (tiles x images x 2 for guidance): bounds memory; batching is what
# makes small tiles fast


@dataclass(frozen=True)
class Tiling:
    tile_h: int  # tile size in pixels
    tile_w: int
    overlap: float = GenerateSettings.tile_overlap  # share of a tile its neighbour also covers; 0: side by side
    seamless: bool = False



def plan_tiling(pipe, height: int | None, width: int | None, tile: int | None, overlap: float,
                seamless: bool) -> Tiling | None:
    """The tiling for an output of height x width, or None when the plain pipeline draws it (native size or less,
    no --tile, not seamless). Bad combinations are one-line errors."""
    native = native_side(pipe)
    height, width = height or native, width or native
    step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # the UNet's latent stride
    if tile is not None and (tile <= 0 or tile % step):
        raise UserError(f"--tile {tile}: must be a positive multiple of {step} (the VAE factor times the UNet's "
                        "downsampling)")
    if tile is not None and tile > min(height, width):
        raise UserError(f"--tile {tile}: larger than the output ({width} x {height}); use --tile "
                        f"{min(height, width) // step * step} or less")
    if not 0 <= overlap < 1:
        raise UserError(f"--tile-overlap {overlap}: must be at least 0 and below 1")
    if tile is None and max(height, width) <= native and not seamless:
        return None
    side = tile or native
    return Tiling(min(side, height), min(side, width), overlap, seamless)


def starts(size: int, tile: int, stride: int, wrap: bool, offset: int = 0) -> list[int]:
    """Where tiles begin along one axis (latent pixels), the grid moved by `offset` (modulo the stride; only
    overlapping tiles move). Without wrap the first and last tiles are flush with the edges; with wrap, tiles start
    every `stride` around the circle and the last ones run over the edge."""
    if tile >= size:
        return [0]
    offset = offset % stride if stride < tile else 0
    if wrap:
        return list(range(offset, offset + size, stride))
    out = ([0] if offset else []) + list(range(offset, size - tile + 1, stride))
    return out if out[-1] + tile == size else out + [size - tile]


def hann(n: int) -> torch.Tensor:
    """Weights along a tile: sin^2 of the pixel centres' position, small at the edges and largest at the centre; never
    zero, so a pixel only one tile covers keeps that tile's prediction. At 50 % overlap neighbours' weights sum to
    one. Against a linear tent (benchmarks/README.md) it gives the pixels next to an edge far less weight (0.04 and
    0.31 of the centre's, against 0.14 and 0.43, for an 8-pixel tile), and the joins stop showing."""
    return torch.sin(torch.pi * (torch.arange(n, dtype=torch.float32) + 0.5) / n) ** 2


def tile_grid(tiling: Tiling, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tile, stride) down the rows, (tile, stride) across the columns), in latent pixels."""
    return tuple((t // factor, max(1, round(t // factor * (1 - tiling.overlap))))
                 for t in (tiling.tile_h, tiling.tile_w))


def windows(height: int, width: int, tiling: Tiling, factor: int,
            offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, columns) latent index tensors of every tile, the grid moved by `offset` along both axes; indices wrap
    modulo the canvas when seamless."""
    (th, sh), (tw, sw) = tile_grid(tiling, factor)
    return [(torch.arange(y, y + th) % height, torch.arange(x, x + tw) % width)
            for y in starts(height, th, sh, tiling.seamless, offset)
            for x in starts(width, tw, sw, tiling.seamless, offset)]


def tiled_forward(unet: nn.Module, tiling: Tiling, factor: int):
    """A forward for `unet` that predicts a canvas of any size from native-size tiles (see the module docstring)."""
    forward = unet.forward  # bound: whatever forward the UNet has now (hooks included)
    (th, sh), (tw, sw) = tile_grid(tiling, factor)
    tile_weight = hann(th)[:, None] * hann(tw)[None, :]
    layouts = {}  # (canvas height, width, grid offset) -> its overlapping tiles
    run = {"call": -1, "t": math.inf}  # the last call's index in its sampling run, and its timestep

    def blended(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        batch, _, height, width = sample.shape
        t = float(torch.as_tensor(timestep).flatten()[0])
        # a timestep above the last one starts a new sampling run: its grid starts where every run's does, so a
        # seed draws the same image whatever was drawn before it
        run["call"] = 0 if t > run["t"] else run["call"] + 1
        run["t"] = t
        offset = run["call"] % math.lcm(sh, sw)  # the grid moves one latent pixel per call (module docstring)
        if (height, width, offset) not in layouts:
            layouts[height, width, offset] = windows(height, width, tiling, factor, offset)
        tiles, weight = layouts[height, width, offset], tile_weight.to(sample.device, sample.dtype)
        total = torch.zeros_like(sample)
        weights = torch.zeros(height, width, device=sample.device, dtype=sample.dtype)
        per_call = max(1, TILE_SAMPLES // batch)
        for chunk in range(0, len(tiles), per_call):
            group = tiles[chunk:chunk + per_call]
            crops = torch.cat([sample[:, :, rows][:, :, :, columns] for rows, columns in group])
            context = encoder_hidden_states.repeat(len(group), *[1] * (encoder_hidden_states.dim() - 1))
            predicted = forward(crops, timestep, context, *args, return_dict=False, **kwargs)[0]
            for (rows, columns), prediction in zip(group, predicted.split(batch)):
                total[:, :, rows[:, None], columns] += prediction * weight
                weights[rows[:, None], columns] += weight
        blended_prediction = total / weights
        return UNet2DConditionOutput(sample=blended_prediction) if return_dict else (blended_prediction,)

    return types.MethodType(blended, unet)


def _periodic_conv(wrap_h: bool, wrap_w: bool):
    """A Conv2d forward that pads circularly along the wrapped axes and with zeros along the others."""

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        x = F.pad(x, (pw, pw, 0, 0), mode="circular" if wrap_w else "constant")
        x = F.pad(x, (0, 0, ph, ph), mode="circular" if wrap_h else "constant")
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    return conv


@contextlib.contextmanager
def replaced_forward(module: nn.Module, forward):
    """Within the block, `module.forward` is `forward`; afterwards whatever it was (an instance attribute set by
    someone else, or the class's own)."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


@contextlib.contextmanager
def periodic(module: nn.Module, wrap_h: bool, wrap_w: bool):
    """Within the block, every padded Conv2d in `module` pads circularly along the wrapped axes."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)]
    with contextlib.ExitStack() as stack:
        for conv in convs if wrap_h or wrap_w else []:
            stack.enter_context(replaced_forward(conv, types.MethodType(_periodic_conv(wrap_h, wrap_w), conv)))
        yield


@contextlib.contextmanager
def tiled(pipe, tiling: Tiling | None, height: int, width: int):
    """Within the block, `pipe` draws height x width px images with `tiling` (nothing changes when it is None)."""
    if tiling is None:
        yield
        return
    unet, vae, factor = pipe.unet, pipe.vae, pipe.vae_scale_factor
    single_h, single_w = tiling.tile_h >= height, tiling.tile_w >= width  # one tile spans that axis
    decode_whole = tiling.seamless or max(height, width) <= native_side(pipe)
    if not decode_whole:
        vae.enable_tiling()
    try:
        forward = tiled_forward(unet, tiling, factor)
        with replaced_forward(unet, forward), \
                periodic(unet, tiling.seamless and single_h, tiling.seamless and single_w), \
                periodic(vae.decoder, tiling.seamless, tiling.seamless):
            yield
    finally:
        if not decode_whole:
            vae.disable_tiling()


def tile_joins(height: int, width: int, tiling: Tiling, factor: int) -> tuple[list[int], list[int]]:
    """Pixel rows and columns where a tile begins or ends inside the image (the canvas edges excluded): where a seam
    would show."""
    joins = []
    for size, (tile, stride) in zip((height // factor, width // factor), tile_grid(tiling, factor)):
        edges = {(e % size) * factor for s in starts(size, tile, stride, tiling.seamless) for e in (s, s + tile)}
        joins.append(sorted(edges - {0}))
    return joins[0], joins[1]
