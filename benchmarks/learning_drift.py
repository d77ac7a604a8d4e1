"""Learning and drift of every shipped recipe, fine-tuned from the mini base on phantom CT slices, on a CPU.

For each recipe (its shipped YAML; only the base model, data, resolution, step count, batch and - where the shipped
rate assumes thousands of steps - the learning rate are overridden, listed in the output):
- learned: for each trained prompt, the distance of its generations to the real slices of its concept after / before
  fine-tuning, in real-vs-real floors (training vs validation slices) averaged over the registry's five distances
  (1.0: as close as two real sets);
- drift: the world probe's accuracy on the world prompts (all, and the `texture` ones) before and after, plus the
  evaluation stage's weight-free drift scores on the same pairs (paired SSIM, CT-leakage share);
- offset noise: mean grey of the darkest decile of generated CT slices, LoRA+DreamBooth with and without offset.

    python benchmarks/learning_drift.py            # ~15 min on 2 cores
    python benchmarks/learning_drift.py --steps 60 --recipes lora textual_inversion

Results: results/learning_drift_cpu.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from data_prep.config import PrepConfig, VolumeSpec
from data_prep.phantom import STATES, write_phantoms
from data_prep.prep import run_prep
from ldm_finetune.core.classes import row_class
from ldm_finetune.data.world import TEXTURES, world_prompts
from ldm_finetune.evaluation import metrics as M
from ldm_finetune.evaluation.registry import distance_in_floors
from ldm_finetune.train import main as train_main
from ldm_finetune.models.world_probe import load_probe
from ldm_finetune.training.mini_base import shipped_mini_base

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
# recipe -> (YAML, overrides scaled to a CPU run, the prompts it trains and the concept class each one means)
RECIPES = {
    "lora": ("lora.yaml", {"train.learning_rate": 1e-3}, {"sf_dry sf_thickness": "dry/thickness"}),
    "lora_dreambooth": ("lora_dreambooth.yaml", {"train.learning_rate": 1e-3},
                        {"a w17h3r texture": "dry/thickness"}),
    "lora_dreambooth_no_offset": ("lora_dreambooth.yaml", {"train.learning_rate": 1e-3, "noise.offset": 0.0},
                                  {"a w17h3r texture": "dry/thickness"}),
    "dreambooth_prior": ("dreambooth.yaml", {"train.learning_rate": 1e-4, "dreambooth.num_class_images": 16,
                                             "dreambooth.class_steps": 20}, {"a w17h3r texture": "dry/thickness"}),
    "dreambooth_no_prior": ("dreambooth.yaml", {"train.learning_rate": 1e-4,
                                                "dreambooth.prior_preservation": False},
                            {"a w17h3r texture": "dry/thickness"}),
    "dreambooth_base_model_prior": ("dreambooth.yaml", {"train.learning_rate": 1e-4, "dreambooth.prior": "base_model"},
                                    {"a w17h3r texture": "dry/thickness"}),
    "textual_inversion": ("textual_inversion.yaml", {"train.learning_rate": 5e-2},
                          {"A <dry-slice> of a carbon composite material": "dry/thickness"}),
    "pivotal_tuning": ("pivotal_tuning.yaml", {"pivotal.embedding_lr": 5e-2, "train.learning_rate": 1e-3},
                       {"A <dry-slice> of a carbon composite material": "dry/thickness"}),
    "full_finetune": ("full_finetune.yaml", {"train.learning_rate": 1e-4, "full.ema": False},
                      {"sf_dry sf_thickness": "dry/thickness"}),
}


def grey_set(folder: Path, cls: str) -> np.ndarray:
    rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    return np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("L"), dtype=np.float32) / 255
                     for r in rows if row_class(r) == cls])


@functools.cache
def real_sets(data: Path, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """A concept's training and validation slices, read once per run."""
    return grey_set(data / "train", cls), grey_set(data / "validation", cls)


def dark_decile(grey: np.ndarray) -> float:
    """Mean grey of the darkest tenth of the images (by each image's mean grey), in [0, 1]."""
    means = np.sort(grey.reshape(len(grey), -1).mean(1))
    return float(means[:max(1, len(means) // 10)].mean())


def distance(data: Path, cls: str, images: np.ndarray) -> float:
    """Generations of a concept against its real training slices, in real-vs-real floors (training vs validation
    slices of that concept) averaged over the registry's five distances."""
    return distance_in_floors(*real_sets(data, cls), images)


def load(base: Path, run: Path | None = None):
    """The base pipeline with a run's result applied (LoRA, embeddings, or the full fine-tune's pipeline)."""
    if run is not None and (run / "pipeline").is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base)
        if run is not None and (run / "embeddings").is_dir():
            for file in sorted((run / "embeddings").glob("*.safetensors")):
                pipe.load_textual_inversion(str(file))
        if run is not None and (run / "pytorch_lora_weights.safetensors").is_file():
            pipe.load_lora_weights(run)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompts: list[str], seeds: int, size: int = 32) -> np.ndarray:
    out = [pipe(prompts, num_inference_steps=20, guidance_scale=4.0, height=size, width=size,
                generator=torch.Generator().manual_seed(s), output_type="np").images for s in range(seeds)]
    return np.concatenate(out)  # (seeds * len(prompts), size, size, 3), prompt-major within each seed


def measure(pipe, probe, trained: dict[str, str], data: Path, base_world: np.ndarray | None, seeds: int,
            world_seeds: int) -> dict:
    prompts = world_prompts() * world_seeds  # render() is prompt-major within each seed
    world = render(pipe, world_prompts(), world_seeds)
    checks = probe.check(world, prompts)
    texture = [c["ok"] for c, p in zip(checks, prompts) if any(t in p for t in TEXTURES)]
    out = {"world_probe_ok": float(np.mean([c["ok"] for c in checks])), "texture_probe_ok": float(np.mean(texture))}
    if base_world is not None:
        grey_b, grey_f = base_world.mean(3), world.mean(3)
        out["paired_ssim"] = float(np.mean([M.ssim(a, b) for a, b in zip(grey_b, grey_f)]))
    out["learned"] = {}
    for prompt, cls in trained.items():
        images = render(pipe, [prompt], seeds).mean(3).astype(np.float32)
        out["learned"][prompt] = {"distance_to_ct": distance(data, cls, images),
                                  "dark_decile_grey": dark_decile(images)}
    return out, world


def base_and_phantom(work: Path) -> tuple[Path, object, Path]:
    """The shipped mini base (unpacked under WORK unless a cache is set), its world probe, and phantom CT slices
    prepared at 32 px: what every learning benchmark starts from."""
    os.environ.setdefault("LDM_FINETUNE_CACHE", str(work / "cache"))
    base = shipped_mini_base()
    volumes = write_phantoms(work / "volumes", (64, 128, 192), seed=0)
    run_prep(PrepConfig(volumes=[VolumeSpec(s, volumes[s]) for s in STATES], out=work / "data", resolution=32),
             show_progress=False)
    return base, load_probe(base), work / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=8, help="generations per trained prompt")
    parser.add_argument("--world-seeds", type=int, default=3, help="generations per world prompt (drift)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--out", type=Path, default=RESULTS / "learning_drift_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, probe, data = base_and_phantom(work)
        base_pipe = load(base)
        all_trained = {p: c for _, _, t in RECIPES.values() for p, c in t.items()}
        before, base_world = measure(base_pipe, probe, {p: c for p, c in all_trained.items() if "<" not in p}, data,
                                     None, args.seeds, args.world_seeds)
        record = {"steps": args.steps, "resolution": 32, "world_seeds": args.world_seeds,
                  "distance_unit": "real-vs-real floors, averaged over the five fidelity distances", "base": before,
                  "recipes": {}}
        for name in args.recipes:
            yaml_name, overrides, trained = RECIPES[name]
            run = work / "runs" / name
            settings = {"model.pretrained": base, "data.train_dir": data / "train", "output_dir": run,
                        "data.resolution": 32, "train.max_steps": args.steps, "validation.prompts": "[]",
                        "logging.report_to": "none", "checkpoint.every_steps": "null", **overrides}
            if name.startswith("pivotal"):
                settings["pivotal.ti_steps"] = args.steps // 2
            started = time.time()
            code = train_main([str(ROOT / "recipes" / yaml_name), *[f"{k}={v}" for k, v in settings.items()]])
            entry = {"overrides": {k: v for k, v in overrides.items()}, "exit": code,
                     "train_seconds": round(time.time() - started, 1)}
            if code == 0:
                after, _ = measure(load(base, run), probe, trained, data, base_world, args.seeds, args.world_seeds)
                for prompt in trained:
                    b = before["learned"].get(prompt)
                    if b is not None:
                        after["learned"][prompt]["before"] = b["distance_to_ct"]
                entry.update(after)
            record["recipes"][name] = entry
            print(name, json.dumps(entry)[:400], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
