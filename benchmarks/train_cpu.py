"""LoRA training speed and peak memory on the tiny model on CPU, with and without the latent / text caches.

Each configuration runs `recipes/lora.yaml` through the real loop in a fresh subprocess (peak RSS = that process's
VmHWM). Speed is steps/s between step WARMUP and the last step, from metrics.jsonl. Configurations are interleaved
over REPEATS rounds and the median is kept, so drift of the machine hits all of them alike; results are ratios to
the uncached run.

    python benchmarks/train_cpu.py                  # 64 px, batch 8, 40 steps, 2 rounds
    python benchmarks/train_cpu.py --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "no caching": {"data.cache_latents": "none", "data.cache_text": "false"},
    "text cache": {"data.cache_latents": "none", "data.cache_text": "true"},
    "latent + text cache": {"data.cache_latents": "memory", "data.cache_text": "true"},
}

CHILD = """
import json, sys
from ldm_finetune.train import main
code = main(sys.argv[1:])
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024
print(json.dumps({"code": code, "peak_rss_mb": rss}))
"""


def prepare(work: Path, resolution: int) -> tuple[Path, Path]:
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.phantom import STATES, write_phantoms
    from data_prep.prep import run_prep
    from ldm_finetune.models.stable_diffusion import write_tiny_model

    volumes = write_phantoms(work / "volumes", (64, 128, 192), seed=0)
    run_prep(PrepConfig(volumes=[VolumeSpec(s, volumes[s]) for s in STATES], out=work / "data",
                        resolution=resolution), show_progress=False)
    return write_tiny_model(work / "tiny"), work / "data" / "train"


def run_one(name: str, model: Path, train_dir: Path, out: Path, args) -> dict:
    overrides = {"model.pretrained": model, "data.train_dir": train_dir, "output_dir": out,
                 "data.resolution": args.resolution, "train.batch_size": args.batch, "train.max_steps": args.steps,
                 "train.mixed_precision": "no", "validation.prompts": "[]", "logging.report_to": "none",
                 "checkpoint.every_steps": "null", "checkpoint.resume": "null", "data.num_workers": 0,
                 **CONFIGS[name]}
    cmd = [sys.executable, "-c", CHILD, str(ROOT / "recipes" / "lora.yaml"),
           *[f"{k}={v}" for k, v in overrides.items()]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["code"] == 0, result.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start, end = rows[args.warmup - 1], rows[-1]
    return {"steps_per_s": (end["step"] - start["step"]) / (end["time"] - start["time"]),
            "peak_rss_mb": child["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, train_dir = prepare(work, args.resolution)
        runs = {name: [] for name in CONFIGS}
        for round_ in range(args.repeats):
            for name in CONFIGS:
                runs[name].append(run_one(name, model, train_dir, work / f"run-{round_}-{len(runs[name])}-{name}",
                                          args))
                print(f"round {round_ + 1} {name:<20} {runs[name][-1]}", flush=True)
        images = len((train_dir / "metadata.jsonl").read_text().splitlines())
    summary = {name: {"steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                      "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)} for name, rs in runs.items()}
    base = summary["no caching"]
    for s in summary.values():
        s["speedup"] = round(s["steps_per_s"] / base["steps_per_s"], 2)
        s["rss_ratio"] = round(s["peak_rss_mb"] / base["peak_rss_mb"], 2)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    record = {"machine": machine, "python": platform.python_version(),
              "settings": vars(args) | {"train_images": images}, "runs": runs, "summary": summary}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"train_cpu_tiny_{args.resolution}px_b{args.batch}.json"
    path.write_text(json.dumps(record, indent=2))
    for name, s in summary.items():
        print(f"{name:<20} {s['steps_per_s']:.2f} steps/s ({s['speedup']}x)  peak RSS {s['peak_rss_mb']:.0f} MB "
              f"({s['rss_ratio']}x)")
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
