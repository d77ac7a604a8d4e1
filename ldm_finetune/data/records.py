"""Training records: (image path, caption, metadata row) from a prep output's `metadata.jsonl` or a plain image
folder, checked up front, and the concept selections (DreamBooth / Textual Inversion sets) made from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_finetune.core.classes import CLASS_COLUMNS, row_class
from ldm_finetune.core.configtools import closest
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import IMAGE_SUFFIXES


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
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{meta}: not UTF-8 text (byte {exc.start}); save it as UTF-8, as `datasets` and "
                        "`ldm-finetune prep` write it") from None
    records = []
    root = folder.resolve()
    for number, line in enumerate(lines, 1):
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
        path = folder / str(row["file_name"])
        if not path.resolve().is_relative_to(root):
            # a row must not make a run read (and a model memorise) files outside the dataset it was given
            raise UserError(f"{meta}:{number}: file_name {row['file_name']!r} points outside {folder}; "
                            "file names are relative to the folder that holds metadata.jsonl")
        records.append(Record(path, str(row[caption_column]), row))
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


def class_name(record, columns: list[str]) -> str:
    return row_class(record.meta, columns)


def training_classes(records, columns: list[str]) -> list[str]:
    missing = [c for c in columns if c not in records[0].meta]
    if missing:
        raise UserError(f"data.class_columns: metadata.jsonl has no column {missing[0]!r} "
                        f"(it has {', '.join(sorted(records[0].meta))})")
    return sorted({class_name(r, columns) for r in records})


def scanner_windows(records) -> dict[str, list[float]]:
    """{state: [lo, hi]}: the intensity window prep applied to each state's slices (from its metadata rows), so
    generated slices can be mapped back to the scanner's units."""
    return {r.meta["state"]: list(r.meta["window"]) for r in records
            if "state" in r.meta and isinstance(r.meta.get("window"), list)}


def pixel_sizes(records, resolution: int) -> dict[str, list]:
    """{state/orientation: [size, unit]}: one pixel's side in the volume's units at the training `resolution` (prep's
    pixel size times prep's side over the training side, since training resizes the shorter side to `resolution`).
    A generated slice of any field of view keeps this pixel size."""
    sizes: dict[str, list] = {}
    for r in records:
        name = row_class(r.meta)
        if name in sizes or "pixel_size" not in r.meta or not all(c in r.meta for c in CLASS_COLUMNS):
            continue
        with Image.open(r.path) as image:
            side = min(image.size)
        sizes[name] = [float(f"{r.meta['pixel_size'] * side / resolution:.6g}"), r.meta.get("pixel_unit", "voxel")]
    return sizes
