"""`ldm-finetune` command line: one subcommand per stage of the pipeline.

User mistakes (`UserError`) print one line on stderr and exit with status 2, never a traceback. Each subcommand
imports its layer when it runs (see the note below the imports), so `prep` and `--help` start fast.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from data_prep.config import CaptionConfig, PrepConfig, SplitConfig
from ldm_finetune.arguments import DefaultsFormatter, add_train_arguments, parse_with_overrides, setting
from ldm_finetune.demo_settings import DemoSettings
from ldm_finetune.generation.settings import GenerateSettings, SampleSettings
from ldm_finetune.core.configtools import from_dict, load_yaml, to_dict
from ldm_finetune.core.errors import UserError, run_guarded
from ldm_finetune.training.mini_base_settings import MiniBaseSettings

# Each subcommand imports its own layer when it runs, not here: importing the training stack (torch, diffusers,
# transformers, peft) takes ~10 s on a 2-core machine, and `ldm-finetune --help` or `prep` should not wait for it.


def _phantom(args: argparse.Namespace) -> None:
    from data_prep.phantom import STATES, write_phantoms

    states = args.states or list(STATES)
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise UserError(f"--states: unknown phantom state {unknown[0]!r}; expected {', '.join(STATES)}")
    if any(n < 16 for n in args.shape):
        raise UserError(f"--shape {' '.join(map(str, args.shape))}: every size must be at least 16 voxels")
    paths = write_phantoms(args.out_dir, tuple(args.shape), seed=args.seed, rings=args.rings, states=states)
    for state, path in paths.items():
        print(f"{state:<14} {path}")


def _volume_arg(text: str) -> dict:
    state, sep, path = text.partition("=")
    if not sep or not state or not path:
        raise UserError(f"--volume {text!r}: expected STATE=PATH (e.g. --volume dry=scans/dry.tif)")
    return {"state": state, "path": path}


def _pair(text: str, flag: str, kind=float) -> list:
    parts = text.replace(",", " ").split()
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected numbers separated by commas") from None


def _prep_settings(args: argparse.Namespace) -> dict:
    """Prep config dict: the YAML file (if any), then every flag the user gave on top."""

    data = load_yaml(args.config) if args.config else {}
    if args.volume:
        data["volumes"] = [_volume_arg(v) for v in args.volume]
    for per_volume in ("channel",):
        value = getattr(args, per_volume)
        if value is not None:
            for v in data.get("volumes", []):
                v[per_volume] = value
    simple = {
        "out": args.out, "resolution": args.resolution, "tile_size": args.tile_size, "bits": args.bits,
        "warp_axis": args.warp_axis, "memory_budget_mb": args.memory_budget, "sample_pages": args.sample_pages,
        "spacing_unit": args.spacing_unit,
    }
    data.update({k: v for k, v in simple.items() if v is not None})
    if args.stride is not None:
        data["stride"] = _strides(args.stride)
    if args.orientations:
        data["orientations"] = args.orientations
    if args.spacing:
        data["spacing"] = _pair(args.spacing, "--spacing")
    if args.window:
        data["window"] = args.window if args.window in ("auto", "shared") else _pair(args.window, "--window")
    if args.percentiles:
        data["percentiles"] = _pair(args.percentiles, "--percentiles")
    split = data.setdefault("split", {})
    for key, value in (("axis", args.split_axis), ("fraction", args.split_fraction), ("gap", args.split_gap)):
        if value is not None:
            split[key] = value
    captions = data.setdefault("captions", {})
    for key, value in (("style", args.caption_style), ("template", args.caption_template),
                       ("class_noun", args.class_noun)):
        if value is not None:
            captions[key] = value
    for item in args.identifier or []:
        name, sep, ident = item.partition("=")
        if not sep:
            raise UserError(f"--identifier {item!r}: expected NAME=IDENTIFIER (e.g. dry=w17h3r)")
        captions.setdefault("identifiers", {})[name] = ident
    if args.overwrite:
        data["overwrite"] = True
    if args.no_hash:
        data["hash_sources"] = False
    if "out" not in data:
        raise UserError("prep needs --out DIR (or 'out:' in the prep config)")
    return data


def _strides(text: str):
    if "=" not in text:
        return _pair(text, "--stride", int)[0]
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        out[name.strip()] = _pair(value, "--stride", int)[0]
    return out


def _prep(args: argparse.Namespace) -> None:
    from data_prep.config import PrepConfig
    from data_prep.prep import empty_combinations, run_prep, summary_table

    cfg = from_dict(PrepConfig, _prep_settings(args))
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    manifest = run_prep(cfg, show_progress=not args.quiet)
    print(summary_table(manifest))
    for combo in empty_combinations(manifest):
        print(f"warning: no image for {combo}", file=sys.stderr)
    print(f"dataset written to {cfg.out}")


def _tiny_model(args: argparse.Namespace) -> None:
    from ldm_finetune.models.stable_diffusion import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, prediction_type=args.prediction_type)
    print(f"tiny random-init Stable Diffusion pipeline written to {out}")


def _mini_base(args: argparse.Namespace) -> None:
    from ldm_finetune.training import mini_base as mb

    record = args.out / "mini_base.json"
    if args.out.exists() and any(args.out.iterdir()) and not record.is_file():
        raise UserError(f"{args.out}: folder is not empty and is not a mini base; choose another OUT")
    if not args.rebuild:
        # a base of the user's own (a --rebuild into OUT) is never replaced by the shipped one: with --pack it is
        # packed as it is, without it nothing is done to it (unpacking copies the packed record as it is)
        if not record.is_file():
            shutil.copytree(mb.shipped_mini_base(), args.out, dirs_exist_ok=True)
        elif record.read_bytes() != (mb.SHIPPED / "mini_base.json").read_bytes() and not args.pack:
            raise UserError(f"{args.out}: holds another mini base than the shipped one; pass --pack DIR to pack it, "
                            "--rebuild to replace it, or choose another OUT (or delete it)")
    else:
        settings = MiniBaseSettings(seed=args.seed, vae_steps=args.vae_steps, steps=args.steps,
                                    decay_steps=args.decay_steps)
        if args.no_cache:
            mb.build_mini_base(settings, args.out)
        else:
            shutil.copytree(mb.mini_base_cached(settings), args.out, dirs_exist_ok=True)
    if args.pack:
        mb.pack_mini_base(args.out, args.pack)
    info = json.loads((args.out / "mini_base.json").read_text())
    print(f"mini base written to {args.out} (pretrained in {info['seconds']['total']:.0f} s on "
          f"{info.get('threads', '?')} CPU threads); its own generations pass the world probe for "
          f"{info['probe_ok']:.0%} of world prompts (kind {info['probe_kind']:.0%}, colour {info['probe_colour']:.0%})")


def _demo(args: argparse.Namespace) -> None:
    from ldm_finetune.demo import run_demo

    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    settings.shape = tuple(settings.shape)
    run_demo(settings)


def _train(args: argparse.Namespace) -> None:
    from ldm_finetune.train import run_from_args

    run_from_args(args)


def _generate(args: argparse.Namespace) -> None:
    from ldm_finetune.core.threads import use_cpu_threads
    from ldm_finetune.generation.generate import generate, generate_dataset, parse_lora_arg
    from ldm_finetune.generation.scanner import parse_window

    settings = GenerateSettings(
        prompts=args.prompt or [], n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
        negative_prompt=args.negative_prompt, scheduler=args.scheduler, height=args.height, width=args.width,
        grayscale=args.grayscale, loras=[parse_lora_arg(x) for x in args.lora or []], embeddings=args.embedding or [],
        format=args.format, window=parse_window(args.window) if args.window else None, tile=args.tile,
        tile_overlap=args.tile_overlap, seamless=args.seamless)
    if args.dataset is None and args.out is None:
        raise UserError("generate: pass --out DIR (images) or --dataset DIR (a synthetic dataset)")
    if args.dataset is None and not args.prompt:
        raise UserError("generate: pass at least one --prompt")
    use_cpu_threads()
    if args.dataset is not None:
        written = generate_dataset(args.model, settings, args.dataset, args.per_concept)
        print(f"{len(written)} new images in {args.dataset} (metadata.jsonl: prep's layout, synthetic: true)")
        return
    written = generate(args.model, settings, args.out)
    print(f"{len(written)} images written to {args.out}")


def _sample(args: argparse.Namespace) -> None:
    from ldm_finetune.core.threads import use_cpu_threads
    from ldm_finetune.generation.sample import sample_images

    use_cpu_threads()
    written = sample_images(SampleSettings(**{f.name: getattr(args, f.name) for f in fields(SampleSettings)}))
    print(f"{len(written)} images written to {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from ldm_finetune.core.threads import use_cpu_threads
    from ldm_finetune.evaluation.config import run_config
    from ldm_finetune.evaluation.evaluate import SuiteSettings, evaluate_folders

    use_cpu_threads()
    if args.config is not None:
        path = run_config(args.config, args.out)
    elif args.real is None or not args.generated:
        raise UserError("evaluate needs a CONFIG.yaml, or --real DIR and at least one --generated DIR")
    else:
        suite = SuiteSettings(args.real, args.size, args.max_real, args.bootstrap, args.seed, args.copy_ncc)
        path = evaluate_folders(suite, args.generated, args.out)
    print(f"report: {path / 'report.html'}  (numbers in {path / 'metrics.json'})")


def _identifiers(args: argparse.Namespace) -> None:
    from ldm_finetune.models.identifiers import run

    print("\n".join(run(args.model, args.check or [], args.n)))


def _export(args: argparse.Namespace) -> None:
    if args.format == "kohya":
        from ldm_finetune.sharing.lora import export_kohya

        if args.lora or args.half:
            raise UserError("--lora / --half belong to --format checkpoint; a kohya export converts one LoRA as is")
        print(f"kohya / A1111 / ComfyUI LoRA written to {export_kohya(args.source, args.out, args.overwrite)}")
        return
    from ldm_finetune.generation.checkpoint import export_checkpoint
    from ldm_finetune.generation.generate import parse_lora_arg

    written = export_checkpoint(args.source, args.out, [parse_lora_arg(x) for x in args.lora or []], args.half,
                                args.overwrite)
    print("single-file checkpoint (LDM layout) written: " + ", ".join(map(str, written)))


def _phantom_command(command) -> None:
    p = command("phantom", help="write synthetic woven-composite CT volumes (dry, dry-compacted, injected)",
                       description="Write OUT_DIR/{dry,dry-compacted,injected}.tif: seeded synthetic CT volumes of a "
                       "3D-woven composite. --shape is the dry volume; dry-compacted is ~0.55 and injected ~0.8 as "
                       "thick, with the same height and width.")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the three .tif volumes")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 192, 256], metavar=("D", "H", "W"),
                   help="dry volume size: depth (pages), height, width")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--rings", action="store_true", help="add CT ring artefacts")
    p.add_argument("--states", nargs="+", metavar="STATE", help="only these states (default: all three)")
    p.set_defaults(func=_phantom)


def _prep_command(command) -> None:
    p = command("prep", help="slice TIFF volumes into a captioned 2D dataset (train/validation)",
                       description="Slice 3D TIFF volumes into thickness / warp / weft images with captions, split "
                       "without leakage, as OUT/train and OUT/validation (images + metadata.jsonl) and "
                       "OUT/manifest.json. Settings come from CONFIG.yaml and/or the flags (flags win).")
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG.yaml", help="prep settings file (optional)")
    p.add_argument("--volume", action="append", metavar="STATE=PATH",
                   help="a TIFF stack or a folder of 2D TIFF slices, with its state name (repeat per volume)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output dataset folder")
    setting(p, "--resolution", PrepConfig, "output image side", merged=True, metavar="PX")
    p.add_argument("--tile-size", type=int, metavar="VOXELS",
                   help="tile side in voxels for every cut (default: native crops of RESOLUTION for thickness, "
                   "full-depth squares for warp/weft)")
    p.add_argument("--stride", metavar="N|ORIENT=N,...", help="keep every N-th slice (e.g. 4, or thickness=2,warp=8)")
    p.add_argument("--orientations", nargs="+", metavar="ORIENT", help="subset of: thickness warp weft")
    setting(p, "--warp-axis", PrepConfig, "warp images are planes at fixed y or fixed x", merged=True,
            choices=["y", "x"])
    setting(p, "--spacing", PrepConfig, "voxel size; depth is resampled to isotropic", merged=True, sep=",",
            metavar="Z,Y,X", type=str)
    p.add_argument("--spacing-unit", metavar="UNIT", help="unit of --spacing (um, mm, ...): generated TIFFs carry "
                   "their pixel size in it")
    p.add_argument("--channel", type=int, metavar="N", help="channel to use in multi-channel files")
    setting(p, "--bits", PrepConfig, "PNG bit depth", merged=True, choices=[8, 16])
    setting(p, "--window", PrepConfig, "grey-level window: per volume (auto), pooled over all volumes (shared), or "
            "fixed", merged=True, metavar="auto|shared|LO,HI")
    setting(p, "--percentiles", PrepConfig, "percentiles for auto/shared windows", merged=True, sep=",",
            metavar="LO,HI", type=str)
    setting(p, "--sample-pages", PrepConfig, "pages sampled for the window histogram", merged=True, metavar="N")
    setting(p, "--memory-budget", PrepConfig, "most volume data in memory at once", name="memory_budget_mb",
            merged=True, metavar="MB")
    setting(p, "--split-axis", SplitConfig, "in-plane axis of the validation block", name="axis", merged=True,
            choices=["y", "x"])
    setting(p, "--split-fraction", SplitConfig, "share of that axis for validation", name="fraction", merged=True,
            metavar="F")
    p.add_argument("--split-gap", type=int, metavar="VOXELS", help="voxels dropped between blocks (default: one tile)")
    setting(p, "--caption-style", CaptionConfig, "caption form: 'sf_dry sf_thickness' (prefix), 'a w17h3r th1ck "
            "texture' (dreambooth), 'A <dry-thickness> of a carbon composite material' (textual_inversion)",
            name="style", merged=True, choices=["prefix", "dreambooth", "textual_inversion"])
    p.add_argument("--caption-template", metavar="TEMPLATE",
                   help="custom caption with {state} {orientation} {state_id} {orientation_id} {class_noun}")
    p.add_argument("--identifier", action="append", metavar="NAME=ID", help="DreamBooth identifier for a state or "
                   "orientation (repeatable)")
    setting(p, "--class-noun", CaptionConfig, "class noun for dreambooth captions", merged=True, metavar="NOUN")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier prep output")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of source files in the manifest")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prep)


def _mini_base_command(command) -> None:
    p = command("mini-base", help="pretrain the small text-to-image base on the procedural world (CPU)",
                       description="Pretrain a small Stable-Diffusion-architecture pipeline (AutoencoderKL, "
                       "UNet2DConditionModel, CLIP text encoder and tokenizer, SD noise schedule) on a procedural "
                       "world of coloured shapes and textures, so that learning and prompt drift can be measured "
                       "offline. Every recipe runs against OUT as model.pretrained. Built once per machine and "
                       "cached (LDM_FINETUNE_CACHE, default ~/.cache/ldm_finetune), then copied to OUT.")
    p.add_argument("out", type=Path, metavar="OUT", help="folder for the diffusers pipeline")
    p.add_argument("--rebuild", action="store_true",
                   help="pretrain from scratch instead of unpacking the shipped weights (~1.5 h on 2 cores)")
    setting(p, "--seed", MiniBaseSettings, "--rebuild: build seed")
    setting(p, "--vae-steps", MiniBaseSettings, "--rebuild: VAE training steps")
    setting(p, "--steps", MiniBaseSettings, "--rebuild: UNet + text encoder training steps")
    setting(p, "--decay-steps", MiniBaseSettings, "--rebuild: the last of those steps, whose rate anneals to 0")
    p.add_argument("--no-cache", action="store_true", help="--rebuild: build into OUT directly, not the cache")
    p.add_argument("--pack", type=Path, metavar="DIR", help="also write OUT's shipped form (fp16) to DIR; a base "
                   "already in OUT is packed as it is")
    p.set_defaults(func=_mini_base)


def _tiny_model_command(command) -> None:
    p = command("tiny-model", help="write a small random-init SD pipeline (for tests and the demo)",
                       description="Write a small random-init Stable Diffusion pipeline in diffusers layout "
                       "(safetensors, with a small CLIP BPE vocabulary): the SD architecture in miniature, for tests, "
                       "the demo and CI. No download.")
    p.add_argument("out", type=Path, metavar="OUT", help="folder for the diffusers pipeline")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                   help="what the UNet predicts")
    p.set_defaults(func=_tiny_model)


def _train_command(command) -> None:
    p = command("train", help="train a recipe (same code as accelerate launch -m ldm_finetune.train)",
                       description="Train a recipe YAML from recipes/ in this process (CPU or one GPU). For mixed "
                       "precision on several GPUs use: accelerate launch -m ldm_finetune.train CONFIG [KEY=VALUE ...]")
    add_train_arguments(p)
    p.set_defaults(func=_train)


def _generate_command(command) -> None:
    p = command("generate", help="generate images from prompts with a base model, LoRAs and embeddings",
                       description="Generate images: OUT/<prompt>_<seed>.png for each prompt and seed SEED..SEED+N-1, "
                       "plus OUT/generation.json with every setting. A LoRA that does not fit the model is an error.")
    p.add_argument("--model", required=True, metavar="M", help="base model: local diffusers folder or hub id")
    p.add_argument("--lora", action="append", metavar="FILE_OR_DIR[:SCALE]",
                   help="LoRA file or training output folder (a pivotal-tuning folder or combined file also "
                   "loads its embeddings), optional scale (default 1.0); repeatable")
    p.add_argument("--embedding", action="append", metavar="FILE_OR_DIR",
                   help="Textual Inversion .safetensors, or a folder of them (diffusers or A1111 layout); repeatable")
    p.add_argument("--prompt", action="append", metavar="P",
                   help="prompt (repeatable; with --dataset, default: the run's concepts)")
    setting(p, "--negative-prompt", GenerateSettings, "what the images should avoid", metavar="N")
    setting(p, "--n", GenerateSettings, "images per prompt")
    setting(p, "--seed", GenerateSettings, "seed of the first image; image i uses SEED+i")
    setting(p, "--steps", GenerateSettings, "sampling steps")
    setting(p, "--guidance", GenerateSettings, "classifier-free guidance scale")
    p.add_argument("--scheduler", metavar="NAME",
                   help="ddim, ddpm, pndm, euler, euler_a, dpm++ or unipc (default: the model's own)")
    p.add_argument("--height", type=int, help="image height in px, a multiple of 8 (default: the model's); beyond "
                   "the model's native size, drawn from overlapping native-size tiles (MultiDiffusion)")
    p.add_argument("--width", type=int, help="image width in px, a multiple of 8 (default: the model's)")
    p.add_argument("--tile", type=int, metavar="PX", help="tile side in px for large images (default: the model's "
                   "native size)")
    setting(p, "--tile-overlap", GenerateSettings, "share of a tile its neighbour also covers (0 shows seams)",
            metavar="F")
    p.add_argument("--seamless", action="store_true",
                   help="periodic images that tile with themselves, like the weave (circular padding, wrapping tiles)")
    p.add_argument("--grayscale", action="store_true", help="save single-channel PNGs (CT slices are grey)")
    setting(p, "--format", GenerateSettings, "png, or tiff: one grey channel in the scanner's units (prep's window "
            "inverted; uint16 when it fits), facts in the tag", choices=["png", "tiff"])
    p.add_argument("--window", metavar="LO,HI", help="tiff: the scanner window (default: the one the run recorded; "
                   "write --window=LO,HI when LO < 0)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder")
    p.add_argument("--dataset", type=Path, metavar="DIR",
                   help="instead of --out: a synthetic dataset in prep's layout (metadata.jsonl, synthetic: true) "
                   "that recipes train on and evaluate reads; a rerun makes only what is missing")
    p.add_argument("--per-concept", type=int, default=16, metavar="N", help="--dataset: images per concept")
    p.set_defaults(func=_generate)


def _export_command(command) -> None:
    p = command("export", help="write a LoRA in the kohya layout, or a single-file checkpoint",
                       description="--format kohya: a diffusers-layout LoRA (file or run folder) in the kohya layout "
                       "(lora_unet_* keys with explicit alphas) that A1111, ComfyUI and kohya load; training runs "
                       "since this version write it themselves. --format checkpoint: one .safetensors in the original "
                       "LDM layout (UNet, VAE, text encoder) from a full fine-tune's run folder, a LoRA run folder "
                       "(fused into its base) or a diffusers model, with --lora FILE[:SCALE] fused in; a v-prediction "
                       "model also gets FILE.yaml, the config A1111 reads beside it.")
    p.add_argument("source", metavar="SOURCE", help="kohya: LoRA file or run folder; checkpoint: run folder, "
                   "diffusers model folder or hub id")
    p.add_argument("--format", choices=["kohya", "checkpoint"], default="kohya", help="what to write")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="output .safetensors file")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="checkpoint: a LoRA to fuse in "
                   "(repeatable; scale 1.0 unless given)")
    p.add_argument("--half", action="store_true", help="checkpoint: store fp16 weights (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


def _sample_command(command) -> None:
    p = command("sample", help="sample slices from a pixel DDPM, or from the training-free local-score baseline",
                       description="Sample grey slices with the project's DDPM / DDIM samplers: from a model trained "
                       "with recipes/ddpm_pixel.yaml (--model OUTPUT_DIR/model), or from the training-free patch "
                       "baseline of reverse diffusion with the locally constrained optimal score (--baseline "
                       "local-score --train-dir DIR). Writes OUT/<class>_<seed>_<i>.png (or .tif) and "
                       "OUT/sampling.json.")
    p.add_argument("--model", type=Path, metavar="DIR", help="pixel DDPM model folder (OUTPUT_DIR/model)")
    p.add_argument("--class", dest="class_name", metavar="STATE/ORIENT", help="class to sample, e.g. dry/thickness")
    setting(p, "--n", SampleSettings, "number of images")
    setting(p, "--sampler", SampleSettings, "ddpm: all T steps; ddim: --steps", choices=["ddpm", "ddim"])
    setting(p, "--steps", SampleSettings, "DDIM steps")
    setting(p, "--eta", SampleSettings, "DDIM eta: 0 deterministic, 1 DDPM-like")
    setting(p, "--guidance", SampleSettings, "classifier-free guidance scale (1: none)")
    setting(p, "--guidance-rescale", SampleSettings, "share of the guided image's contrast brought back to the "
            "conditional one's (Lin et al. 2024; 0: off)", metavar="F")
    setting(p, "--seed", SampleSettings, "sampling seed")
    p.add_argument("--trajectory", metavar="T1,T2,...", help="also save x_t at these timesteps (e.g. 999,500,100)")
    setting(p, "--bits", SampleSettings, "PNG bit depth", choices=[8, 16])
    setting(p, "--format", SampleSettings, "png, or tiff: one grey channel in the scanner's units (the training "
            "data's window inverted), facts in the tag", choices=["png", "tiff"])
    p.add_argument("--window", metavar="LO,HI", help="tiff: the scanner window (default: the one the training data "
                   "recorded; write --window=LO,HI when LO < 0)")
    p.add_argument("--baseline", choices=["local-score"], help="training-free baseline instead of a model")
    setting(p, "--patch", SampleSettings, "local-score patch side, odd")
    p.add_argument("--train-dir", type=Path, metavar="DIR", help="local-score: the training slices (prep train/)")
    setting(p, "--resolution", SampleSettings, "local-score: image side in px")
    setting(p, "--max-images", SampleSettings, "local-score: training slices used")
    setting(p, "--schedule", SampleSettings, "local-score: noise schedule (T=1000, cosine as in seed 000)",
            choices=["linear", "cosine"])
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_sample)


def _evaluate_command(command) -> None:
    p = command("evaluate", help="weight-free fidelity, memorisation, 3D consistency and drift report",
                       description="Compare generated slices with real ones and write OUT/metrics.json and "
                       "OUT/report.html. Either give an evaluation config (models to sample, probes: see "
                       "docs/evaluation.md), "
                       "or --real and one or more --generated folders (DIR/<state>__<orientation>/*.png for "
                       "per-concept numbers, or a flat folder).")
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG.yaml", help="evaluation config (optional)")
    p.add_argument("--real", type=Path, metavar="DIR", help="prep output (train/ + validation/) or image folder")
    p.add_argument("--generated", type=Path, action="append", metavar="DIR", help="generated images (repeatable)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--size", type=int, metavar="PX", help="resize every image to PX x PX (needed if sizes differ)")
    p.add_argument("--max-real", type=int, metavar="N", help="at most N real slices per class and split")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap rounds for intervals")
    p.add_argument("--copy-ncc", type=float, default=0.95,
                   help="normalised cross-correlation above which a slice counts as a near-copy")
    p.add_argument("--seed", type=int, default=0, help="seed of subsampling and bootstrap")
    p.set_defaults(func=_evaluate)


def _identifiers_command(command) -> None:
    p = command("identifiers", help="rare single-token DreamBooth identifiers for a model's tokenizer",
                       description="List rare words that are one token in the model's tokenizer (good DreamBooth "
                       "identifiers), or check chosen ones with --check (exit status 2 if one splits).")
    p.add_argument("--model", required=True, metavar="M", help="local diffusers folder or hub id")
    p.add_argument("--check", nargs="+", metavar="WORD", help="words to check (e.g. w17h3r sks)")
    p.add_argument("--n", type=int, default=20, help="number of candidates to list")
    p.set_defaults(func=_identifiers)


def _demo_command(command) -> None:
    p = command("demo", help="run the whole pipeline on built-in synthetic data (CPU, 6-12 min on 2 cores)",
                       description="The main job on the built-in default; no GPU, network or private data needed. "
                       "Synthetic woven-composite CT volumes -> captioned dataset -> LoRA+DreamBooth and Textual "
                       "Inversion on the mini base, a small SD pretrained on a procedural world and shipped with the "
                       "package (accelerate launch) -> generation -> class-conditional pixel DDPM from scratch -> "
                       "evaluation report (OUT/evaluation/report.html): what each model learned of CT, and what "
                       "it still draws for other prompts.")
    setting(p, "--out", DemoSettings, "output folder")
    setting(p, "--shape", DemoSettings, "dry phantom size", type=int, nargs=3, metavar=("D", "H", "W"))
    setting(p, "--resolution", DemoSettings, "prep's slice side in pixels")
    setting(p, "--sd-resolution", DemoSettings, "side the SD recipes train and generate at: the mini base's own")
    setting(p, "--lora-steps", DemoSettings, "steps of LoRA+DreamBooth")
    setting(p, "--sd-steps", DemoSettings, "steps of Textual Inversion")
    setting(p, "--ddpm-steps", DemoSettings, "steps of the pixel DDPM")
    setting(p, "--ddpm-resolution", DemoSettings, "pixel DDPM side")
    setting(p, "--eval-images", DemoSettings, "generated images per class and model for the evaluation")
    setting(p, "--seed", DemoSettings, "seed of every stage")
    setting(p, "--quiet", DemoSettings, "no progress bars", action="store_true")
    p.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-finetune",
        description="Fine-tune latent diffusion models on X-ray tomography of 3D-woven composites.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=DefaultsFormatter, **kwargs)

    for add in (_phantom_command, _prep_command, _mini_base_command, _tiny_model_command, _train_command,
                _generate_command, _export_command, _sample_command, _evaluate_command, _identifiers_command,
                _demo_command):
        add(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_with_overrides(build_parser(), argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
