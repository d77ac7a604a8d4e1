"""Large fields of view from a model trained at one size (generation/tiled.py), on the CPU: the mini base (native
32 px) with a CT LoRA trained here on the phantom's slices.

    python benchmarks/tiled_generation.py                 # trains the LoRA (a few minutes), then measures
    python benchmarks/tiled_generation.py --lora RUN_DIR  # an existing LoRA run on the mini base
    python benchmarks/tiled_generation.py --gpu           # sampling throughput on a GPU (SD 2.1-base, 512 px)

Measures, each in one run:
- seam score (evaluation.metrics.seam_score): mean grey step across the joins of side-by-side 32 px tiles, each in units
  of the same direction's steps away from them on the lines between the VAE's 4 px blocks (its decoder's own grid,
  which a field with no tile shows too; scored against every line as well), on 256 x 64 fields; MultiDiffusion (Hann-weighted tiles, overlap 0.75
  and 0.5) against side-by-side tiles (overlap 0) on the same seeds, and across the wrap edge with and without
  --seamless, next to references: the same score on interior lines chosen at random (what "no seam" scores with this
  many images), and on every family of lines one latent pixel apart modulo the tile (the moving grid's edges visit them
  all) for the tiled fields and for a control with no tiles at all (the UNet run on the whole canvas: the model's own
  lines);
- fidelity of crops: 32 px crops of 128 x 128 fields against native 32 px generations of the same prompt, both scored
  by the evaluation stage against the real slices, in real-vs-real floors;
- time and peak memory (RSS, in a fresh process per size) against output area, tiled and, for reference, the plain
  pipeline running its UNet at the full size;
- sampling throughput of `generate` against plain diffusers doing the same work (scheduler, steps, batch, size).
Results: results/tiled_generation_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.config import PrepConfig, VolumeSpec  # noqa: E402
from data_prep.phantom import STATES, write_phantoms  # noqa: E402
from data_prep.prep import run_prep  # noqa: E402
from ldm_finetune.core.layout import RunLayout  # noqa: E402
from ldm_finetune.evaluation.evaluate import SuiteSettings, evaluate_folders  # noqa: E402
from ldm_finetune.evaluation.metrics import seam_score  # noqa: E402
from ldm_finetune.generation.generate import GenerateSettings, load_pipeline, prepared_pipeline, render  # noqa: E402
from ldm_finetune.generation.tiled import Tiling, tile_joins  # noqa: E402
from ldm_finetune.training.mini_base import shipped_mini_base  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["sf_dry sf_thickness", "sf_dry-compacted sf_warp", "sf_injected sf_weft"]  # prep's default captions
CLASS = ("dry", "thickness")


def phantom_data(work: Path) -> Path:
    volumes = write_phantoms(work / "volumes", (96, 192, 256), seed=0)
    run_prep(PrepConfig(volumes=[VolumeSpec(s, volumes[s]) for s in STATES], out=work / "data", resolution=32),
             show_progress=False)
    return work / "data"


def train_lora(base: Path, data: Path, out: Path, steps: int, seed: int = 0) -> Path:
    overrides = {"seed": seed, "model.pretrained": base, "data.train_dir": data / "train", "output_dir": out,
                 "data.resolution": 32, "data.num_workers": 0, "train.max_steps": steps, "train.batch_size": 8,
                 "train.learning_rate": 1e-3, "train.lr_warmup_steps": 10, "train.mixed_precision": "no",
                 "lora.targets": "[attention,feedforward,resnet]", "validation.prompts": "[]",
                 "checkpoint.every_steps": "null", "logging.report_to": "none"}
    cmd = [sys.executable, "-m", "ldm_finetune.train", str(ROOT / "recipes" / "lora.yaml"),
           *[f"{k}={v}" for k, v in overrides.items()]]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def draw_fn(base: Path, lora: Path, vae_whole: bool = False, whole_unet: bool = False, **size):
    settings = GenerateSettings([], steps=20, guidance=4.0, loras=[(str(lora), 1.0)], **size)
    pipe = load_pipeline(str(base), device="cpu")
    if vae_whole:  # a diagnosis: keep the VAE from decoding in its own blended tiles
        pipe.vae.enable_tiling = lambda *a, **k: None
    _, draw = prepared_pipeline(str(base), settings, pipe)
    if whole_unet:  # a control: the UNet run on the whole canvas, as plain diffusers does (no tiles, no joins)
        return lambda prompts, seeds: render(pipe, prompts, seeds, settings.steps, settings.guidance, "",
                                             size["height"], size["width"])
    return draw


# lines one latent pixel apart, modulo the 32 px tile: the moving grid puts a tile edge on each of them in turn, so
# its joins are not only where side-by-side tiles meet (offset 0); a tile-free field scores the same lines
LINE_FAMILIES = range(0, 32, 4)
GRID = 4  # the mini base's VAE factor: one latent pixel is a 4 x 4 px block


def line_family(offset: int, height: int = 64, width: int = 256) -> tuple[list[int], list[int]]:
    return [r for r in range(offset, height, 32) if r], [c for c in range(offset, width, 32) if c]


SEAM_VARIANTS = {"overlap_0.5": {}, "overlap_0.75": {"tile_overlap": 0.75}, "side_by_side": {"tile_overlap": 0.0},
                 "seamless": {"seamless": True}, "seamless_overlap_0.75": {"seamless": True, "tile_overlap": 0.75},
                 "whole_unet": {"whole_unet": True}}


def seams(base: Path, lora: Path, seeds: list[int], names: list[str]) -> dict:
    """Each variant's images scored at the joins, across the wrap edge, on random interior lines and on every line
    family, against the other lines between the VAE's 4 px blocks (GRID) and, as recorded before 2026-12-05, against
    every line (`..._all_lines`), which scores the decoder's own block edges as seams."""
    out = {}
    naive_rows, naive_columns = tile_joins(64, 256, Tiling(32, 32, 0.0), GRID)
    rng = np.random.default_rng(0)
    for name, flags in ((n, f) for n, f in SEAM_VARIANTS.items() if n in names):
        images = [i for row in draw_fn(base, lora, height=64, width=256, **flags)(PROMPTS, seeds) for i in row]
        lines = [([int(rng.integers(1, 16)) * GRID], [int(rng.integers(1, 64)) * GRID]) for _ in images]
        out[name] = {"images": len(images)}
        for suffix, grid in (("", GRID), ("_all_lines", 1)):
            def score(rows, columns):
                return float(np.mean([seam_score(i, rows, columns, grid) for i in images]))
            by_family = {str(f): score(*line_family(f)) for f in LINE_FAMILIES}
            out[name] |= {f"seam_score_at_tile_joins{suffix}": score(naive_rows, naive_columns),
                          f"seam_score_wrap_edge{suffix}": score([0], [0]),
                          f"seam_score_random_interior_line{suffix}": float(np.mean(
                              [seam_score(i, r, c, grid) for i, (r, c) in zip(images, lines)])),
                          f"seam_score_by_line_family{suffix}": by_family,
                          f"seam_score_worst_line_family{suffix}": max(by_family.values())}
    return out


# the crops' variants: how much the tiles overlap, and whether the VAE decodes the field whole or in its own tiles
CROP_VARIANTS = {"overlap_0.5": {}, "overlap_0.75": {"tile_overlap": 0.75}, "side_by_side": {"tile_overlap": 0.0},
                 "overlap_0.5_vae_whole": {"vae_whole": True}}


def crops_against_native(base: Path, lora: Path, data: Path, work: Path, n: int, names: list[str]) -> dict:
    """32 px crops of 128 px fields and native 32 px generations of one prompt, all scored in one evaluation (the
    same real-vs-real floors), as ratios to those floors."""
    from PIL import Image

    sets = {"native": draw_fn(base, lora, height=32, width=32)([PROMPTS[0]], list(range(n)))[0]}
    for name, flags in ((n, f) for n, f in CROP_VARIANTS.items() if n in names):
        flags = dict(flags)
        vae_whole = flags.pop("vae_whole", False)
        draw = draw_fn(base, lora, height=128, width=128, vae_whole=vae_whole, **flags)
        fields = draw([PROMPTS[0]], list(range(n // 16)))[0]
        sets[name] = [f[y:y + 32, x:x + 32] for f in fields for y in range(0, 128, 32) for x in range(0, 128, 32)]
    folders = {}
    for name, images in sets.items():
        folder = work / name / f"{CLASS[0]}__{CLASS[1]}"
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray((image.mean(-1) * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
        folders[name] = work / name
    evaluate_folders(SuiteSettings(data, max_real=128, rounds=5), list(folders.values()), work / "eval")
    entry = json.loads((work / "eval" / "metrics.json").read_text())["fidelity"]["/".join(CLASS)]
    ratios = {}
    for name in folders:
        floor = entry["models"][name].get("floor") or entry["floor"]  # sets scored at their own size carry theirs
        values = entry["models"][name]["values"]
        ratios[name] = {k: values[k] / floor[k] for k in floor if not k.startswith("prdc") and floor[k] > 0}
        ratios[name]["mean"] = float(np.mean(list(ratios[name].values())))
    return {"images": {name: len(images) for name, images in sets.items()}, "ratio_to_floor": ratios,
            "crops_over_native": {name: ratios[name]["mean"] / ratios["native"]["mean"] for name in sets
                                  if name != "native"}}


CHILD = """
import ctypes, gc, json, re, sys, time, torch
torch.set_num_threads(1)
from ldm_finetune.generation.generate import GenerateSettings, load_pipeline, prepared_pipeline

def status_kb(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

base, lora, side, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pipe = load_pipeline(base, device="cpu")
settings = GenerateSettings([], steps=10, guidance=4.0, loras=[(lora, 1.0)], height=side, width=side)
if mode == "plain":  # the UNet at the full size, as diffusers runs it without tiles
    from ldm_finetune.generation import generate
    generate.plan_tiling = lambda *a, **k: None
_, draw = prepared_pipeline(base, settings, pipe)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed loading buffers back, so sampling cannot hide in them
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS counter (VmHWM) here, after loading
held = status_kb("VmRSS")
started = time.perf_counter()
draw(["sf_dry sf_thickness"], [0])
seconds = time.perf_counter() - started
peak = status_kb("VmHWM")
print(json.dumps({"seconds": seconds, "rss_before_mb": held / 1024, "peak_rss_mb": peak / 1024,
                  "sampling_peak_mb": (peak - held) / 1024}))
"""


def scaling(base: Path, lora: Path, sides: list[int]) -> list[dict]:
    rows = []
    for mode in ("tiled", "plain"):
        for side in sides:
            out = subprocess.run([sys.executable, "-c", CHILD, str(base), str(lora), str(side), mode],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append({"mode": mode, "side": side, "area": side * side, **json.loads(out.stdout.splitlines()[-1])})
            print(rows[-1], flush=True)
    return rows


def throughput(base: Path, lora: Path | None, batch: int, rounds: int, steps: int = 20,
               device: str = "cpu") -> dict:
    """images/s of generate's drawing vs diffusers' pipeline called directly (same scheduler, steps, batch, size),
    interleaved so that load on the machine hits both alike."""
    settings = GenerateSettings([], steps=steps, guidance=4.0, loras=[(str(lora), 1.0)] if lora else [])
    pipe, draw = prepared_pipeline(str(base), settings, load_pipeline(str(base), device=device))
    seeds = list(range(batch))

    def ours():
        draw([PROMPTS[0]], seeds)

    def plain():
        pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=4.0, num_images_per_prompt=batch,
             generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")

    times = {"ours": [], "diffusers": []}
    ours(), plain()  # warm-up
    for round_ in range(rounds):  # ABBA order: neither side always runs first
        for name, fn in ((("ours", ours), ("diffusers", plain)) if round_ % 2 == 0 else
                         (("diffusers", plain), ("ours", ours))):
            started = time.perf_counter()
            fn()  # output_type="np": the images reach the host, so the GPU's work is inside the timing
            times[name].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in times.items()}
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return {"batch": batch, "steps": steps, "size": side, "dtype": str(pipe.unet.dtype), "seconds_best": best,
            "images_per_s": {k: round(batch / v, 2) for k, v in best.items()},
            "ours_over_diffusers_throughput": best["diffusers"] / best["ours"]}


def gpu_throughput(batch: int = 8, steps: int = 25, rounds: int = 6) -> dict:
    """Part 4 on a GPU: the SD 2.1-base architecture (random weights: the speed does not depend on them) at its
    native 512 px, fp16, no LoRA, so both sides run the same UNet."""
    from ldm_finetune.models.stable_diffusion import build_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "sd21_random"
        build_pipeline("sd21").save_pretrained(model)
        result = throughput(model, None, batch, rounds, steps, device="cuda")
    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "model": "sd21 architecture, random weights", "throughput_vs_diffusers": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", type=Path, help="an existing LoRA run on the mini base (default: train one)")
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--lora-seed", type=int, default=0, help="the trained LoRA's seed (another LoRA, same recipe)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="measure only these; the other parts' recorded results are kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--variants", nargs="+", choices=sorted(set(SEAM_VARIANTS) | set(CROP_VARIANTS)),
                        help="only these variants in the seams and crops parts (merged into what is recorded)")
    parser.add_argument("--gpu", action="store_true",
                        help="part 4 on the GPU only (SD 2.1-base architecture, 512 px, 25 steps, batch 8)")
    args = parser.parse_args()
    if args.gpu:
        RESULTS.mkdir(exist_ok=True)
        result = gpu_throughput()
        print(json.dumps(result), flush=True)
        (RESULTS / "tiled_generation_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    base = shipped_mini_base()
    path = RESULTS / "tiled_generation_cpu.json"
    keep = set(args.parts) != set(PARTS) or args.variants  # a partial run keeps the rest of the record
    result = json.loads(path.read_text()) if path.is_file() and keep else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = phantom_data(work)
        started = time.perf_counter()
        lora = args.lora or train_lora(base, data, work / "lora", args.lora_steps, args.lora_seed)
        lora_seconds = time.perf_counter() - started
        result |= {"machine": f"{platform.machine()}, {args.threads} thread(s)", "torch": torch.__version__,
                   "lora": lora_facts(args, lora_seconds)}
        for part in args.parts:
            name, measure = PARTS[part]
            result[name] = merged(result.get(name), measure(args, base, lora, data, work))
            print(name, json.dumps(result[name])[:2000], flush=True)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def lora_facts(args, seconds: float) -> dict:
    """What the record says of the LoRA: trained here, or an existing run (its steps and seed from its config.yaml,
    not from this command's --lora-steps / --lora-seed)."""
    facts = {"targets": "attention, feedforward, resnet", "rank": 16}
    if args.lora is None:
        return facts | {"steps": args.lora_steps, "seed": args.lora_seed, "seconds": round(seconds, 1)}
    config = yaml.safe_load(RunLayout(args.lora).config.read_text())
    return facts | {"run": str(args.lora), "steps": config["train"]["max_steps"], "seed": config["seed"]}


def merged(old, new):
    """`new` over `old`, dict by dict: a run of some variants keeps the others' recorded numbers."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    return old | {k: merged(old.get(k), v) for k, v in new.items()}


# part -> (result key, measure(args, base, lora, data, work))
PARTS = {
    "seams": ("seams_256x64", lambda a, base, lora, data, work: seams(base, lora, list(range(a.seeds)),
                                                                      a.variants or list(SEAM_VARIANTS))),
    "crops": ("crops_128px_vs_native_32px",
              lambda a, base, lora, data, work: crops_against_native(base, lora, data, work / "crops", 64,
                                                                     a.variants or list(CROP_VARIANTS))),
    "throughput": ("throughput_vs_diffusers", lambda a, base, lora, data, work: throughput(base, lora, 8, 3)),
    "scaling": ("scaling", lambda a, base, lora, data, work: scaling(base, lora, a.sides)),
}


if __name__ == "__main__":
    main()
