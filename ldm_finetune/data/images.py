"""Datasets of training images: grey slices read at full precision, resized and cropped to the training side,
as (3, R, R) for SD's VAE or (1, R, R) for the pixel DDPM, in [-1, 1]; and the batch collation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ldm_finetune.core.io import load_image
from ldm_finetune.data.records import Record, class_name


# how training resizes; latent caches are keyed on it (data.caches), so a change re-encodes them
RESAMPLING = {"shrink": Image.Resampling.BOX, "enlarge": Image.Resampling.BICUBIC}


def _resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float image channel by channel (PIL's 'F' mode keeps full precision). Shrinking averages each output
    pixel's area (BOX), as a coarser detector would bin the voxels: grey levels stay in the scan's range, and the
    model learns the slices the evaluation compares it with (evaluation.metrics downsamples real slices the same
    way). Bicubic's sharpening lobes made other slices: the evaluation's classifier reads real validation slices
    shrunk from 64 to 32 px right 85 % of the time with BOX, 78 % with bicubic (benchmarks/demo_concepts.py
    --ceiling). Enlarging stays bicubic."""
    if array.shape[:2] == size[::-1]:
        return array
    if array.ndim == 2:
        shrinking = size[0] <= array.shape[1] and size[1] <= array.shape[0]
        method = RESAMPLING["shrink" if shrinking else "enlarge"]
        return np.asarray(Image.fromarray(array, mode="F").resize(size, method))
    return np.stack([_resize_float(array[..., c], size) for c in range(array.shape[2])], axis=-1)


def to_pixel_values(array: np.ndarray, resolution: int, center_crop: bool = True, flip: bool = False,
                    rng: np.random.Generator | None = None, rgb: bool = True) -> torch.Tensor:
    """Shorter side -> resolution, square crop, optional flip; returns (3, R, R) in [-1, 1] ((1, R, R) for a grey
    image with rgb=False: the pixel DDPM models one channel)."""
    h, w = array.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    array = _resize_float(array, (nw, nh))
    if center_crop or rng is None:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    array = array[top:top + resolution, left:left + resolution]
    if flip:
        array = array[:, ::-1]
    planes = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    tensor = (torch.from_numpy(np.require(planes, requirements=["C", "W"])).clamp(0, 1) * 2.0 - 1.0).float()
    # grey CT -> the RGB input SD's VAE was trained on (or kept as one channel): the plane is scaled once and then
    # copied (at 512 px: 0.5 ms an image, against 2.8 ms for scaling three planes in numpy and torch)
    return tensor.repeat(3, 1, 1) if array.ndim == 2 and rgb else tensor


class CaptionedImages(torch.utils.data.Dataset):
    """Items {"index", "caption"} plus "pixel_values" (3, R, R) unless latents come from a cache."""

    def __init__(self, records: list[Record], resolution: int, center_crop: bool = True, random_flip: bool = False,
                 repeats: int = 1, load_pixels: bool = True):
        self.records, self.resolution = records, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.repeats, self.load_pixels = repeats, load_pixels

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def pixels(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        flip = bool(self.random_flip and rng is not None and rng.random() < 0.5)
        return to_pixel_values(load_image(self.records[index].path), self.resolution, self.center_crop, flip, rng)

    def __getitem__(self, i: int) -> dict:
        index = i % len(self.records)
        record = self.records[index]
        item = {"index": index, "caption": record.caption}
        if "prior_prompt" in record.meta:
            item["prior_prompt"] = record.meta["prior_prompt"]
        if self.load_pixels:
            rng = None
            if self.random_flip or not self.center_crop:
                # augmentation randomness from torch's RNG, so it is seeded and restored on resume like the rest
                rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
            item["pixel_values"] = self.pixels(index, rng)
        return item


class PairedImages(torch.utils.data.Dataset):
    """DreamBooth with prior preservation: every instance item comes with a class item (keys prefixed class_)."""

    def __init__(self, instance: CaptionedImages, prior: CaptionedImages):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, i: int) -> dict:
        item = dict(self.instance[i % len(self.instance)])
        item.update({f"class_{k}": v for k, v in self.prior[i % len(self.prior)].items()})
        return item


def collate(items: list[dict]) -> dict:
    """Tensors stacked (pixel_values: (B, 3, R, R)), indices as a tensor, strings as lists."""
    batch = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class LabelledSlices(torch.utils.data.Dataset):
    """Items {"index", "pixel_values": (1, R, R) in [-1, 1], "label": class index}."""

    def __init__(self, records, resolution: int, classes: list[str], columns: list[str], random_flip: bool = False,
                 repeats: int = 1):
        self.records, self.resolution, self.random_flip, self.repeats = records, resolution, random_flip, repeats
        self.labels = [classes.index(class_name(r, columns)) for r in records]

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def __getitem__(self, i: int) -> dict:
        index = i % len(self.records)
        flip = bool(self.random_flip and torch.rand(()).item() < 0.5)
        pixels = to_pixel_values(load_image(self.records[index].path), self.resolution, flip=flip, rgb=False)
        return {"index": index, "pixel_values": pixels, "label": self.labels[index]}
