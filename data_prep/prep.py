"""`ldm-finetune prep`: volumes -> OUT/{train,validation}/ images + metadata.jsonl, and OUT/manifest.json.

Everything that can be wrong with the input (files, layouts, windows, tile sizes, the split) is checked before the
first image is written; the dataset is then built in a temporary folder beside OUT and moved into place at the end,
so OUT is either the old complete folder or the new one, never half of either.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.captions import caption
from data_prep.config import PrepConfig, VolumeSpec
from data_prep.geometry import ORIENTATIONS, SPLITS, SplitBlocks, Tile, plan_tiles, tile_sides
from data_prep.slicer import CutSettings, cut_volume
from data_prep.volume import Volume, open_volume
from data_prep.window import Histogram, percentile_window, sample_histogram
from ldm_finetune.core.configtools import to_dict
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_dir, write_png
from ldm_finetune.core.version import __version__

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ldm_finetune.prep/1"


@dataclass
class Job:
    """One volume, opened and planned: everything needed to cut it."""

    spec: VolumeSpec
    volume: Volume
    prefix: str  # file-name prefix: the state, numbered when a state has several volumes
    window: tuple[float, float] = (0.0, 1.0)
    window_source: str = ""
    padding: tuple = ()
    tiles: list[Tile] = None
    blocks: SplitBlocks = None
    sides: dict = None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: folder is not empty; pass --overwrite to replace it, or choose another --out")
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out}: refusing to overwrite a folder that is not a prep output (no {MANIFEST})")


def _prefixes(specs: list[VolumeSpec]) -> list[str]:
    count, seen = Counter(s.state for s in specs), Counter()
    out = []
    for s in specs:
        seen[s.state] += 1
        out.append(s.state if count[s.state] == 1 else f"{s.state}-{seen[s.state]}")
    return out


def _choose_windows(cfg: PrepConfig, jobs: list[Job]) -> None:
    """Fixed windows as given; 'auto' per volume; 'shared' from the pooled histograms of all volumes."""
    hists: dict[int, Histogram] = {}
    for i, job in enumerate(jobs):
        if job.spec.window is None and not isinstance(cfg.window, tuple):
            hists[i] = sample_histogram(job.volume, cfg.sample_pages)
    pooled = Histogram.pooled(list(hists.values())) if cfg.window == "shared" and hists else None
    for i, job in enumerate(jobs):
        if job.spec.window is not None:
            job.window, job.window_source = tuple(job.spec.window), "fixed (volume)"
        elif isinstance(cfg.window, tuple):
            job.window, job.window_source = tuple(cfg.window), "fixed"
        else:
            hist = pooled if pooled is not None else hists[i]
            where = "volumes (shared window)" if pooled is not None else str(job.spec.path)
            job.window = percentile_window(hist, *cfg.percentiles, where=where)
            job.padding = tuple(hist.without_padding()[1])
            job.window_source = f"{cfg.window} p{cfg.percentiles[0]:g}-p{cfg.percentiles[1]:g}"


def _plan(cfg: PrepConfig, job: Job) -> None:
    z_scale = cfg.z_scale(job.spec)
    job.tiles, job.blocks = plan_tiles(
        job.volume.shape,
        resolution=cfg.resolution,
        warp_axis=cfg.volume_warp_axis(job.spec),
        z_scale=z_scale,
        tile_size=cfg.tile_size,
        strides=cfg.stride,
        split_axis=cfg.split.axis,
        split_fraction=cfg.split.fraction,
        split_gap=cfg.split.gap,
        orientations=tuple(cfg.orientations),
        where=str(job.spec.path),
    )
    job.sides = tile_sides(job.volume.shape, z_scale, cfg.resolution, cfg.tile_size)
    if not any(t.split == "train" for t in job.tiles):
        raise UserError(f"{job.spec.path}: no training image fits; lower --resolution / --tile-size or the split gap")


def _sha256(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        out.append({"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": digest.hexdigest()})
    return out


def run_prep(cfg: PrepConfig, show_progress: bool = True) -> dict:
    """Build the dataset described by `cfg`; returns the manifest (also written to OUT/manifest.json)."""
    _check_out(cfg.out, cfg.overwrite)
    jobs: list[Job] = []
    try:
        for spec, prefix in zip(cfg.volumes, _prefixes(cfg.volumes)):
            jobs.append(Job(spec, open_volume(spec.path, spec.channel), prefix))
        _choose_windows(cfg, jobs)
        for job in jobs:
            _plan(cfg, job)
        total = sum(j.volume.shape[0] + len(j.tiles) for j in jobs)
        with ThreadPoolExecutor(1) as hasher, atomic_dir(cfg.out, cfg.overwrite) as tmp:
            # hash the sources on the other core while we slice (the reads mostly hit the OS cache)
            hashes = [hasher.submit(_sha256, j.volume.files) if cfg.hash_sources else None for j in jobs]
            rows = {split: [] for split in SPLITS}
            for split in SPLITS:
                (tmp / split).mkdir()
            plans = []
            with tqdm(total=total, desc="prep", unit="step", disable=not show_progress, file=sys.stderr) as bar:
                for job in jobs:
                    bar.set_postfix_str(job.prefix)
                    plans.append(_cut(cfg, job, tmp, rows, bar))
            for split in SPLITS:
                with open(tmp / split / "metadata.jsonl", "w") as fh:
                    for row in rows[split]:
                        fh.write(json.dumps(row) + "\n")
            manifest = _manifest(cfg, jobs, plans, [h.result() if h else None for h in hashes], rows)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    finally:
        for job in jobs:
            job.volume.close()
    return manifest


def _cut(cfg: PrepConfig, job: Job, tmp: Path, rows: dict, bar) -> dict:
    settings = CutSettings(cfg.resolution, cfg.bits, job.window, cfg.z_scale(job.spec),
                           cfg.volume_warp_axis(job.spec), cfg.memory_budget_mb << 20)
    source = job.spec.path.name
    in_plane = (job.spec.spacing or cfg.spacing)[2]
    pixel_unit = cfg.pixel_unit(job.spec)

    def emit(tile: Tile, image) -> None:
        r0, _, c0, _ = tile.box
        name = f"{job.prefix}_{tile.orientation}_{tile.index:05d}_{r0:04d}x{c0:04d}.png"
        write_png(tmp / tile.split / name, image)
        fp = tile.footprint
        pixel_size = float(f"{in_plane * job.sides[tile.orientation] / cfg.resolution:.6g}")
        rows[tile.split].append({
            "file_name": name,
            "text": caption(cfg.captions.template, job.spec.state, tile.orientation,
                            cfg.captions.identifiers, cfg.captions.class_noun),
            "state": job.spec.state,
            "orientation": tile.orientation,
            "slice_index": tile.index,
            "tile_box": list(tile.box),
            "footprint": [fp.z0, fp.z1, fp.y0, fp.y1, fp.x0, fp.x1],
            "scale": cfg.resolution / job.sides[tile.orientation],
            # one pixel's side in the volume's spacing unit (in-plane spacing over the resize factor)
            "pixel_size": pixel_size,
            "pixel_unit": pixel_unit,
            "window": list(job.window),
            "source": source,
        })
        bar.update(1)

    return cut_volume(job.volume, job.tiles, settings, emit, scratch_dir=tmp, progress=bar.update)


def _counts(rows: dict) -> dict:
    counts: dict = {}
    for split in SPLITS:
        for row in rows[split]:
            by_state = counts.setdefault(row["state"], {})
            by_orient = by_state.setdefault(row["orientation"], {s: 0 for s in SPLITS})
            by_orient[split] += 1
    return counts


def _manifest(cfg: PrepConfig, jobs: list[Job], plans: list[dict], hashes: list, rows: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ldm_finetune_version": __version__,
        "settings": to_dict(cfg) | {"out": str(cfg.out)},
        "volumes": [
            {
                "state": j.spec.state,
                "prefix": j.prefix,
                "path": str(j.spec.path),
                "files": h if h is not None else [{"path": str(p.resolve())} for p in j.volume.files],
                "shape": list(j.volume.shape),
                "dtype": str(j.volume.dtype),
                "reader": j.volume.layout,
                "window": list(j.window),
                "window_source": j.window_source,
                "padding_excluded": list(j.padding),
                "z_scale": cfg.z_scale(j.spec),
                "warp_axis": cfg.volume_warp_axis(j.spec),
                "tile_sides": j.sides,
                "split": {"axis": j.blocks.axis, "train": [0, j.blocks.train_end],
                          "gap": [j.blocks.train_end, j.blocks.val_start],
                          "validation": [j.blocks.val_start, j.blocks.length]},
                "memory": plan,
            }
            for j, plan, h in zip(jobs, plans, hashes)
        ],
        "counts": _counts(rows),
    }


def summary_table(manifest: dict) -> str:
    """Images per state x orientation x split, and the window used per volume."""
    lines = [f"{'state':<16}{'orientation':<12}{'train':>7}{'validation':>12}"]
    for state, by_orient in manifest["counts"].items():
        for orient in ORIENTATIONS:
            if orient in by_orient:
                c = by_orient[orient]
                lines.append(f"{state:<16}{orient:<12}{c['train']:>7}{c['validation']:>12}")
    total = {s: sum(c[s] for bo in manifest["counts"].values() for c in bo.values()) for s in SPLITS}
    lines.append(f"{'total':<28}{total['train']:>7}{total['validation']:>12}")
    for v in manifest["volumes"]:
        lo, hi = v["window"]
        lines.append(f"window {v['prefix']}: [{lo:g}, {hi:g}] ({v['window_source']})")
    return "\n".join(lines)


def empty_combinations(manifest: dict) -> list[str]:
    """'state/orientation/split' combinations that got no image (worth a warning)."""
    missing = []
    for v in manifest["volumes"]:
        orients = manifest["settings"]["orientations"]
        for orient in orients:
            for split in SPLITS:
                if manifest["counts"].get(v["state"], {}).get(orient, {}).get(split, 0) == 0:
                    missing.append(f"{v['state']}/{orient}/{split}")
    return sorted(set(missing))
