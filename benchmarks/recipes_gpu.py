"""Time and GPU memory of every recipe, as shipped, on the Stable Diffusion 2.1-base architecture on one GPU.

The weights are random (no download), which changes neither the cost of a step nor the memory it needs. Each recipe
YAML runs through a real `accelerate launch` with its own batch size, precision, gradient checkpointing and caches;
only the data, the model folder, the step count and the Textual Inversion initialiser words are overridden
(checkpoints and periodic validation are off, so the steps are the training steps alone). From `metrics.jsonl`:
seconds per optimizer step (median after warm-up), images per second, peak GPU memory (`gpu_peak_gib`); the wall
time of the whole launch (model loading, caches, DreamBooth class images, final export and sample grid); and the
projected wall time of the recipe's default length = wall + (default steps - measured steps) x s/step.

    python benchmarks/recipes_gpu.py                       # every recipe, 40 steps each (about 8 minutes on an H100)
    python benchmarks/recipes_gpu.py --recipes lora textual_inversion --steps 20
    python benchmarks/recipes_gpu.py --preset tiny --resolution 64 --steps 4 --device cpu   # smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
RECIPES = ("lora", "lora_dreambooth", "textual_inversion", "full_finetune", "dreambooth", "pivotal_tuning",
           "ddpm_pixel")
# the shipped TI initialisers (dry, compressed, resin) are CLIP words; the random models carry the tiny tokenizer
TI_CONCEPTS = ("[{token: <dry-slice>, initializer: dry, select: {state: dry}, num_images: 9, "
               "caption: 'A {token} of a carbon composite material'}, "
               "{token: <dry-compacted-slice>, initializer: compacted, select: {state: dry-compacted}, num_images: 9, "
               "caption: 'A {token} of a carbon composite material'}, "
               "{token: <injected-slice>, initializer: injected, select: {state: injected}, num_images: 9, "
               "caption: 'A {token} of a carbon composite material'}]")


def prepare(work: Path, preset: str, resolution: int, shape: list[int]) -> tuple[Path, Path]:
    """A random-init pipeline of the preset and a prep dataset of phantom volumes (both reused when present)."""
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.phantom import write_phantoms
    from data_prep.prep import run_prep
    from ldm_finetune.models.stable_diffusion import build_pipeline

    model = work / f"model_{preset}"
    if not (model / "model_index.json").is_file():
        started = time.perf_counter()
        build_pipeline(preset).save_pretrained(model)
        print(f"random-init {preset} pipeline written in {time.perf_counter() - started:.0f} s", flush=True)
    data = work / f"data_{resolution}"
    if not (data / "train" / "metadata.jsonl").is_file():
        started = time.perf_counter()
        paths = write_phantoms(work / "volumes", tuple(shape), seed=0)
        # 48-voxel tiles scaled to the training size, every 8th slice: ~1,500 training images, as a real scan gives
        run_prep(PrepConfig(volumes=[VolumeSpec(s, p) for s, p in paths.items()], out=data, resolution=resolution,
                            tile_size=48, stride=8, overwrite=True), show_progress=False)
        print(f"phantom dataset at {resolution} px written in {time.perf_counter() - started:.0f} s", flush=True)
    return model, data / "train"


def overrides(recipe: str, model: Path, train_dir: Path, out: Path, args) -> list[str]:
    settings = {"output_dir": out, "data.train_dir": train_dir, "train.max_steps": args.steps,
                "checkpoint.every_steps": "null", "validation.every_steps": "null", "logging.report_to": "none",
                "logging.every_steps": 1, "data.num_workers": 2}
    if recipe == "ddpm_pixel":
        return [f"{k}={v}" for k, v in settings.items()]
    settings |= {"model.pretrained": model, "data.resolution": args.resolution, "validation.seeds": "[0]"}
    if recipe in ("textual_inversion", "pivotal_tuning"):
        settings["data.concepts"] = TI_CONCEPTS
    if recipe == "dreambooth":  # class-image generation is part of before_loop_s; fewer than the recipe's 200
        settings["dreambooth.num_class_images"] = args.class_images
    if recipe == "pivotal_tuning":
        settings["pivotal.ti_steps"] = args.steps // 2
    if args.device == "cpu":
        settings["train.mixed_precision"] = "no"
    return [f"{k}={v}" for k, v in settings.items()]


def recipe_defaults(recipe: str) -> dict:
    from ldm_finetune.training.config import load_config

    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml")
    return {"batch_size": cfg.train.batch_size, "default_steps": cfg.train.max_steps,
            "mixed_precision": cfg.train.mixed_precision,
            "gradient_checkpointing": getattr(getattr(cfg, "model", None), "gradient_checkpointing", None)}


def measure(recipe: str, model: Path, train_dir: Path, work: Path, args) -> dict:
    from ldm_finetune.demo import launch_command

    out = work / "runs" / recipe
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = launch_command(ROOT / "recipes" / f"{recipe}.yaml", overrides(recipe, model, train_dir, out, args))
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    start = time.time()
    # own process group: on a timeout the launcher *and* the training process it started are stopped
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"recipe": recipe, "error": f"stopped after {args.timeout} s"}
    end = time.time()
    if proc.returncode:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        return {"recipe": recipe, "error": (errors or stderr.strip().splitlines() or ["failed"])[-1]}
    log = out / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    times = [r["time"] for r in rows]
    # the log's last write ~ the end of the last step: what comes before the loop and after it, from the clock
    loop_start = log.stat().st_mtime - times[-1]
    warm = min(5, len(times) // 2)
    step_s = statistics.median(b - a for a, b in zip(times[warm:], times[warm + 1:]))
    info = recipe_defaults(recipe)
    wall = end - start
    projected = wall + (info["default_steps"] - args.steps) * step_s
    return {"recipe": recipe, **info, "steps": args.steps, "s_per_step": round(step_s, 4),
            "images_per_s": round(info["batch_size"] / step_s, 2),
            "gpu_peak_gib": max((r["gpu_peak_gib"] for r in rows if "gpu_peak_gib" in r), default=None),
            "wall_s": round(wall, 1), "before_loop_s": round(loop_start - start, 1),
            "after_loop_s": round(end - log.stat().st_mtime, 1), "projected_default_min": round(projected / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd21", choices=["tiny", "sd15", "sd21"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per recipe (default 40)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 192, 256], help="dry phantom size (D H W)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per recipe launch")
    parser.add_argument("--deadline", type=int, default=None, help="launch no recipe that could end after this many "
                        "seconds from the start")
    parser.add_argument("--class-images", type=int, default=24, help="DreamBooth class images to generate")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/...)")
    args = parser.parse_args()

    import torch

    started = time.perf_counter()
    model, train_dir = prepare(args.work, args.preset, args.resolution, args.shape)
    print(f"model and data ready in {time.perf_counter() - started:.0f} s", flush=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    out = args.out or RESULTS / f"recipes_gpu_{args.preset}_{args.resolution}px.json"
    report = {"device": device, "preset": args.preset, "resolution": args.resolution, "torch": torch.__version__,
              "python": platform.python_version(), "recipes": []}
    for recipe in args.recipes:
        if args.deadline and time.perf_counter() - started + args.timeout > args.deadline:
            print(f"{recipe}: skipped, it might not end before the deadline", flush=True)
            continue
        row = measure(recipe, model, train_dir, args.work, args)
        report["recipes"].append(row)
        print(json.dumps(row), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each recipe: a cut-off run keeps what it measured
    print(f"results in {out}")


if __name__ == "__main__":
    main()
