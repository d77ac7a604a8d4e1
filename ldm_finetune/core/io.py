"""Files and images, the common base every layer uses: atomic writes (a killed run never leaves a truncated file or
a half-written folder), reading images at full precision, and the one float -> integer image conversion."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

# zlib level for PNG: 1 is ~4x faster to write than the default 6 and only ~10 % larger on CT slices.
PNG_COMPRESS_LEVEL = 1


def files_sha256(files: list[Path]) -> str:
    """sha256 over the bytes of `files` in order (one file: what `sha256sum` prints), read in 16 MiB chunks."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); a shared model file gets the permissions a plain open() would give
        # it, so a ComfyUI / A1111 server running as another user can read it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it becomes `path` (replacing it if `overwrite`).

    The old folder is moved aside first and removed only after the new one is in place, so at every instant either the
    old or the new complete folder exists under `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            assert overwrite, path
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_png(path: Path, image: np.ndarray) -> None:
    """Grey PNG: uint8 -> 8-bit, uint16 -> 16-bit (written as such, never through an 8-bit cast)."""
    assert image.ndim == 2 and image.dtype in (np.uint8, np.uint16), (image.shape, image.dtype)
    Image.fromarray(image).save(path, compress_level=PNG_COMPRESS_LEVEL)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}


def read_pixels(path: Path) -> tuple[np.ndarray, float]:
    """The decoded pixels in their own type (uint8 / uint16 / float32; grey (H, W) or RGB (H, W, 3)) and the
    value of full scale. Kept apart from the float conversion so worker processes can send compact arrays."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img), 65535.0  # 16-bit slices stay 16-bit
        if img.mode == "L":
            return np.asarray(img), 255.0
        if img.mode in ("P", "1", "LA"):
            return np.asarray(img.convert("L")), 255.0
        if img.mode == "F":
            return np.asarray(img, dtype=np.float32), 1.0
        return np.asarray(img.convert("RGB")), 255.0


def load_image(path: Path) -> np.ndarray:
    """(H, W) float32 in [0, 1] for grey images of any bit depth, (H, W, 3) for colour ones."""
    pixels, full_scale = read_pixels(path)
    return pixels.astype(np.float32) / np.float32(full_scale)


def quantize(unit: np.ndarray, bits: int = 8) -> np.ndarray:
    """[0, 1] floats -> uint8 or uint16, clipped and rounded once (the one float -> integer image conversion; the
    16-bit path never passes through 8 bits)."""
    assert bits in (8, 16), bits
    top = np.float32(255.0 if bits == 8 else 65535.0)
    return np.rint(np.clip(unit, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)


def to_image(array: np.ndarray, grayscale: bool = False) -> Image.Image:
    """(H, W, 3) floats in [0, 1] (a pipeline's numpy output) -> an RGB or grey PIL image."""
    data = quantize(array)
    if grayscale:
        return Image.fromarray(data.mean(axis=2).round().astype(np.uint8), mode="L")
    return Image.fromarray(data)


def slug(text: str, limit: int = 60, empty: str = "prompt") -> str:
    """A prompt as a file-name part: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or empty
