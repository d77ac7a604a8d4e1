"""The evaluation's pixel DDPM images: one batch per class with a seed per image, against the images one by one (how
the evaluation drew them until 2026-12-05), on one trained model with the demo's sampler, in one run. Goal: the same
images (each seed's image as it comes alone) in less time.

    python benchmarks/eval_pixel_batch.py DEMO_OUT/runs/ddpm_pixel/model [--seeds 8] [--rounds 2]

Results: results/eval_pixel_batch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ldm_finetune.core.threads import use_cpu_threads
from ldm_finetune.models.pixel_unet import load_pixel_model

RESULTS = Path(__file__).resolve().parent / "results" / "eval_pixel_batch.json"
# the demo's evaluation sampler for the pixel DDPM (demo.evaluation_config)
SAMPLER = {"sampler": "ddim", "steps": 50, "eta": 1.0, "guidance": 5.0, "guidance_rescale": 0.7}


def draw(model, cls: str, seeds: list[int], batched: bool) -> tuple[torch.Tensor, float]:
    s = SAMPLER
    kw = {"eta": s["eta"], "guidance": s["guidance"], "guidance_rescale": s["guidance_rescale"]}
    started = time.perf_counter()
    if batched:
        images, _ = model.sample(len(seeds), cls, s["sampler"], s["steps"], seed=seeds, **kw)
    else:
        images = torch.cat([model.sample(1, cls, s["sampler"], s["steps"], seed=seed, **kw)[0] for seed in seeds])
    return images, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a pixel DDPM model folder")
    parser.add_argument("--seeds", type=int, default=8, help="images per class (the demo's eval_images)")
    parser.add_argument("--classes", type=int, default=2, help="how many of the model's classes to draw")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    threads = use_cpu_threads()
    model = load_pixel_model(args.model)
    seeds = list(range(args.seeds))
    seconds = {"one_by_one": 0.0, "batched": 0.0}
    largest = 0.0
    for _ in range(args.rounds):  # interleaved, so both see the same machine
        for cls in model.classes[:args.classes]:
            alone, t_alone = draw(model, cls, seeds, False)
            batch, t_batch = draw(model, cls, seeds, True)
            seconds["one_by_one"] += t_alone
            seconds["batched"] += t_batch
            largest = max(largest, float((alone - batch).abs().max()))
    images = args.rounds * args.classes * args.seeds
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": threads,
              "torch": torch.__version__, "model": str(args.model), "sampler": SAMPLER, "images": images,
              "seconds_per_image": {k: round(v / images, 3) for k, v in seconds.items()},
              "speedup": round(seconds["one_by_one"] / seconds["batched"], 2),
              "largest_difference": largest,
              "largest_difference_in_8bit_levels": round(largest / 2 * 255, 4)}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
