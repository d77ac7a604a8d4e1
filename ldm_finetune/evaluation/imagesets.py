"""Image sets for evaluation: real slices from a prep output (with their state x orientation class), and generated
images from folders (one sub-folder per class, or flat).

A class is written `state/orientation` (e.g. `dry/thickness`); as a folder name '/' becomes '__'
(`dry-compacted__warp`), which keeps state names that contain '-' unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_finetune.core.classes import class_from_folder, row_class
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import IMAGE_SUFFIXES
from ldm_finetune.data.records import read_records, select_records
from ldm_finetune.evaluation.metrics import load_set, resize_set


@dataclass
class ImageSet:
    name: str
    images: np.ndarray  # (N, H, W) float32 in [0, 1]
    classes: list[str | None]  # per image; None when unknown
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def of_class(self, cls: str | None) -> "ImageSet":
        if cls is None:
            return self
        keep = [i for i, c in enumerate(self.classes) if c == cls]
        return ImageSet(self.name, self.images[keep], [cls] * len(keep), [self.paths[i] for i in keep])

    def known_classes(self) -> list[str]:
        return sorted({c for c in self.classes if c is not None})


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load(paths: list[Path], size: int | None, what: str) -> np.ndarray:
    if not paths:
        raise UserError(f"{what}: no images found")
    try:
        return load_set(paths, size)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}; pass --size N to compare at N x N px") from None


def load_real(folder: Path, split: str, size: int | None, max_images: int | None = None) -> ImageSet:
    """A prep split (metadata gives each image's class) or a plain folder of images."""

    folder = Path(folder)
    split_dir = folder / split if (folder / split / "metadata.jsonl").is_file() else folder
    if (split_dir / "metadata.jsonl").is_file():
        records = read_records(split_dir)
        if max_images:
            records = _per_class_cap(records, max_images)
        classes = [row_class(r.meta) if "state" in r.meta else None
                   for r in records]
        paths = [r.path for r in records]
    else:
        if not folder.is_dir():
            raise UserError(f"--real {folder}: not a folder")
        paths = _image_files(folder)[:max_images] if max_images else _image_files(folder)
        classes = [None] * len(paths)
    return ImageSet(f"real-{split}", _load(paths, size, f"real images in {split_dir}"), classes, paths)


def _per_class_cap(records, cap: int):
    """At most `cap` images per class, spread evenly along each class's slices."""

    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(row_class(r.meta), []).append(r)
    out = []
    for name in sorted(groups):
        out += select_records(groups[name], {}, cap)
    return out


def load_generated(folder: Path, name: str, size: int | None) -> ImageSet:
    """DIR/<state>__<orientation>/*.png (classes known), a folder with prep's metadata.jsonl (`generate --dataset`:
    classes from its state and orientation columns), or DIR/*.png (one unlabelled set)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--generated {folder}: not a folder")
    if (folder / "metadata.jsonl").is_file():
        records = read_records(folder)
        classes = [row_class(r.meta) if r.meta.get("state") and r.meta.get("orientation") else None
                   for r in records]
        paths = [r.path for r in records]
        return ImageSet(name, _load(paths, size, f"generated images in {folder}"), classes, paths)
    paths, classes = [], []
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p))
    for sub in subfolders:
        if sub.name in ("probes", "trajectory"):
            continue
        files = _image_files(sub)
        paths += files
        classes += [class_from_folder(sub.name)] * len(files)
    if not paths:
        paths = _image_files(folder)
        classes = [None] * len(paths)
    return ImageSet(name, _load(paths, size, f"generated images in {folder}"), classes, paths)


def load_rgb(path: Path | str) -> np.ndarray:
    """One image file as (H, W, 3) floats in [0, 1] (colour kept: the drift probes score colourfulness)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def resized(images: ImageSet, side: int) -> ImageSet:
    """The same set at side x side px."""
    return ImageSet(images.name, resize_set(images.images, side), images.classes, images.paths)


def check_sizes(real: ImageSet, generated: ImageSet) -> None:
    if real.images.shape[1:] != generated.images.shape[1:]:
        raise UserError(f"real slices are {real.images.shape[2]}x{real.images.shape[1]} px but {generated.name} "
                        f"images are {generated.images.shape[2]}x{generated.images.shape[1]}; pass --size N to "
                        "compare both at N x N px")
