"""Read 3D tomography volumes page by page, whatever layout the CT software wrote.

A volume is seen as an array of shape (D, H, W): D pages (the depth / thickness axis), each an H x W image.
`open_volume` picks the cheapest reader that fits the file:

- contiguous uncompressed TIFF (plain, BigTIFF, ImageJ, OME, big-endian too): memory-mapped read-only; after each
  slab is copied out, its pages are dropped from the process (madvise DONTNEED) so resident memory stays at one slab
  even for a volume larger than RAM;
- compressed / tiled / striped TIFF, and files whose pages were written one by one (one series per page): decoded
  one page at a time, so only the requested slab is ever held;
- a folder of 2D TIFF slices: one file per page, in natural sort order (slice_2 before slice_10).

Every reader returns copies in native byte order; nothing is written to the source.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tifffile

from ldm_finetune.core.errors import UserError

# dtype kinds we can window and quantize: unsigned/signed integers and floats (uint8, uint16, int16, float32 are
# what CT tools write; wider ones are accepted and handled on the float path).
_SUPPORTED_KINDS = "uif"
# tifffile axis letters that hold channels rather than space.
_CHANNEL_AXES = "CS"
# A lone 'C' axis longer than this is a mislabelled depth axis (ImageJ writes plain stacks as 'CYX'), not colour.
_MAX_TRUE_CHANNELS = 4


@dataclass
class Volume:
    """A read-only (D, H, W) stack; `read(z0, z1)` returns pages z0..z1-1 as a new native-order array."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    layout: str  # "memmap" | "pages" | "folder": how it is read, recorded in the manifest
    files: list[Path]  # the files read (one TIFF, or every slice of a folder): provenance for the manifest
    _read: Callable[[int, int], np.ndarray] = field(repr=False)
    _close: Callable[[], None] = field(repr=False, default=lambda: None)

    @property
    def page_nbytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.page_nbytes

    def read(self, z0: int, z1: int) -> np.ndarray:
        assert 0 <= z0 < z1 <= self.shape[0], (z0, z1, self.shape)
        return self._read(z0, z1)

    def iter_slabs(self, pages_per_slab: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (z0, slab) with slab of shape (n, H, W), n <= pages_per_slab, covering every page once in order."""
        for z0 in range(0, self.shape[0], pages_per_slab):
            yield z0, self.read(z0, min(z0 + pages_per_slab, self.shape[0]))

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: slice_2 < slice_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def open_volume(path: str | os.PathLike, channel: int | None = None) -> Volume:
    """Open a TIFF stack or a folder of 2D TIFF slices as a (D, H, W) volume; bad input raises UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, channel)
    with _tifffile_problems() as problems:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # tifffile raises several types for non-TIFF / corrupt headers
            raise UserError(f"{path}: not a readable TIFF file ({_short(exc)})") from None
        try:
            len(tif.pages)  # walk the whole IFD chain now, so a break in it is seen before any work
            volume = _open_tiff(path, tif, channel)
        except BaseException:
            tif.close()
            raise
    if problems:
        volume.close()
        raise UserError(f"{path}: damaged TIFF structure ({problems[0]}); the file may be truncated")
    return volume


@contextlib.contextmanager
def _tifffile_problems():
    """Collect what tifffile *logs* as errors (a broken IFD chain: it then silently returns fewer pages)."""
    logger = logging.getLogger("tifffile")
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            problems.append(record.getMessage().split("\n")[0])

    handler = Collect(level=logging.ERROR)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # the CLI prints one line, not tifffile's log
    try:
        yield problems
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_dtype(path: Path, dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in _SUPPORTED_KINDS:
        raise UserError(f"{path}: voxel type {dtype} is not supported (expected uint8, uint16, int16 or float32)")
    return dtype.newbyteorder("=")


@dataclass(frozen=True)
class _Layout:
    """Where depth and channel sit in a tifffile series: `index(z)` gives the series index of depth z."""

    depth_axis: int | None  # position in series.shape, None for a single 2D image
    channel_axis: int | None
    channel: int | None

    def index(self, ndim: int, z0: int, z1: int) -> tuple:
        """Numpy index selecting depths z0..z1-1 (and the chosen channel) of an ndim-dimensional series."""
        idx: list = [slice(None)] * ndim
        for ax in range(ndim - 2):
            if ax == self.depth_axis:
                idx[ax] = slice(z0, z1)
            elif ax == self.channel_axis:
                idx[ax] = self.channel
            else:
                idx[ax] = 0  # a squeezed-away or size-1 axis
        return tuple(idx)

    def page_number(self, page_shape: tuple[int, ...], z: int) -> int:
        """Index into series.pages of depth z (pages are stored in C order over the non-YX axes)."""
        coords = [z if ax == self.depth_axis else (self.channel if ax == self.channel_axis else 0)
                  for ax in range(len(page_shape))]
        return int(np.ravel_multi_index(coords, page_shape))


def _series_layout(path: Path, axes: str, shape: tuple[int, ...], channel: int | None) -> _Layout:
    """Find the depth and channel axes of a (squeezed) tifffile series, with errors a user can act on."""
    if axes.endswith("S"):  # samples inside each page (RGB): move nothing, treat 'S' like a channel axis
        space = axes[:-3]
        yx = axes[-3:-1]
    else:
        space, yx = axes[:-2], axes[-2:]
    if yx != "YX":
        raise UserError(f"{path}: unexpected TIFF axes {axes!r}; expected pages of Y x X images")
    outer = [(i, a, shape[i]) for i, a in enumerate(axes) if i < len(space) or a == "S"]
    channels = [(i, a, n) for i, a, n in outer if a in _CHANNEL_AXES and n > 1]
    depths = [(i, a, n) for i, a, n in outer if a not in _CHANNEL_AXES and n > 1]
    if not depths and len(channels) == 1 and channels[0][1] == "C" and channels[0][2] > _MAX_TRUE_CHANNELS:
        depths, channels = channels, []  # an ImageJ/OME plain stack labelled 'C'
    if len(depths) > 1:
        raise UserError(f"{path}: has several stack axes ({axes!r}, shape {shape}); prep reads one 3D stack per file")
    if not depths:
        raise UserError(
            f"{path}: is a single 2D image ({shape[-2]}x{shape[-1]}), not a volume; give a multi-page TIFF "
            "or a folder of 2D slices"
        )
    if len(channels) > 1:
        raise UserError(f"{path}: has several channel axes ({axes!r}); convert it to a single-channel stack")
    channel_axis = channels[0][0] if channels else None
    if channels:
        n_channels = channels[0][2]
        if channel is None:
            raise UserError(
                f"{path}: has {n_channels} channels (axes {axes!r}); choose one with --channel N "
                "(or 'channel:' for this volume in the prep config)"
            )
    if channel is not None:
        n_channels = shape[channel_axis] if channel_axis is not None else 1
        if not 0 <= channel < n_channels:
            raise UserError(f"{path}: channel={channel} is out of range (the file has {n_channels} channel(s))")
        if channel_axis is None:
            channel = None  # single-channel file: channel=0 is harmless
    return _Layout(depth_axis=depths[0][0], channel_axis=channel_axis, channel=channel)


def _open_tiff(path: Path, tif: tifffile.TiffFile, channel: int | None) -> Volume:
    if not tif.series:
        raise UserError(f"{path}: TIFF file holds no images")
    one_page_series = len(tif.series) > 1 and all(len(s.shape) == 2 for s in tif.series)
    if one_page_series:  # pages written one by one: tifffile reports one 2D series per page
        return _open_page_list(path, tif, [s.pages[0] for s in tif.series])
    series = tif.series[0]
    axes, shape = series.axes, tuple(series.shape)
    layout = _series_layout(path, axes, shape, channel)
    dtype = _check_dtype(path, series.dtype)
    depth = shape[layout.depth_axis]
    height, width = (shape[-3], shape[-2]) if axes.endswith("S") else (shape[-2], shape[-1])
    if axes.endswith("S"):  # samples are the last axis: put them where _Layout expects a leading channel axis
        return _open_samples(path, tif, series, layout, dtype, (depth, height, width))
    offset = series.dataoffset
    if offset is not None:
        return _open_memmap(path, tif, series, layout, dtype, (depth, height, width))
    _check_page_extents(path, tif, series.pages)
    page_shape = shape[: len(axes) - 2]

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, height, width), dtype)
        for k, z in enumerate(range(z0, z1)):
            out[k] = _decode(path, series.pages[layout.page_number(page_shape, z)])
        return out

    return Volume(path, (depth, height, width), dtype, "pages", [path], read, tif.close)


def _open_samples(path, tif, series, layout, dtype, shape3) -> Volume:
    """Pages with interleaved samples (RGB): decode each page and keep the chosen sample."""
    _check_page_extents(path, tif, series.pages)

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + shape3[1:], dtype)
        for k, z in enumerate(range(z0, z1)):
            out[k] = _decode(path, series.pages[z])[..., layout.channel]
        return out

    return Volume(path, shape3, dtype, "pages", [path], read, tif.close)


def _decode(path: Path, page) -> np.ndarray:
    try:
        return page.asarray()
    except Exception as exc:
        raise UserError(f"{path}: cannot decode a page ({_short(exc)}); the file may be truncated or corrupt") from None


def _check_page_extents(path: Path, tif: tifffile.TiffFile, pages) -> None:
    """A truncated file is the commonest corruption: catch it before any work, not halfway through."""
    size = os.path.getsize(path)
    for page in pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise UserError(f"{path}: file is truncated ({size} bytes, image data runs to {max(ends)} bytes)")


def _open_memmap(path, tif, series, layout, native: np.dtype, shape3) -> Volume:
    full_shape = tuple(series.shape)
    stored = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    nbytes = int(np.prod(full_shape)) * stored.itemsize
    size = os.path.getsize(path)
    if series.dataoffset + nbytes > size:
        raise UserError(
            f"{path}: file is truncated ({size} bytes, image data needs {series.dataoffset + nbytes} bytes)"
        )
    tif.close()  # the mapping below is all we need
    with open(path, "rb") as fh:
        mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(mapping, stored, count=int(np.prod(full_shape)), offset=series.dataoffset)
    array = array.reshape(full_shape)
    depth_stride = array.strides[layout.depth_axis]
    page = mmap.PAGESIZE

    def read(z0: int, z1: int) -> np.ndarray:
        # an explicit copy: ascontiguousarray would hand back the mapped view itself when it is already contiguous
        out = np.array(array[layout.index(len(full_shape), z0, z1)], dtype=native, order="C", copy=True)
        # Drop the mapped pages we just copied so resident memory does not grow with the volume.
        start = series.dataoffset + z0 * depth_stride
        stop = series.dataoffset + z1 * depth_stride
        if layout.depth_axis == 0 and hasattr(mapping, "madvise"):
            aligned = start - start % page
            mapping.madvise(mmap.MADV_DONTNEED, aligned, min(stop, size) - aligned)
        return out

    def close() -> None:
        nonlocal array
        array = None  # release the buffer export before closing the mapping
        try:
            mapping.close()
        except BufferError:  # a caller still holds a view; the OS unmaps at exit
            pass

    return Volume(path, shape3, native, "memmap", [path], read, close)


def _open_page_list(path: Path, tif: tifffile.TiffFile, pages: list) -> Volume:
    shape2 = tuple(pages[0].shape)
    dtype = _check_dtype(path, pages[0].dtype)
    for k, page in enumerate(pages):
        if tuple(page.shape) != shape2 or np.dtype(page.dtype) != np.dtype(pages[0].dtype):
            raise UserError(f"{path}: page {k} is {page.shape} {page.dtype}, page 0 is {shape2} {pages[0].dtype}")
    _check_page_extents(path, tif, pages)

    def read(z0: int, z1: int) -> np.ndarray:
        return np.stack([_decode(path, p) for p in pages[z0:z1]]).astype(dtype, copy=False)

    return Volume(path, (len(pages),) + shape2, dtype, "pages", [path], read, tif.close)


_SLICE_SUFFIXES = (".tif", ".tiff")


def _open_folder(folder: Path, channel: int | None) -> Volume:
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() in _SLICE_SUFFIXES),
                   key=lambda f: natural_key(f.name))
    if not files:
        raise UserError(f"{folder}: folder holds no .tif/.tiff slices")
    shapes = []
    for f in files:
        try:
            with tifffile.TiffFile(f) as t:
                s = t.series[0]
                shapes.append((tuple(s.shape), np.dtype(s.dtype), s.axes))
        except Exception as exc:
            raise UserError(f"{f}: not a readable TIFF slice ({_short(exc)})") from None
    shape0, dtype0, axes0 = shapes[0]
    for f, (shape, dtype, _) in zip(files, shapes):
        if shape != shape0 or dtype != dtype0:
            raise UserError(f"{f}: slice is {shape} {dtype} but {files[0].name} is {shape0} {dtype0}; "
                            "all slices must match")
    if len(shape0) == 3 and axes0.endswith("S"):
        if channel is None:
            raise UserError(f"{files[0]}: slices have {shape0[-1]} channels; choose one with --channel N")
        if not 0 <= channel < shape0[-1]:
            raise UserError(f"{files[0]}: channel={channel} is out of range (slices have {shape0[-1]} channels)")
        pick = lambda a: a[..., channel]  # noqa: E731
        shape0 = shape0[:2]
    elif len(shape0) == 2:
        pick = lambda a: a  # noqa: E731
    else:
        raise UserError(f"{files[0]}: a slice in a folder must be one 2D image, this one has shape {shape0}")
    dtype = _check_dtype(files[0], dtype0)

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + shape0, dtype)
        for k, f in enumerate(files[z0:z1]):
            try:
                out[k] = pick(tifffile.imread(f))
            except Exception as exc:
                raise UserError(f"{f}: cannot read slice ({_short(exc)})") from None
        return out

    return Volume(folder, (len(files),) + shape0, dtype, "folder", files, read)
