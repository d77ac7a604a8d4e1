"""The study's three findings, measured where each one lives, over several training seeds and two lengths (CPU).

Fine-tunes the shipped mini base on phantom CT (one DreamBooth concept: dry / thickness slices as "a w17h3r
texture", class prompt "a texture") and measures, for every arm, training seed and length:
- class prompt (prior preservation keeps the class): the DreamBooth class nouns ("a texture", "a black and white
  texture"): distance to the concept's CT in real-vs-real floors (high = still the base's texture), paired SSIM
  against the base's generations from the same seeds, and the share the world probe still reads as a texture;
- unrelated prompts (what else drifts): the world prompts, probe accuracy split by attribute (kind, colour per hue,
  background), colourfulness ratio tuned / base, paired SSIM;
- dark frames (offset noise reaches CT's dark slices): the darkest-decile mean grey over `--dark` generations of the
  instance prompt, next to the real training slices' darkest decile; and the instance's distance to CT (learned).

Arms: DreamBooth without a prior, with class images, with the frozen base as prior (the prior finding); LoRA +
DreamBooth with offset noise 0.1 and without (the offset finding).

    python benchmarks/study_findings.py                       # 5 arms x 3 seeds x (100, 300) steps, ~40 min
    python benchmarks/study_findings.py --arms no_prior --seeds 0 --lengths 20   # a smoke run
    # two processes of one thread each use 2 cores better than one of two; then join them
    OMP_NUM_THREADS=1 python benchmarks/study_findings.py --arms no_prior class_image_prior lora_offset_0.1 --out a.json
    OMP_NUM_THREADS=1 python benchmarks/study_findings.py --arms base_model_prior lora_no_offset --out b.json
    python benchmarks/study_findings.py --merge a.json b.json

Results: results/study_findings_cpu.json (every run, and mean +- sd per arm and length).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_drift import base_and_phantom, dark_decile, distance, load, real_sets, render  # noqa: E402

from ldm_finetune.data.world import CLASS_PROMPTS, COLOURS, TEXTURES, parse_prompt, world_prompts  # noqa: E402
from ldm_finetune.evaluation import metrics as M  # noqa: E402
from ldm_finetune.models.stable_diffusion import render as render_seeds  # noqa: E402
from ldm_finetune.train import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "study_findings_cpu.json"
CONCEPT = "dry/thickness"
INSTANCE = "a w17h3r texture"
CONCEPTS = ("[{select: {state: dry, orientation: thickness}, num_images: 9, caption: 'a w17h3r texture', "
            "class_prompt: 'a texture'}]")
DREAMBOOTH = {"train.learning_rate": 1e-4, "dreambooth.num_class_images": 16, "dreambooth.class_steps": 20}
ARMS = {  # arm -> (recipe, overrides)
    "no_prior": ("dreambooth.yaml", DREAMBOOTH | {"dreambooth.prior_preservation": False}),
    "class_image_prior": ("dreambooth.yaml", DREAMBOOTH),
    "base_model_prior": ("dreambooth.yaml", DREAMBOOTH | {"dreambooth.prior": "base_model"}),
    "lora_offset_0.1": ("lora_dreambooth.yaml", {"train.learning_rate": 1e-3, "noise.offset": 0.1}),
    "lora_no_offset": ("lora_dreambooth.yaml", {"train.learning_rate": 1e-3, "noise.offset": 0.0}),
}


def seeded(pipe, prompt: str, n: int) -> np.ndarray:
    """(n, 32, 32, 3): `prompt` with seeds 0..n-1, batched with one generator per seed (the learning benchmark's
    sampler: 20 steps, guidance 4)."""
    return np.stack(render_seeds(pipe, [prompt], list(range(n)), 20, 4.0, height=32, width=32)[0])


def class_prompt_scores(pipe, probe, data: Path, seeds: int, base: dict | None) -> tuple[dict, dict]:
    """Scores per class prompt, and its grey generations (what later runs are paired with)."""
    out, greys = {}, {}
    for prompt in CLASS_PROMPTS:
        rgb = seeded(pipe, prompt, seeds)
        grey = rgb.mean(3).astype(np.float32)
        row = {"floors_to_ct": distance(data, CONCEPT, grey),
               "probe_texture": float(np.mean([c["ok"] for c in probe.check(rgb, [prompt] * len(rgb))]))}
        if base is not None:
            row["paired_ssim"] = float(np.mean([M.ssim(a, b) for a, b in zip(base["class_grey"][prompt], grey)]))
        out[prompt], greys[prompt] = row, grey
    return out, greys


def unrelated_scores(pipe, probe, seeds: int, base: dict | None) -> tuple[dict, np.ndarray]:
    """Probe accuracy per attribute over the world prompts (render() is prompt-major within each seed)."""
    prompts = world_prompts() * seeds
    rgb = render(pipe, world_prompts(), seeds)
    checks = probe.check(rgb, prompts)
    out = {"kind": float(np.mean([c["kind"] for c in checks])),
           "background": float(np.mean([c["background"] for c in checks if "background" in c])),
           "all": float(np.mean([c["ok"] for c in checks])),
           "colourfulness": float(np.mean([M.colourfulness(x) for x in rgb]))}
    for hue in COLOURS:
        asked = [c["colour"] for c, p in zip(checks, prompts) if "colour" in c and parse_prompt(p).colour == hue]
        out[f"colour_{hue}"] = float(np.mean(asked))
    out["texture_kinds"] = float(np.mean([c["kind"] for c, p in zip(checks, prompts)
                                          if parse_prompt(p).kind in TEXTURES]))
    if base is not None:
        out["colourfulness_ratio"] = out["colourfulness"] / base["unrelated"]["colourfulness"]
        out["paired_ssim"] = float(np.mean([M.ssim(a, b) for a, b in zip(base["world_grey"], rgb.mean(3))]))
    return out, rgb.mean(3)


def measure(pipe, probe, data: Path, args, base: dict | None = None) -> dict:
    classes, class_grey = class_prompt_scores(pipe, probe, data, args.class_seeds, base)
    unrelated, world_grey = unrelated_scores(pipe, probe, args.world_seeds, base)
    instance = seeded(pipe, INSTANCE, args.dark).mean(3).astype(np.float32)
    out = {"class_prompt": classes, "unrelated": unrelated,
           "dark": {"dark_decile_grey": dark_decile(instance), "n": len(instance)},
           "learned": {"floors_to_ct": distance(data, CONCEPT, instance[:args.class_seeds])}}
    if base is None:  # the base's images are what every run is paired with
        out |= {"class_grey": class_grey, "world_grey": world_grey}
    return out


def train(arm: str, steps: int, seed: int, base_dir: Path, data: Path, run: Path) -> tuple[int, float]:
    recipe, overrides = ARMS[arm]
    settings = {"model.pretrained": base_dir, "data.train_dir": data / "train", "output_dir": run, "seed": seed,
                "data.resolution": 32, "data.concepts": CONCEPTS, "train.max_steps": steps,
                "validation.prompts": "[]", "logging.report_to": "none", "checkpoint.every_steps": "null",
                **overrides}
    started = time.time()
    code = train_main([str(ROOT / "recipes" / recipe), *[f"{k}={v}" for k, v in settings.items()]])
    return code, round(time.time() - started, 1)


def flatten(entry: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and key != "n":
            out[prefix + key] = float(value)
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over training seeds of every number, per arm and length."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run["exit"] == 0:
            groups.setdefault(f"{run['arm']}@{run['steps']}", []).append(flatten(run["scores"]))
    return {key: {name: [round(float(np.mean([r[name] for r in rows])), 4),
                         round(float(np.std([r[name] for r in rows])), 4)] for name in rows[0]} | {"seeds": len(rows)}
            for key, rows in groups.items()}


def _cell(summary: dict, key: str, metric: str, digits: int = 2) -> str:
    mean, sd = summary.get(key, {}).get(metric, (float("nan"), float("nan")))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def tables(record: dict) -> str:
    """The README's three tables (markdown) from a record: mean ± sd over the training seeds."""
    summary, base = record["summary"], record["base"]
    lengths = record["settings"]["lengths"]
    cls = "class_prompt/a texture"
    lines = ["| prior | steps | 'a texture': floors to CT | paired SSIM | read as a texture | instance: floors to CT |",
             "|---|---|---|---|---|---|",
             f"| (base) | 0 | {base['class_prompt']['a texture']['floors_to_ct']:.1f} | 1 | "
             f"{base['class_prompt']['a texture']['probe_texture']:.2f} | {base['learned']['floors_to_ct']:.1f} |"]
    for steps in lengths:
        for arm in ("no_prior", "class_image_prior", "base_model_prior"):
            key = f"{arm}@{steps}"
            lines.append(f"| {arm} | {steps} | {_cell(summary, key, cls + '/floors_to_ct', 1)} | "
                         f"{_cell(summary, key, cls + '/paired_ssim')} | {_cell(summary, key, cls + '/probe_texture')} "
                         f"| {_cell(summary, key, 'learned/floors_to_ct', 1)} |")
    hues = list(COLOURS)
    lines += ["", "| arm | steps | world probe | kind | background | " + " | ".join(hues)
              + " | colourfulness ratio | paired SSIM |", "|---" * (7 + len(hues)) + "|"]
    u = base["unrelated"]
    lines.append("| (base) | 0 | " + " | ".join(f"{u[k]:.2f}" for k in ["all", "kind", "background"]
                                                + [f"colour_{h}" for h in hues]) + " | 1 | 1 |")
    for steps in lengths:
        for arm in ARMS:
            key = f"{arm}@{steps}"
            cells = [_cell(summary, key, f"unrelated/{k}") for k in ["all", "kind", "background"]
                     + [f"colour_{h}" for h in hues] + ["colourfulness_ratio", "paired_ssim"]]
            lines.append(f"| {arm} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | steps | darkest-decile grey | instance: floors to CT |", "|---|---|---|---|",
              f"| real slices | - | {record['real_dark_decile_grey']:.3f} | - |",
              f"| (base) | 0 | {base['dark']['dark_decile_grey']:.3f} | {base['learned']['floors_to_ct']:.1f} |"]
    for steps in lengths:
        for arm in ("lora_offset_0.1", "lora_no_offset"):
            key = f"{arm}@{steps}"
            lines.append(f"| {arm} | {steps} | {_cell(summary, key, 'dark/dark_decile_grey', 3)} | "
                         f"{_cell(summary, key, 'learned/floors_to_ct', 1)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--lengths", nargs="+", type=int, default=[100, 300], help="training steps")
    parser.add_argument("--class-seeds", type=int, default=16, help="generations per class prompt")
    parser.add_argument("--world-seeds", type=int, default=3, help="generations per world prompt")
    parser.add_argument("--dark", type=int, default=64, help="generations of the instance prompt (dark frames)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tables", action="store_true", help="print the README's tables from --out and stop")
    parser.add_argument("--merge", nargs="+", type=Path, help="join records of the same settings run as separate "
                        "processes (e.g. one per arm group) into --out, and stop")
    args = parser.parse_args()
    if args.merge:
        records = [json.loads(path.read_text()) for path in args.merge]
        joined = records[0] | {"runs": [run for r in records for run in r["runs"]]}
        joined["settings"]["arms"] = [arm for r in records for arm in r["settings"]["arms"]]
        joined["summary"] = summarise(joined["runs"])
        args.out.write_text(json.dumps(joined, indent=1) + "\n")
        return
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_dir, probe, data = base_and_phantom(work)
        base = measure(load(base_dir), probe, data, args)
        record = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "concept": CONCEPT, "instance_prompt": INSTANCE,
                  "real_dark_decile_grey": dark_decile(real_sets(data, CONCEPT)[0]),
                  "base": {k: v for k, v in base.items() if not k.endswith("_grey")}, "runs": []}
        for steps in args.lengths:
            for arm in args.arms:
                for seed in args.seeds:
                    run = work / "runs" / f"{arm}_{steps}_{seed}"
                    code, seconds = train(arm, steps, seed, base_dir, data, run)
                    entry = {"arm": arm, "steps": steps, "seed": seed, "exit": code, "train_seconds": seconds}
                    if code == 0:
                        entry["scores"] = measure(load(base_dir, run), probe, data, args, base)
                    record["runs"].append(entry)
                    record["summary"] = summarise(record["runs"])
                    print(arm, steps, seed, json.dumps(entry)[:300], flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
