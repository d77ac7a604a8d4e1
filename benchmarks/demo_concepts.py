"""Which LoRA+DreamBooth settings make the demo's fine-tune draw each concept as asked (issue 23 part 4: distance in
floors <= 0.5x the base's, classifier accuracy >= 50 %): the demo's own stage, trained per variant on one demo
folder's data and mini base, scored by the report's own numbers (demo_under_load.headline). `--ceiling` scores what
no latent model on this base can beat: real validation slices passed through the base's VAE (encode, decode).

    python -m ldm_finetune.cli demo --out /tmp/demo      # once: the dataset and the mini base
    python benchmarks/demo_concepts.py /tmp/demo --variants base text_encoder
    python benchmarks/demo_concepts.py /tmp/demo --variants --ceiling --blur 0.5 1.0
    python benchmarks/demo_concepts.py /tmp/demo --variants --vae-space   # after a whole demo: its generations
    python benchmarks/demo_concepts.py /tmp/demo --variants --vae-variants 8x600 16x600   # ~20 min each, 1 thread

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
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_under_load import headline  # noqa: E402

from ldm_finetune import demo  # noqa: E402
from ldm_finetune.core.io import load_image  # noqa: E402
from ldm_finetune.data.images import to_pixel_values  # noqa: E402
from ldm_finetune.demo_settings import DemoSettings  # noqa: E402
from ldm_finetune.evaluation.config import run_config  # noqa: E402
from ldm_finetune.models.mini_base import MiniArchitecture  # noqa: E402
from ldm_finetune.training.fit import fit  # noqa: E402
from ldm_finetune.training.mini_base import MiniBaseSettings, VaeTask, vae_phase_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "demo_concepts.json"

concepts = demo.dreambooth_concepts


# overrides of the demo's LoRA+DreamBooth launch as it was until 2026-12-05 (900 steps, 9 slices per concept,
# attention only: "base"), per variant; "demo" is the demo's own since
VARIANTS = {
    "base": {},
    "demo": demo.LORA_DREAMBOOTH | {"train.max_steps": DemoSettings.lora_steps},
    "text_encoder": {"lora.text_encoder": "true"},
    "steps450": {"train.max_steps": 450},
    "steps600": {"train.max_steps": 600},
    "steps900": {"train.max_steps": 900},
    "steps900_seed1": {"train.max_steps": 900, "seed": 1},
    "steps900_seed2": {"train.max_steps": 900, "seed": 2},
    "base_seed1": {"seed": 1},
    "steps1200": {"train.max_steps": 1200},
    "all_targets": {"lora.targets": "[attention,feedforward,resnet]"},
    "dropout": {"data.caption_dropout": 0.2},
    "lr3e-4": {"train.learning_rate": 3e-4},
    "offset0.3": {"noise.offset": 0.3},
    "offset0.6": {"noise.offset": 0.6},
    "full": {"recipe": "full", "train.learning_rate": 2e-4},
    "images36": {"data.concepts": concepts(36)},
    "images36_all_targets": {"data.concepts": concepts(36), "lora.targets": "[attention,feedforward,resnet]"},
    "text_encoder_all_targets": {"lora.text_encoder": "true", "lora.targets": "[attention,feedforward,resnet]"},
    "steps1800": {"train.max_steps": 1800},
    "rank64": {"lora.rank": 64, "lora.alpha": 64},
    "images36_all_targets_te": {"data.concepts": concepts(36), "lora.targets": "[attention,feedforward,resnet]",
                                "lora.text_encoder": "true"},
    "images81_all_targets": {"data.concepts": concepts(81), "lora.targets": "[attention,feedforward,resnet]"},
    "images36_all_targets_steps1800": {"data.concepts": concepts(36), "lora.targets": "[attention,feedforward,resnet]",
                                       "train.max_steps": 1800},
    "images36_all_targets_te_steps1800": {"data.concepts": concepts(36),
                                          "lora.targets": "[attention,feedforward,resnet]",
                                          "lora.text_encoder": "true", "train.max_steps": 1800},
}
VARIANTS |= {f"images36_all_targets_steps1800_seed{seed}": VARIANTS["images36_all_targets_steps1800"] | {"seed": seed}
             for seed in (1, 2)}
VARIANTS |= {"images36_all_targets_steps1200": VARIANTS["images36_all_targets"] | {"train.max_steps": 1200},
             "images36_all_targets_steps1200_cosine": VARIANTS["images36_all_targets"] | {
                 "train.max_steps": 1200, "train.lr_scheduler": "cosine"}}


def train(folder: Path, name: str, overrides: dict) -> None:
    s = DemoSettings(out=folder, quiet=True)
    run = folder / "runs" / f"concepts_{name}"
    shutil.rmtree(run, ignore_errors=True)
    demo.launch("lora_dreambooth.yaml", demo._sd_overrides(s, f"concepts_{name}", 900) | {
        "data.concepts": concepts(9), "validation.prompts": "[a texture]"} | overrides, s)


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
    vae = in_vae_space(folder, {"mini-lora-dreambooth": out / "images" / "mini-lora-dreambooth"}, out / "vae_space")
    return headline(json.loads((out / "metrics.json").read_text()))["mini-lora-dreambooth"] | {
        "vae_space": {"validation_round_trip_accuracy": vae["validation_round_trip_accuracy"]}
        | vae["mini-lora-dreambooth"]}


def ceiling(folder: Path, per_class: int = 16, vae_dir: Path | None = None, blur: tuple[float, ...] = ()) -> dict:
    """Real validation slices at the SD size, through the mini base's VAE (or `vae_dir`) and back, scored like a
    model; the same slices unchanged beside them (what the classifier and the floors give real images at that
    size), and blurred with each Gaussian sigma in `blur` (px): how much sharpness the classifier needs. Each set
    also gets its PSNR against the unchanged slices."""
    size = DemoSettings().sd_resolution
    vae = AutoencoderKL.from_pretrained(vae_dir or folder / "mini-base" / "vae").eval()
    valid = folder / "dataset" / "validation"
    rows = [json.loads(line) for line in (valid / "metadata.jsonl").read_text().splitlines() if line.strip()]
    out = folder / "concepts_eval" / ("ceiling" if vae_dir is None else f"ceiling_{vae_dir.parent.name}")
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    squared_errors: dict[str, list[float]] = {}
    for cls in sorted({(r["state"], r["orientation"]) for r in rows}):
        mine = [r for r in rows if (r["state"], r["orientation"]) == cls]
        picked = [mine[i] for i in rng.choice(len(mine), min(per_class, len(mine)), replace=False)]
        # shrunk to the SD side the way training shrinks them (data.images), so the round trip starts from what
        # the LoRA learns from
        x = torch.stack([to_pixel_values(load_image(valid / r["file_name"]), size) for r in picked])
        sets = {"vae-roundtrip": round_trip(vae, x), "real-at-sd-size": x}
        sets |= {f"real-blur-{sigma}": torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, sigma, sigma)))
                 for sigma in blur}
        for name, batch in sets.items():
            target = out / name / f"{cls[0]}__{cls[1]}"
            target.mkdir(parents=True)
            for i, image in enumerate(batch):
                save_grey(image, target / f"{i}.png")
                squared_errors.setdefault(name, []).append(float(((image - x[i]) / 2).pow(2).mean()))
    cfg = {"real": str(folder / "dataset"), "probes": [], "bootstrap": 20, "seeds": list(range(per_class)),
           "models": [{"name": n, "kind": "folder", "path": str(out / n)} for n in squared_errors]}
    (out / "evaluate.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_config(out / "evaluate.yaml", out / "evaluation")
    scores = headline(json.loads((out / "evaluation" / "metrics.json").read_text()))
    for name, errors in squared_errors.items():
        if name != "real-at-sd-size":
            scores[name]["psnr_db"] = round(float(np.mean([-10 * np.log10(e) for e in errors])), 2)
    return scores


def round_trip(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


def save_grey(image: torch.Tensor, path: Path) -> None:
    Image.fromarray(((image.mean(0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(path)


SD_MODELS = ("mini-base", "mini-lora-dreambooth", "mini-textual-inversion")


def vae_dataset(folder: Path, batch: int = 256) -> Path:
    """The demo's dataset with every slice, train and validation, replaced by its round trip through the mini base's
    VAE at the SD size (made once per demo folder)."""
    size = DemoSettings().sd_resolution
    out = folder / "concepts_eval" / "vae_dataset"
    if (out / "validation" / "metadata.jsonl").is_file():
        return out
    vae = AutoencoderKL.from_pretrained(folder / "mini-base" / "vae").eval()
    shutil.rmtree(out, ignore_errors=True)
    for split in ("train", "validation"):
        source, target = folder / "dataset" / split, out / split
        target.mkdir(parents=True)
        names = [json.loads(line)["file_name"] for line in (source / "metadata.jsonl").read_text().splitlines()
                 if line.strip()]
        for start in range(0, len(names), batch):
            chunk = names[start:start + batch]
            x = torch.stack([to_pixel_values(load_image(source / n), size) for n in chunk])
            for name, image in zip(chunk, round_trip(vae, x)):
                save_grey(image, target / name)
        shutil.copy(source / "metadata.jsonl", target)  # last: its presence marks a finished split
    return out


def in_vae_space(folder: Path, images: dict[str, Path], out: Path) -> dict:
    """Generated image folders scored against vae_dataset: the classifier learns each concept as the decoder can
    draw it, so what a latent model learned is read apart from what its decoder can show (the report's classifier,
    trained on the slices themselves, reads real validation slices after the round trip at 21 %)."""
    cfg = {"real": str(vae_dataset(folder)), "probes": [], "bootstrap": 20,
           "seeds": list(range(DemoSettings().eval_images)),
           "models": [{"name": m, "kind": "folder", "path": str(path)} for m, path in images.items()]}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "evaluate.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_config(out / "evaluate.yaml", out / "evaluation")
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    classifier = metrics["classifier"]
    ceiling = classifier["models"][next(iter(images))].get("ceiling_accuracy", classifier.get("ceiling_accuracy"))
    return {"validation_round_trip_accuracy": ceiling} | headline(metrics)


def vae_space(folder: Path) -> dict:
    """The demo's own SD generations (folder/evaluation/images) scored in the VAE's image space."""
    images = folder / "evaluation" / "images"
    return in_vae_space(folder, {m: images / m for m in SD_MODELS}, folder / "concepts_eval" / "vae_space")


def vae_variant(folder: Path, latent_channels: int, steps: int) -> dict:
    """The mini base's VAE phase alone, with another latent channel count or length (same data, seed and rate),
    and the ceiling its round trip gives."""
    settings = MiniBaseSettings(vae_steps=steps, arch=MiniArchitecture(latent_channels=latent_channels))
    work = folder / "vae_variants" / f"latent{latent_channels}_steps{steps}"
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    fit(vae_phase_config(work / "run", settings), VaeTask(settings, work / "vae"))
    return {"latent_channels": latent_channels, "steps": steps, "train_seconds": round(time.perf_counter() - started),
            "threads": torch.get_num_threads()} | ceiling(folder, vae_dir=work / "vae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a finished demo's --out (dataset/ and mini-base/)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ceiling", action="store_true", help="also score real slices through the base's VAE")
    parser.add_argument("--blur", type=float, nargs="*", default=[], help="with --ceiling: also real slices blurred "
                        "by these Gaussian sigmas (px)")
    parser.add_argument("--vae-variants", nargs="*", default=[], metavar="CHANNELSxSTEPS",
                        help="retrain the base's VAE phase with this latent channel count and length (e.g. 8x600) "
                        "and score its ceiling")
    parser.add_argument("--vae-space", action="store_true", help="score the demo's SD generations against real "
                        "slices passed through the base's VAE (the classifier learns what the decoder can draw)")
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
        results[args.label + "ceiling"] = {"folder": str(args.folder)} | ceiling(args.folder, blur=tuple(args.blur))
        print(results[args.label + "ceiling"], flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if args.vae_space:
        results[args.label + "vae_space"] = {"folder": str(args.folder)} | vae_space(args.folder)
        print(results[args.label + "vae_space"], flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for variant in args.vae_variants:
        channels, steps = (int(v) for v in variant.split("x"))
        results[f"{args.label}ceiling_vae_{variant}"] = vae_variant(args.folder, channels, steps)
        print(variant, results[f"{args.label}ceiling_vae_{variant}"], flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
