"""Prep of a volume larger than the memory budget, against the work no implementation can avoid.

Three measurements in one run, each in a fresh subprocess (so peak RSS = that process's VmHWM):

- unavoidable: read the TIFF file once, sequentially, and encode + write the same number of PNGs of the same size
  (crops of the same volume, same PNG settings);
- prep (streaming): `run_prep` with `--memory-budget BUDGET` (warp/weft planes spooled through scratch files);
- naive: the whole volume loaded into memory, then sliced (the same code with an unlimited budget).

Targets (issue 2): streaming wall time <= 1.3x unavoidable; streaming peak RSS <= budget + 25 %.

    python benchmarks/prep_stream.py                      # default: 256 x 1024 x 1024 uint16 (512 MiB), budget 256
    python benchmarks/prep_stream.py --shape 128 512 512 --budget 64   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prep_config(volume: Path, out: Path, budget_mb: int, args):
    from data_prep.config import PrepConfig, VolumeSpec

    return PrepConfig(volumes=[VolumeSpec("dry", volume)], out=out, resolution=args.resolution,
                      tile_size=args.resolution, stride=args.stride, memory_budget_mb=budget_mb)


def child(args) -> dict:
    """One measurement, run in its own process."""
    volume, work = Path(args.volume), Path(args.work)
    t0 = time.perf_counter()
    if args.mode in ("stream", "naive"):
        from data_prep.prep import run_prep

        budget = args.budget if args.mode == "stream" else 1 << 20  # naive: everything in memory at once
        manifest = run_prep(_prep_config(volume, work / args.mode, budget, args), show_progress=False)
        n_images = sum(c[s] for bo in manifest["counts"].values() for c in bo.values() for s in c)
        extra = {"images": n_images, "memory_plan": manifest["volumes"][0]["memory"]}
    else:  # unavoidable work: one sequential read of the file + encoding the same number of PNGs
        import numpy as np
        import tifffile

        from ldm_finetune.core.io import write_png

        with open(volume, "rb") as fh:
            while fh.read(16 << 20):
                pass
        read_s = time.perf_counter() - t0
        with tifffile.TiffFile(volume) as tif:  # a few pages to crop from (not timed: not part of the work)
            pages = [tif.pages[z].asarray() for z in range(0, len(tif.pages), max(1, len(tif.pages) // 8))]
        out = work / "unavoidable"
        out.mkdir(parents=True, exist_ok=True)
        r = args.resolution
        t1 = time.perf_counter()
        for k in range(args.images):
            page = pages[k % len(pages)]
            y, x = (k * 37) % (page.shape[0] - r), (k * 91) % (page.shape[1] - r)
            crop = page[y : y + r, x : x + r].astype(np.float32)
            write_png(out / f"{k}.png", np.clip((crop - 8000) / 50000 * 255, 0, 255).astype(np.uint8))
        encode_s = time.perf_counter() - t1
        return {"mode": args.mode, "wall_s": round(read_s + encode_s, 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
                "images": args.images, "read_s": round(read_s, 2), "encode_s": round(encode_s, 2)}
    return {"mode": args.mode, "wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
            **extra}


def run_child(mode: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--volume", str(args.volume), "--work", str(args.work),
           "--budget", str(args.budget), "--resolution", str(args.resolution), "--stride", str(args.stride), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 1024, 1024])
    parser.add_argument("--budget", type=int, default=256, help="memory budget in MB")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--child", choices=["stream", "naive", "unavoidable"])
    parser.add_argument("--volume")
    parser.add_argument("--work")
    parser.add_argument("--images", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return

    from data_prep.phantom import PhantomVolume, write_volume_tiff

    with tempfile.TemporaryDirectory(prefix="prep_bench_", dir=os.environ.get("BENCH_TMP")) as tmp:
        args.work = Path(tmp)
        args.volume = args.work / "dry.tif"
        t0 = time.perf_counter()
        phantom = PhantomVolume("dry", tuple(args.shape), seed=0)
        write_volume_tiff(args.volume, phantom, pages_per_slab=8)
        volume_mb = args.volume.stat().st_size / 2**20
        print(f"phantom {args.shape} uint16: {volume_mb:.0f} MiB written in {time.perf_counter() - t0:.1f} s")
        stream = run_child("stream", args)
        print("stream     ", stream)
        unavoidable = run_child("unavoidable", args, ["--images", str(stream["images"])])
        print("unavoidable", unavoidable)
        naive = run_child("naive", args)
        print("naive      ", naive)

    result = {
        "benchmark": "prep_stream",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "volume": {"shape": args.shape, "dtype": "uint16", "mib": round(volume_mb, 1)},
        "settings": {"budget_mb": args.budget, "resolution": args.resolution, "tile_size": args.resolution,
                     "stride": args.stride},
        "stream": stream,
        "unavoidable": unavoidable,
        "naive": naive,
        "ratios": {
            "stream_wall_over_unavoidable": round(stream["wall_s"] / unavoidable["wall_s"], 3),
            "stream_peak_rss_over_budget": round(stream["peak_rss_mb"] / args.budget, 3),
            "naive_wall_over_unavoidable": round(naive["wall_s"] / unavoidable["wall_s"], 3),
            "naive_peak_rss_over_budget": round(naive["peak_rss_mb"] / args.budget, 3),
        },
        "targets": {"stream_wall_over_unavoidable": "<= 1.3", "stream_peak_rss_over_budget": "<= 1.25"},
    }
    print(json.dumps(result["ratios"], indent=2))
    RESULTS.mkdir(exist_ok=True)
    name = f"prep_stream_{args.shape[0]}x{args.shape[1]}x{args.shape[2]}_budget{args.budget}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {RESULTS / name}")


if __name__ == "__main__":
    main()
