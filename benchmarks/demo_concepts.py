"""Which LoRA+DreamBooth settings make the demo's fine-tune draw each concept as asked (issue 23 part 4: distance in
floors <= 0.5x the base's, classifier accuracy >= 50 %): the demo's own stage, trained per variant on one demo
folder's data and mini base, scored by the report's own numbers (demo_under_load.headline). `--ceiling` scores what
no latent model on this base can beat: real validation slices passed through the base's VAE (encode, decode).

    python -m ldm_finetune.cli demo --out /tmp/demo      # once: the dataset and the mini base
    python benchmarks/demo_concepts.py /tmp/demo --variants base text_encoder
    python benchmarks/demo_concepts.py /tmp/demo --variants --ceiling

Results: results/demo_concepts.json (one entry per variant, merged into what is there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_under_load import headline  # noqa: E402

from ldm_finetune import demo  # noqa: E402
from ldm_finetune.demo_settings import DemoSettings  # noqa: E402
from ldm_finetune.evaluation.config import run_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "demo_concepts.json"

# overrides of the demo's LoRA+DreamBooth launch, per variant
VARIANTS = {
    "base": {},
    "text_encoder": {"lora.text_encoder": "true"},
    "steps600": {"train.max_steps": 600},
    "all_targets": {"lora.targets": "[attention,feedforward,resnet]"},
    "dropout": {"data.caption_dropout": 0.2},
    "lr3e-4": {"train.learning_rate": 3e-4},
    "offset0.3": {"noise.offset": 0.3},
    "offset0.6": {"noise.offset": 0.6},
    "full": {"recipe": "full", "train.learning_rate": 2e-4},
}


def train(folder: Path, name: str, overrides: dict) -> None:
    s = DemoSettings(out=folder, quiet=True)
    run = folder / "runs" / f"concepts_{name}"
    shutil.rmtree(run, ignore_errors=True)
    concepts = ", ".join(f"{{select: {{state: {st}, orientation: {o}}}, num_images: 9, caption: "
                         f"'{demo.dreambooth_prompt(st, o)}', class_prompt: 'a texture'}}"
                         for st in demo.STATE_IDENTIFIERS for o in demo.ORIENTATION_IDENTIFIERS)
    demo.launch("lora_dreambooth.yaml", demo._sd_overrides(s, f"concepts_{name}") | {
        "data.concepts": f"[{concepts}]", "validation.prompts": "[a texture]"} | overrides, s)


def score(folder: Path, name: str, run: Path) -> dict:
    cfg = demo.evaluation_config(DemoSettings(out=folder))
    lora = next(m for m in cfg["models"] if m["name"] == "mini-lora-dreambooth")
    if (run / "pipeline").is_dir():  # a full fine-tune: its own pipeline, no LoRA
        lora.update(model=str(run / "pipeline"), loras=[])
    else:
        lora["loras"] = [str(run)]
    cfg["models"] = [lora]
    cfg["probes"] = []
    out = folder / "concepts_eval" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "evaluate.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_config(out / "evaluate.yaml", out)
    return headline(json.loads((out / "metrics.json").read_text()))["mini-lora-dreambooth"]


def ceiling(folder: Path, per_class: int = 16) -> dict:
    """Real validation slices at the SD size, through the mini base's VAE and back, scored like a model; the same
    slices unchanged beside them (what the classifier and the floors give real images at that size)."""
    size = DemoSettings().sd_resolution
    vae = AutoencoderKL.from_pretrained(folder / "mini-base", subfolder="vae").eval()
    valid = folder / "dataset" / "validation"
    rows = [json.loads(line) for line in (valid / "metadata.jsonl").read_text().splitlines() if line.strip()]
    out = folder / "concepts_eval" / "ceiling"
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    for cls in sorted({(r["state"], r["orientation"]) for r in rows}):
        mine = [r for r in rows if (r["state"], r["orientation"]) == cls]
        picked = [mine[i] for i in rng.choice(len(mine), min(per_class, len(mine)), replace=False)]
        x = np.stack([np.asarray(Image.open(valid / r["file_name"]).convert("RGB").resize((size, size),
                                                                                           Image.BICUBIC))
                      for r in picked]).astype(np.float32) / 127.5 - 1
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        for name, batch in (("vae-roundtrip", y), ("real-at-sd-size", x)):
            target = out / name / f"{cls[0]}__{cls[1]}"
            target.mkdir(parents=True)
            for i, image in enumerate(batch):
                grey = ((image.mean(0).numpy() + 1) * 127.5).round().astype(np.uint8)
                Image.fromarray(grey).save(target / f"{i}.png")
    cfg = {"real": str(folder / "dataset"), "probes": [], "bootstrap": 20, "seeds": list(range(per_class)),
           "models": [{"name": n, "kind": "folder", "path": str(out / n)}
                      for n in ("vae-roundtrip", "real-at-sd-size")]}
    (out / "evaluate.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_config(out / "evaluate.yaml", out / "evaluation")
    return headline(json.loads((out / "evaluation" / "metrics.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a finished demo's --out (dataset/ and mini-base/)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ceiling", action="store_true", help="also score real slices through the base's VAE")
    parser.add_argument("--label", default="", help="prefix of the results' keys (e.g. another mini base)")
    parser.add_argument("--score-only", action="store_true", help="score the variants' existing runs again")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.variants:
        started = time.perf_counter()
        run = args.folder / "runs" / f"concepts_{name}"
        if not args.score_only:
            train(args.folder, name, VARIANTS[name])
        trained = time.perf_counter() - started
        results[args.label + name] = {"folder": str(args.folder), "overrides": VARIANTS[name],
                                      "train_seconds": round(trained, 1)} | score(args.folder, name, run)
        print(args.label + name, results[args.label + name], flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if args.ceiling:
        results[args.label + "ceiling"] = {"folder": str(args.folder)} | ceiling(args.folder)
        print(results[args.label + "ceiling"], flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
