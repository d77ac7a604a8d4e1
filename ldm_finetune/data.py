"""Captioned training images, and the latent / text-embedding caches that skip the frozen encoders.

A training folder is what `ldm-finetune prep` writes (`train/` with `metadata.jsonl`) or any folder of images with a
`metadata.jsonl` naming `file_name` and a caption column — the layout `datasets.load_dataset("imagefolder")` reads.
Grey slices (8- or 16-bit) are read at full precision and repeated over the three channels SD's VAE expects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_finetune.configtools import closest
from ldm_finetune.errors import UserError


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str
    meta: dict = field(default_factory=dict, compare=False)  # the metadata.jsonl row (state, orientation, ...)


def read_records(folder: Path, caption_column: str = "text") -> list[Record]:
    """The (image, caption) pairs of a folder's metadata.jsonl, checked up front."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not folder.is_dir():
        raise UserError(f"data.train_dir: {folder} does not exist (point it at a prep output's train/ folder)")
    if not meta.is_file():
        hint = " (it looks like a prep output: use its train/ folder)" if (folder / "train").is_dir() else ""
        raise UserError(f"data.train_dir: {folder} has no metadata.jsonl{hint}")
    records = []
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{meta}:{number}: not a JSON object") from None
        if "file_name" not in row:
            raise UserError(f"{meta}:{number}: no 'file_name'")
        if caption_column not in row:
            raise UserError(f"{meta}:{number}: no caption column {caption_column!r}{closest(caption_column, row)}; "
                            "set data.caption_column")
        records.append(Record(folder / row["file_name"], str(row[caption_column]), row))
    if not records:
        raise UserError(f"data.train_dir: {meta} lists no images")
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise UserError(f"data.train_dir: {len(missing)} images in {meta} are missing (first: {missing[0]})")
    return records


def image_folder_records(folder: Path, caption: str, what: str) -> list[Record]:
    """Every image of a plain folder, with one caption (DreamBooth instance or class folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES and p.suffix != ".json"
              and p.name != "metadata.jsonl"]
    if others:
        raise UserError(f"{what}: {folder} holds files that are not images (first: {others[0]}); "
                        "keep only images there")
    return [Record(p, caption) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def select_records(records: list[Record], select: dict[str, str], num_images: int | None) -> list[Record]:
    """Rows matching every `select` key; with `num_images`, that many spread evenly over the groups of the column
    not selected on (a state's 9 images = 3 per cut, as in the study; a cut's = 3 per state) and evenly along each
    group's slice order."""
    spread_by = "orientation" if "orientation" not in select else "state"
    chosen = [r for r in records if all(str(r.meta.get(k)) == str(v) for k, v in select.items())]
    if not chosen:
        detail = "; ".join(f"{k} has {sorted({str(r.meta.get(k)) for r in records})}" for k in select)
        raise UserError(f"data.concepts: no image matches {select} ({detail})")
    if num_images is None or num_images >= len(chosen):
        return chosen
    groups: dict[str, list[Record]] = {}
    for r in chosen:
        groups.setdefault(str(r.meta.get(spread_by)), []).append(r)
    names = sorted(groups)
    quota = {n: num_images // len(names) + (i < num_images % len(names)) for i, n in enumerate(names)}
    picked = []
    for name in names:
        group, k = groups[name], min(quota[name], len(groups[name]))
        picked += [group[int(j)] for j in np.linspace(0, len(group) - 1, k).round().astype(int)] if k else []
    return picked


def concept_records(records: list[Record] | None, concepts, expand_token=lambda t: t) -> list[Record]:
    """The training set of a concepts list: each concept's images with its caption ({token} filled in)."""
    out = []
    for i, c in enumerate(concepts):
        if c.instance_dir is not None:
            chosen = image_folder_records(c.instance_dir, c.caption or "", f"data.concepts[{i}].instance_dir")
        else:
            chosen = select_records(records, c.select, c.num_images)
        if c.caption is not None:
            caption = c.caption.replace("{token}", expand_token(c.token)) if c.token else c.caption
            chosen = [replace(r, caption=caption) for r in chosen]
        elif c.token:
            chosen = [replace(r, caption=r.caption.replace(c.token, expand_token(c.token))) for r in chosen]
        if not chosen or not all(r.caption for r in chosen):
            raise UserError(f"data.concepts[{i}]: no images, or images without a caption (set caption)")
        out += [replace(r, meta=dict(r.meta, concept=i, class_prompt=c.class_prompt)) for r in chosen]
    return out


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


def _resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a float image, channel by channel (PIL's 'F' mode keeps full precision)."""
    if array.shape[:2] == size[::-1]:
        return array
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array, mode="F").resize(size, Image.BICUBIC))
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
    if array.ndim == 2:
        # grey CT -> the RGB input SD's VAE was trained on, or kept as one channel
        array = np.repeat(array[..., None], 3 if rgb else 1, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return (tensor.clamp(0, 1) * 2.0 - 1.0).float()


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


# --- caches --------------------------------------------------------------------------------------------------------

def cache_key(records: list[Record], resolution: int, model_id: str) -> str:
    """Identifies a latent cache: model, resolution and every file's name, size and mtime."""
    h = hashlib.sha256(f"{model_id}|{resolution}".encode())
    for r in records:
        st = r.path.stat()
        h.update(f"|{r.path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_latent_moments(vae, dataset: CaptionedImages, batch_size: int, device, dtype) -> torch.Tensor:
    """(N, 8, R/8, R/8): the VAE posterior's mean and log-variance per image.

    Caching the distribution rather than one sample keeps training identical to encoding on the fly: a fresh latent
    is still drawn from it at every step.
    """
    out = []
    for start in range(0, len(dataset.records), batch_size):
        idx = range(start, min(start + batch_size, len(dataset.records)))
        pixels = torch.stack([dataset.pixels(i) for i in idx]).to(device, dtype)
        out.append(vae.encode(pixels).latent_dist.parameters.float().cpu())
    return torch.cat(out)


def load_or_encode_latents(path: Path | None, encode) -> torch.Tensor:
    """Read the cache at `path` if present, else encode and (when `path` is set) write it atomically."""
    from safetensors.torch import load_file, save_file

    from data_prep.io import atomic_path

    if path is not None and path.is_file():
        return load_file(str(path))["moments"]
    moments = encode()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"moments": moments.contiguous()}, str(tmp))
    return moments


def sample_latents(moments: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A latent drawn from cached (mean, logvar) moments, scaled like SD's training latents: (B, 4, h, w)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))  # the clamp diffusers' posterior applies
    # randn of the shape, not randn_like: the chunk is a strided view, and randn_like would lay the same draws out
    # in another order than diffusers' posterior sampling does
    sample = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    return (mean + std * sample) * scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], device, batch_size: int = 64) -> dict:
    """{caption: (77, D) hidden states} for each distinct caption (a multi-concept set has only a few)."""
    unique = sorted(set(captions))
    cache = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        hidden = text_encoder(tokenize(tokenizer, chunk).to(device))[0]
        cache.update({c: h.float().cpu() for c, h in zip(chunk, hidden)})
    return cache
