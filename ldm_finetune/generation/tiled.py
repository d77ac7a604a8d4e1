"""Any field of view from a model trained at one size: MultiDiffusion tiles (Bar-Tal et al. 2023) and seamless
(periodic) slices.

A UNet asked for an image larger than its training size repeats itself: it has never seen a field that large. Here
the UNet only ever sees tiles of its native size. At every sampling step the latent canvas is cut into overlapping
tiles, the UNet predicts each tile's noise, and the predictions are blended into one canvas-sized prediction with a
tent weight (highest at a tile's centre, where it saw the most context). The diffusers pipeline then takes its
ordinary scheduler step on the whole canvas.

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
import types
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn
from torch.nn import functional as F

from ldm_finetune.core.errors import UserError
from ldm_finetune.generation.settings import TILE_BLENDS
from ldm_finetune.models.stable_diffusion import native_side

TILE_SAMPLES = 16  # tile samples per UNet call (tiles x images x 2 for guidance): bounds memory; batching is what
# makes small tiles fast


@dataclass(frozen=True)
class Tiling:
    tile_h: int  # tile size in pixels
    tile_w: int
    overlap: float = 0.5  # share of a tile its neighbour also covers; 0 = side-by-side tiles (seams show)
    seamless: bool = False
    blend: str = "mean"  # mean: overlapping tiles' predictions averaged (MultiDiffusion); shift, rescale: below


# "rescale": the mean blend, then each image's and channel's prediction scaled about its mean so that its spread
# is the tiles' own again (the std of each tile's prediction, averaged over tiles) - as guidance rescale (Lin et
# al. 2024) restores the spread classifier-free guidance changes. Averaging overlapping predictions shrinks their
# spread where tiles disagree, which flattens the texture's contrast; the joins stay blended.
# "shift": while the layout forms (t >= SHIFT_BELOW x T) overlapping tiles are averaged as in "mean"; below it,
# side-by-side tiles whose grid moves at every UNet call (quasi-random offsets, golden-ratio steps), so each latent
# pixel gets one tile's prediction per step and no join stays in one place. Averaging overlapping predictions
# shrinks their spread, which flattens the texture's contrast; moving joins do not. Side-by-side tiles from the
# first step on leave seams, since the coarse layout is set in the noisiest steps.
GOLDEN = (0.6180339887, 0.4142135624)  # offset steps down the rows and across the columns, as shares of a tile
SHIFT_BELOW = 0.5


def plan_tiling(pipe, height: int | None, width: int | None, tile: int | None, overlap: float,
                seamless: bool, blend: str = "mean") -> Tiling | None:
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
    if blend not in TILE_BLENDS:
        raise UserError(f"--tile-blend {blend!r}: choose {' or '.join(TILE_BLENDS)}")
    if tile is None and max(height, width) <= native and not seamless:
        return None
    side = tile or native
    return Tiling(min(side, height), min(side, width), overlap, seamless, blend)


def starts(size: int, tile: int, stride: int, wrap: bool) -> list[int]:
    """Where tiles begin along one axis (latent pixels). Without wrap the last tile is flush with the far edge;
    with wrap, tiles start every `stride` around the circle and the last ones run over the edge."""
    if tile >= size:
        return [0]
    if wrap:
        return list(range(0, size, stride))
    out = list(range(0, size - tile + 1, stride))
    return out if out[-1] + tile == size else out + [size - tile]


def tent(n: int) -> torch.Tensor:
    """Weights along a tile: 0.5, 1.5, ... up to its centre and back; never zero, so a pixel only one tile covers
    keeps that tile's prediction."""
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 0.5, n - i - 0.5)


def tile_grid(tiling: Tiling, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tile, stride) down the rows, (tile, stride) across the columns), in latent pixels."""
    return tuple((t // factor, max(1, round(t // factor * (1 - tiling.overlap))))
                 for t in (tiling.tile_h, tiling.tile_w))


def windows(height: int, width: int, tiling: Tiling, factor: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, columns) latent index tensors of every tile; indices wrap modulo the canvas when seamless."""
    (th, sh), (tw, sw) = tile_grid(tiling, factor)
    return _index_tiles(starts(height, th, sh, tiling.seamless), starts(width, tw, sw, tiling.seamless),
                        (th, tw), (height, width))


def _index_tiles(row_starts: list[int], column_starts: list[int], tile: tuple[int, int], canvas: tuple[int, int]):
    """(rows, columns) index tensors of the tiles at every pair of starts, wrapping modulo the canvas."""
    return [(torch.arange(y, y + tile[0]) % canvas[0], torch.arange(x, x + tile[1]) % canvas[1])
            for y in row_starts for x in column_starts]


def shifted_starts(size: int, tile: int, offset: int, wrap: bool) -> list[int]:
    """Side-by-side tile starts moved back by `offset`: with wrap around the circle, else clamped inside the canvas
    (the edge tiles then overlap their neighbour a little)."""
    if tile >= size:
        return [0]
    if wrap:
        return [(s - offset) % size for s in range(0, size, tile)]
    return sorted({min(max(s, 0), size - tile) for s in range(-offset, size, tile)})


def shifted_windows(height: int, width: int, tiling: Tiling, factor: int, call: int):
    """The tiles of the `call`-th UNet call under the shift blend."""
    (th, _), (tw, _) = tile_grid(tiling, factor)
    dy, dx = (int(call * g % 1 * t) for g, t in zip(GOLDEN, (th, tw)))
    return _index_tiles(shifted_starts(height, th, dy, tiling.seamless),
                        shifted_starts(width, tw, dx, tiling.seamless), (th, tw), (height, width))


def tiled_forward(unet: nn.Module, tiling: Tiling, factor: int, train_steps: int = 1000):
    """A forward for `unet` that predicts a canvas of any size from native-size tiles (see the module docstring)."""
    forward = unet.forward  # bound: whatever forward the UNet has now (hooks included)
    (th, _), (tw, _) = tile_grid(tiling, factor)
    tent_weight, flat_weight = tent(th)[:, None] * tent(tw)[None, :], torch.ones(th, tw)
    layouts = {}  # canvas (height, width) -> its overlapping tiles: the same at every step
    calls = [0]  # shifted calls so far: the shift blend moves its grid at each

    def blended(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        batch, _, height, width = sample.shape
        t = float(torch.as_tensor(timestep).flatten()[0])
        if tiling.blend == "shift" and t < SHIFT_BELOW * train_steps:
            tiles, weight = shifted_windows(height, width, tiling, factor, calls[0]), flat_weight
            calls[0] += 1
        else:
            if (height, width) not in layouts:
                layouts[height, width] = windows(height, width, tiling, factor)
            tiles, weight = layouts[height, width], tent_weight
        weight_here = weight.to(sample.device, sample.dtype)
        total = torch.zeros_like(sample)
        weights = torch.zeros(height, width, device=sample.device, dtype=sample.dtype)
        rescale = tiling.blend == "rescale" and len(tiles) > 1
        tile_std = torch.zeros(batch, sample.shape[1], device=sample.device, dtype=sample.dtype)
        per_call = max(1, TILE_SAMPLES // batch)
        for chunk in range(0, len(tiles), per_call):
            group = tiles[chunk:chunk + per_call]
            crops = torch.cat([sample[:, :, rows][:, :, :, columns] for rows, columns in group])
            context = encoder_hidden_states.repeat(len(group), *[1] * (encoder_hidden_states.dim() - 1))
            predicted = forward(crops, timestep, context, *args, return_dict=False, **kwargs)[0]
            for (rows, columns), prediction in zip(group, predicted.split(batch)):
                total[:, :, rows[:, None], columns] += prediction * weight_here
                weights[rows[:, None], columns] += weight_here
                if rescale:  # only the rescale blend needs the tiles' own spread
                    tile_std += prediction.std(dim=(2, 3)) / len(tiles)
        blended_prediction = total / weights
        if rescale:
            blended_prediction = with_spread(blended_prediction, tile_std)
        return UNet2DConditionOutput(sample=blended_prediction) if return_dict else (blended_prediction,)

    return types.MethodType(blended, unet)


def with_spread(prediction: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`prediction` (B, C, h, w) scaled about each image's and channel's mean to the standard deviation `std`
    (B, C)."""
    mean = prediction.mean(dim=(2, 3), keepdim=True)
    own = prediction.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return mean + (prediction - mean) * (std[:, :, None, None] / own)


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
        forward = tiled_forward(unet, tiling, factor, pipe.scheduler.config.num_train_timesteps)
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
