"""`ldm-finetune demo`: the whole pipeline on built-in synthetic data, on a CPU, in about ten minutes.

    phantom CT volumes -> prep (captioned thickness/warp/weft slices, leak-free split) -> the mini base (a small
    SD-architecture model pretrained on a world of coloured shapes and textures, shipped with the package)
    -> LoRA+DreamBooth and Textual Inversion (recipes/*.yaml through `accelerate launch`) -> generation
    -> class-conditional pixel DDPM from scratch (recipes/ddpm_pixel.yaml through `accelerate launch`)
    -> evaluation report (fidelity per class, classifier, memorisation, 3D consistency, prompt-drift probes)

The mini base knows a little language ("a red circle", "a striped texture") and no CT: what its fine-tuned LoRA and
embeddings show of CT they learned in the demo, and what they still draw for world prompts is their drift. The pixel
DDPM trains from scratch on the slices; the report says which is which.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from data_prep.config import PrepConfig, VolumeSpec
from data_prep.geometry import ORIENTATIONS
from data_prep.phantom import STATES, write_phantoms
from data_prep.prep import run_prep, summary_table
from ldm_finetune.core.classes import class_key
from ldm_finetune.core.errors import TrainingStopped, UserError
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.core.threads import cpu_threads, use_cpu_threads
from ldm_finetune.demo_settings import DemoSettings
from ldm_finetune.evaluation.config import run_config
from ldm_finetune.generation.generate import GenerateSettings, generate
from ldm_finetune.training.mini_base import shipped_mini_base

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


# LoRA+DreamBooth's identifiers: the study's (w17h3r dry, 1nj3C7 injected, th1ck thickness, w@rp warp), one token
# each in the mini base, plus two words of its vocabulary that no world caption uses, as rare to it as the study's,
# for the state and the cut the study named none for. One concept per class: "a w17h3r th1ck texture".
STATE_IDENTIFIERS = {"dry": "w17h3r", "dry-compacted": "compressed", "injected": "1nj3C7"}
ORIENTATION_IDENTIFIERS = {"thickness": "th1ck", "warp": "w@rp", "weft": "weft"}


def dreambooth_prompt(state: str, orientation: str) -> str:
    return f"a {STATE_IDENTIFIERS[state]} {ORIENTATION_IDENTIFIERS[orientation]} texture"


DREAMBOOTH_PROMPTS = {class_key(st, o): dreambooth_prompt(st, o) for st in STATE_IDENTIFIERS
                      for o in ORIENTATION_IDENTIFIERS}
DREAMBOOTH_SAMPLES = [dreambooth_prompt(st, o) for st, o in
                      (("dry", "thickness"), ("dry-compacted", "warp"), ("injected", "weft"))]


# Textual Inversion's initialisers: single tokens of the mini base's vocabulary
TI_INITIALIZERS = {"dry": "dry", "dry-compacted": "compacted", "injected": "injected"}


TI_CAPTION = "A {token} of a carbon composite material"

# the mini base draws world prompts right at every guidance from 1.5 to 7.5 (world probe 96-100 %, 100 % at 3:
# benchmarks/README.md, mini_base); at 3 the demo's LoRA+DreamBooth reads as the concept asked 18 % of the time,
# against 7 % at SD's usual 7.5 (measured on the base before it)
MINI_BASE_GUIDANCE = 3.0


# a 32-px pixel DDPM that learns the weave on 2 CPU cores in ~5 min (0.3 s/step): tows and binder gaps in the cuts,
# the interlaced tows of the thickness planes. DDIM with eta 1 samples it cleanly; with eta 0 some seeds of so
# brief a training end in residual noise (measured: 2 of 4 seeds), the stochastic steps correct the score's errors.
# The rate decays to 0 (cosine) under an EMA of 0.995: over 1,000 steps that reads 62.6 % of its slices as the class
# asked for (four training seeds), where 500 steps at a constant rate and EMA 0.99 read 56.6 % (three)
DDPM_MODEL = {"model.base_channels": 32, "model.channel_mult": "[1,2,2]", "model.layers_per_block": 1,
              "model.attention_resolutions": "[8]", "diffusion.schedule": "cosine", "train.batch_size": 16,
              "train.learning_rate": 1e-3, "train.lr_scheduler": "cosine", "ema.decay": 0.995,
              "validation.eta": 1.0, "validation.images_per_class": 4}


# what each stage writes that a rerun must not reuse (training appends to metrics.jsonl, evaluation reuses images)
STAGE_OUTPUTS = {"lora-dreambooth": ["runs/lora_dreambooth"], "textual-inversion": ["runs/textual_inversion"],
                 "generate": ["generated"], "ddpm-pixel": ["runs/ddpm_pixel"], "evaluate": ["evaluation"]}


def ti_token(state: str) -> str:
    return f"<{state}-slice>"


def run_demo(settings: DemoSettings) -> Path:
    """Every stage in order; returns the evaluation report's path."""
    out = settings.out
    _claim(out)
    stages = [("phantom", "synthetic CT volumes of a 3D-woven composite", _phantom),
              ("prep", "captioned thickness/warp/weft slices, split without leakage", _prep),
              ("mini-base", "the small pretrained text-to-image base, unpacked (no download)", _mini_base),
              ("lora-dreambooth", "recipes/lora_dreambooth.yaml on the mini base", _lora_dreambooth),
              ("textual-inversion", "recipes/textual_inversion.yaml on the mini base", _textual_inversion),
              ("generate", "images from the LoRA and the embeddings, loaded back as files", _generate),
              ("ddpm-pixel", "recipes/ddpm_pixel.yaml: a class-conditional pixel DDPM from scratch", _ddpm),
              ("evaluate", "fidelity, memorisation, consistency and prompt drift, as an HTML report", _evaluate)]
    timings = {}
    for k, (name, what, stage) in enumerate(stages, 1):
        for stale in STAGE_OUTPUTS.get(name, []):  # a rerun starts each stage afresh, never on an older run's files
            shutil.rmtree(out / stale, ignore_errors=True)
        print(f"\n[{k}/{len(stages)}] {name}: {what}", flush=True)
        started = time.perf_counter()
        use_cpu_threads()  # for the stages that run in this process (generation, evaluation)
        stage(settings)
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"[{k}/{len(stages)}] {name} done in {timings[name]:.0f} s", flush=True)
        _mark(out, {"status": "running", "done": list(timings), "seconds": timings})
    report = out / "evaluation" / "report.html"
    _mark(out, {"status": "done", "seconds": timings, "report": str(report),
                "settings": {k: str(v) for k, v in asdict(settings).items()}})
    _summary(settings, timings, report)
    return report


def _claim(out: Path) -> None:
    """Refuse a folder that holds something else; mark it as a demo folder before any work, so a rerun after an
    interruption may reuse it."""
    if out.exists() and any(out.iterdir()) and not (out / "demo.json").is_file():
        raise UserError(f"{out}: folder is not empty and is not a demo output; choose another --out")
    if not (RECIPES / "lora_dreambooth.yaml").is_file():
        raise UserError(f"{RECIPES}: the recipe YAMLs are missing; run the demo from a source checkout "
                        "(pip install -e .)")
    out.mkdir(parents=True, exist_ok=True)
    _mark(out, {"status": "running"})


def _mark(out: Path, state: dict) -> None:
    (out / "demo.json").write_text(json.dumps(state, indent=2) + "\n")


def _phantom(s: DemoSettings) -> None:
    paths = write_phantoms(s.out / "volumes", tuple(s.shape), seed=s.seed)
    for state, path in paths.items():
        print(f"  {path}  ({state})")


def _prep(s: DemoSettings) -> None:
    volumes = [VolumeSpec(p.stem, p) for p in sorted((s.out / "volumes").glob("*.tif"))]
    manifest = run_prep(PrepConfig(volumes=volumes, out=s.out / "dataset", resolution=s.resolution,
                                   overwrite=True), show_progress=not s.quiet)
    print(summary_table(manifest))


def _mini_base(s: DemoSettings) -> None:
    shutil.copytree(shipped_mini_base(), s.out / "mini-base", dirs_exist_ok=True)
    info = json.loads((s.out / "mini-base" / "mini_base.json").read_text())
    print(f"  {s.out / 'mini-base'}  (its own generations pass the world probe for {info['probe_ok']:.0%} of world "
          "prompts)")


def _sd_overrides(s: DemoSettings, name: str, steps: int) -> dict:
    """What turns a shipped SD recipe into a CPU run on the mini base (every other key is the recipe's own)."""
    return {"model.pretrained": s.out / "mini-base", "data.train_dir": s.out / "dataset" / "train",
            "output_dir": s.out / "runs" / name, "data.resolution": s.sd_resolution, "data.num_workers": 0,
            "train.max_steps": steps, "train.lr_warmup_steps": min(10, steps),
            "train.learning_rate": 1e-3, "train.mixed_precision": "no", "checkpoint.every_steps": "null",
            "validation.every_steps": "null", "validation.num_inference_steps": 20}


def dreambooth_concepts(num_images: int) -> str:
    """The nine DreamBooth concepts, one per class, `num_images` slices each, as a data.concepts override."""
    return "[" + ", ".join(f"{{select: {{state: {st}, orientation: {o}}}, num_images: {num_images}, caption: "
                           f"'{dreambooth_prompt(st, o)}', class_prompt: 'a texture'}}"
                           for st in STATE_IDENTIFIERS for o in ORIENTATION_IDENTIFIERS) + "]"


# 36 slices per concept and LoRA on every layer kind (attention, feed-forward, resnet): nine concepts that differ in
# grey levels and fibre texture need the convolutions too, and 9 slices each do not show a class's spread
# (benchmarks/README.md, demo_concepts: 77.8 % read as asked in the VAE's space, against 45.8 % at 900 steps)
LORA_DREAMBOOTH = {"data.concepts": dreambooth_concepts(36), "lora.targets": "[attention,feedforward,resnet]"}


def _lora_dreambooth(s: DemoSettings) -> None:
    launch("lora_dreambooth.yaml", _sd_overrides(s, "lora_dreambooth", s.lora_steps) | LORA_DREAMBOOTH | {
        "validation.prompts": f"[{', '.join(DREAMBOOTH_SAMPLES)}]"}, s)


def _textual_inversion(s: DemoSettings) -> None:
    concepts = ", ".join(f"{{token: '{ti_token(state)}', initializer: {word}, select: {{state: {state}}}, "
                         f"num_images: 9, caption: '{TI_CAPTION}'}}" for state, word in TI_INITIALIZERS.items())
    prompts = ", ".join(f"'{TI_CAPTION.format(token=ti_token(state))}'" for state in TI_INITIALIZERS)
    launch("textual_inversion.yaml", _sd_overrides(s, "textual_inversion", s.sd_steps) | {
        "data.concepts": f"[{concepts}]", "train.learning_rate": 5e-3, "validation.prompts": f"[{prompts}]"}, s)


def _generate(s: DemoSettings) -> None:
    model = str(s.out / "mini-base")
    runs = s.out / "runs"
    common = dict(n=2, steps=20, guidance=MINI_BASE_GUIDANCE, height=s.sd_resolution, width=s.sd_resolution,
                  grayscale=True)
    jobs = {"lora_dreambooth": GenerateSettings(DREAMBOOTH_SAMPLES, loras=[(str(runs / "lora_dreambooth"), 1.0)],
                                                **common),
            "textual_inversion": GenerateSettings([TI_CAPTION.format(token=ti_token(t)) for t in TI_INITIALIZERS],
                                                  embeddings=[str(RunLayout(runs / "textual_inversion").embeddings)],
                                                  **common)}
    for name, job in jobs.items():
        paths = generate(model, job, s.out / "generated" / name)
        print(f"  {len(paths)} images -> {s.out / 'generated' / name}")


def _ddpm_overrides(s: DemoSettings, name: str) -> dict:
    """What turns recipes/ddpm_pixel.yaml into the demo's CPU run, written to OUT/runs/NAME."""
    return DDPM_MODEL | {
        "data.train_dir": s.out / "dataset" / "train", "output_dir": s.out / "runs" / name,
        "data.resolution": s.ddpm_resolution, "data.num_workers": 0, "train.max_steps": s.ddpm_steps,
        "train.lr_warmup_steps": min(20, s.ddpm_steps), "train.mixed_precision": "no",
        "checkpoint.every_steps": "null", "validation.every_steps": "null"}


def _ddpm(s: DemoSettings) -> None:
    launch("ddpm_pixel.yaml", _ddpm_overrides(s, "ddpm_pixel"), s)


def _evaluate(s: DemoSettings) -> None:
    path = s.out / "evaluate.yaml"
    path.write_text(yaml.safe_dump(evaluation_config(s), sort_keys=False))
    print(f"  config: {path}")
    run_config(path, s.out / "evaluation")


def evaluation_config(s: DemoSettings) -> dict:
    """Five sets against the real slices: the mini base, its LoRA+DreamBooth and Textual Inversion, the pixel DDPM,
    and the local-score baseline (what patch-copying alone gives)."""
    runs, base = s.out / "runs", str(s.out / "mini-base")
    return {
        "real": str(s.out / "dataset"),
        "models": [
            {"name": "mini-base", "kind": "sd", "model": base},
            {"name": "mini-lora-dreambooth", "kind": "sd", "model": base, "loras": [str(runs / "lora_dreambooth")],
             "concepts": DREAMBOOTH_PROMPTS},
            {"name": "mini-textual-inversion", "kind": "sd", "model": base,
             "embeddings": [str(RunLayout(runs / "textual_inversion").embeddings)],
             "concepts": {class_key(st, o): TI_CAPTION.format(token=ti_token(st))
                          for st in STATES for o in ORIENTATIONS}},
            {"name": "ddpm-pixel", "kind": "pixel", "model": str(RunLayout(runs / "ddpm_pixel").pixel_model)},
            # the patch baseline costs seconds per image on a CPU: one class per cut
            {"name": "local-score", "kind": "local_score", "patch": 5,
             "classes": ["dry/thickness", "dry-compacted/warp", "injected/weft"]}],
        "seeds": list(range(s.eval_images)),
        "probe_seeds": [0, 1],
        # the pixel DDPM at guidance 5 with 0.7 of its contrast rescaled (Lin et al.): on the 500-step model 55 % of
        # its images read as the class asked for, against 43 % at plain guidance 3 (22 % unguided), the distances as
        # close; plain 5 overshoots the grey levels. benchmarks/README.md, pixel_demo
        "sampler": {"steps": 20, "guidance": MINI_BASE_GUIDANCE, "pixel_eta": 1.0, "pixel_guidance": 5.0,
                    "pixel_guidance_rescale": 0.7},
        # drift probes the mini base can answer: world objects, the class noun of DreamBooth, another texture
        "probes": ["a red circle", "a blue square on a white background", "a texture", "a striped texture"],
        "bootstrap": 20,
        "notes": [
            "Demo run on synthetic phantom volumes. The three mini-* models are the mini base, a small Stable "
            f"Diffusion pretrained on a world of coloured shapes and textures (no CT), and what {s.lora_steps} CPU "
            f"steps of LoRA+DreamBooth and {s.sd_steps} of Textual Inversion made of it: CT-likeness they show was "
            "learned here, and the probes show what they still draw for world prompts (drift).",
            f"The SD models draw at {s.sd_resolution} px and ddpm-pixel at {s.ddpm_resolution} px, the sizes they "
            "were trained at; each set is scored against the real slices resized to its size.",
            f"ddpm-pixel was trained from scratch on these slices for {s.ddpm_steps} steps. Compare it with "
            "local-score, the training-free baseline that stitches training patches together."]}


def launch_command(recipe: Path, overrides: list[str], launcher_flags=()) -> list[str]:
    """`accelerate launch` of one process with every launcher setting explicit (no `accelerate config` needed, and
    none of its warnings about defaults)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *launcher_flags, "-m", "ldm_finetune.train",
            str(recipe), *overrides]


def launch(recipe: str, overrides: dict, s: DemoSettings) -> None:
    """`accelerate launch -m ldm_finetune.train recipes/RECIPE KEY=VALUE ...` as a user would type it, in a child
    process; its progress bar is shown and its whole output kept in OUT/logs/<recipe>.log."""
    args = [f"{k}={v}" for k, v in overrides.items()]
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"  $ accelerate launch -m ldm_finetune.train recipes/{recipe} {shown}", flush=True)
    # accelerate launch runs a CPU process with OMP_NUM_THREADS=1 unless told otherwise: measured, the demo's pixel
    # DDPM then takes 1.06 s/step instead of 0.57 s on 2 cores
    # and two threads on two cores that another process keeps busy ran ~5x slower than one: core/threads.py
    threads = cpu_threads()
    print(f"  ({threads} CPU thread{'s' * (threads > 1)}: the cores free now)", flush=True)
    cmd = launch_command(RECIPES / recipe, args, ["--num_cpu_threads_per_process", str(threads)])
    log = s.out / "logs" / f"{Path(recipe).stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            sink.write(chunk)
            if not s.quiet:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        code = proc.wait()
    if code:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        reason = ([line for line in lines if line.startswith("error:")] or lines or ["no output"])[-1]
        raise TrainingStopped(f"{recipe} failed (exit {code}): {reason} (whole output: {log})")


def _summary(s: DemoSettings, timings: dict, report: Path) -> None:
    total = sum(timings.values())
    print(f"\ndemo finished in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"  dataset:            {s.out / 'dataset'}  (datasets.load_dataset('imagefolder', data_dir=...))")
    lora_run = RunLayout(s.out / "runs" / "lora_dreambooth")
    print(f"  LoRA (diffusers):   {lora_run.lora}")
    print(f"  LoRA (ComfyUI / A1111 / kohya): {lora_run.client_lora}")
    print(f"  embeddings:         {s.out / 'runs' / 'textual_inversion' / 'embeddings'}/  (A1111: a1111/)")
    print(f"  generated images:   {s.out / 'generated'}/")
    print(f"  pixel DDPM:         {s.out / 'runs' / 'ddpm_pixel' / 'model'}/  "
          f"(samples: {s.out / 'runs' / 'ddpm_pixel' / 'samples'}/)")
    print(f"\nOpen the report in a browser: {report.resolve()}")
