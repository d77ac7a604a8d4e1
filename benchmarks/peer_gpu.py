"""Side by side, in one run: diffusers' own LoRA example against our recipes, same model, data, batch, rank, alpha,
targets, offset noise and learning-rate schedule.

    # GPU (SD 1.5 architecture, random weights, 512 px, bf16, batch 8, rank 16, 60 steps):
    python benchmarks/peer_gpu.py
    # CPU at tiny size (the tiny SD, 32 px, fp32, batch 4, rank 4):
    python benchmarks/peer_gpu.py --size tiny --steps 60 --repeats 3

The peer is ../shared/peers/diffusers_train_text_to_image_lora.py, run unmodified from there (it needs torchvision:
run this script from an environment that has it, e.g. torch 2.14.1 + torchvision 0.29.1). Every run goes through
`accelerate launch` in its own process, one after another:

- `diffusers example`: the peer (no validation, no checkpoint within the run);
- `ours, same work`: recipes/lora.yaml doing what the example does (latents encoded and captions embedded every
  step, the example's precision, no validation);
- `ours, as shipped`: recipes/lora.yaml with its own defaults (latent + text caches, mixed_precision auto);
- `ours, full UNet` (GPU only): recipes/full_finetune.yaml with its caches.

Step time = median gap between consecutive logged steps after --warmup steps (the example logs every step to
tensorboard, ours to metrics.jsonl). Peak memory is the GPU's max allocated memory (GPU) or the process's peak RSS
(CPU), read in the launched process itself. MFU = model FLOPs of one step (UNet forward + backward, counted with
torch.utils.flop_counter) x steps/s / the GPU's dense bf16 peak. Results: benchmarks/results/peer_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import peak_flops  # noqa: E402  (the GPU peak table lives with the other GPU benchmark)

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "diffusers_train_text_to_image_lora.py"
RESULTS = ROOT / "benchmarks" / "results"
SIZES = {  # model preset, resolution, precision, batch, rank, steps
    "sd15": dict(preset="sd15", resolution=512, precision="bf16", batch=8, rank=16, steps=60),
    "tiny": dict(preset="tiny", resolution=32, precision="no", batch=4, rank=4, steps=40),
}
SHARED = dict(learning_rate=1e-4, lr_scheduler="constant", noise_offset=0.1, seed=0)

# Runs the launched script in this process, then reports its peak memory on the last stdout line.
MEASURED = """
import json, runpy, sys
import torch
target = sys.argv.pop(1)
try:
    if target.endswith(".py"):
        sys.argv = [target] + sys.argv[1:]
        runpy.run_path(target, run_name="__main__")
    else:
        from ldm_finetune.train import main
        code = main([target] + sys.argv[1:])
        assert code == 0, code
finally:
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("\\n" + json.dumps({"peak_rss_gib": round(rss, 2), "peak_gpu_gib": gpu and round(gpu, 2)}))
"""


def launch(work: Path, target: str, args: list[str], precision: str, threads: int) -> dict:
    wrapper = work / "measured.py"
    wrapper.write_text(MEASURED)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", precision, "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
           str(wrapper), target, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if result.returncode != 0:
        raise SystemExit(f"{target} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_step(times: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return statistics.median(gaps)


def example_times(logdir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(logdir.rglob("events.out.tfevents.*")):  # the hparams file has no scalars
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train_loss" in acc.Tags()["scalars"]:
            return [e.wall_time for e in sorted(acc.Scalars("train_loss"), key=lambda e: e.step)]
    raise SystemExit(f"{logdir}: no train_loss events from the example")


def our_times(out: Path) -> list[float]:
    return [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def prepare(work: Path, size: dict) -> tuple[Path, Path]:
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.phantom import STATES, write_phantoms
    from data_prep.prep import run_prep
    from ldm_finetune.models.stable_diffusion import build_pipeline

    if not (work / "data" / "train" / "metadata.jsonl").is_file():
        # at 512 px the phantom's slices are smaller than a tile: recipes_gpu.py's phantom, in 48-voxel tiles
        # scaled up, every 8th slice (~1,500 training images)
        large = size["resolution"] > 64
        volumes = write_phantoms(work / "volumes", (96, 192, 256) if large else (64, 128, 192), seed=0)
        tiling = dict(tile_size=48, stride=8) if large else {}
        run_prep(PrepConfig(volumes=[VolumeSpec(s, volumes[s]) for s in STATES], out=work / "data",
                            resolution=size["resolution"], **tiling), show_progress=False)
    model = work / f"{size['preset']}_random"
    if not (model / "model_index.json").exists():
        build_pipeline(size["preset"]).save_pretrained(model)  # random weights: the speed does not depend on them
    return model, work / "data" / "train"


def unet_step_flops(size: dict) -> float:
    """FLOPs of one LoRA training step of the UNet (forward + backward) at this size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_finetune.models.lora import add_lora
    from ldm_finetune.models.stable_diffusion import build_pipeline
    from ldm_finetune.training.config import LoraConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"  # a 512 px step on the CPU would take a minute
    pipe = build_pipeline(size["preset"])
    add_lora(pipe.unet, pipe.text_encoder, LoraConfig(rank=size["rank"], alpha=size["rank"]))
    unet = pipe.unet.to(device)
    side = size["resolution"] // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    x = torch.randn(size["batch"], 4, side, side, device=device)
    states = torch.randn(size["batch"], 77, pipe.text_encoder.config.hidden_size, device=device)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.full((size["batch"],), 500, device=device), states).sample.square().mean().backward()
    del pipe, unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return counter.get_total_flops()


def runs(size: dict, model: Path, data: Path, work: Path, peer: Path,
         on_gpu: bool) -> dict[str, tuple[str, list[str], str]]:
    """name -> (target, arguments, launcher precision)."""
    steps = size["steps"]
    example = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--caption_column", "text",
               "--resolution", str(size["resolution"]), "--center_crop", "--train_batch_size", str(size["batch"]),
               "--max_train_steps", str(steps), "--rank", str(size["rank"]), "--learning_rate",
               str(SHARED["learning_rate"]), "--lr_scheduler", SHARED["lr_scheduler"], "--lr_warmup_steps", "0",
               "--noise_offset", str(SHARED["noise_offset"]), "--seed", str(SHARED["seed"]), "--mixed_precision",
               size["precision"], "--dataloader_num_workers", "0", "--checkpointing_steps", str(10 * steps),
               "--report_to", "tensorboard", "--output_dir", str(work / "example")]
    common = [f"model.pretrained={model}", f"data.train_dir={data}", f"data.resolution={size['resolution']}",
              f"train.batch_size={size['batch']}", f"train.max_steps={steps}", f"lora.rank={size['rank']}",
              f"lora.alpha={size['rank']}", "lora.targets=[attention]",
              f"train.learning_rate={SHARED['learning_rate']}", f"train.lr_scheduler={SHARED['lr_scheduler']}",
              "train.lr_warmup_steps=0", f"noise.offset={SHARED['noise_offset']}", f"seed={SHARED['seed']}",
              "validation.prompts=[]", "checkpoint.every_steps=null", "checkpoint.resume=null",
              "data.num_workers=0"]
    recipe = str(ROOT / "recipes" / "lora.yaml")
    out = {
        "diffusers example": (str(peer), example, size["precision"]),
        "ours, same work": (recipe, [*common, f"output_dir={work / 'same'}", "data.cache_latents=none",
                                     "data.cache_text=false", f"train.mixed_precision={size['precision']}"],
                            size["precision"]),
        "ours, as shipped": (recipe, [*common, f"output_dir={work / 'shipped'}"], "no"),
    }
    if on_gpu:
        full = [c for c in common if not c.startswith("lora.")]
        out["ours, full UNet"] = (str(ROOT / "recipes" / "full_finetune.yaml"),
                                  [*full, f"output_dir={work / 'full'}"], "no")
        # the documented speed options on a batch that fits a 24 GB card (~1 GiB per image at 512 px); its
        # images/s is the comparable figure, and the first step's compile time shows in the process wall time
        best = [c for c in common if not c.startswith("train.batch_size")]
        out["ours, best LoRA (batch 16, channels-last, compiled)"] = (
            recipe, [*best, "train.batch_size=16", "model.channels_last=true", "model.compile=true",
                     f"output_dir={work / 'best'}"], "no")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="sd15")
    parser.add_argument("--steps", type=int, help="override the size's step count")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the median round is kept")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not an H100/H200/A100")
    parser.add_argument("--peer", type=Path, default=PEER, help="diffusers' example script (default: %(default)s)")
    parser.add_argument("--only", nargs="+", help="run only these runs (names as recorded)")
    parser.add_argument("--out", type=Path, help="the record (default: results/peer_<size>[_cpu].json)")
    args = parser.parse_args()
    import torch

    size = dict(SIZES[args.size], **({"steps": args.steps} if args.steps else {}))
    on_gpu = torch.cuda.is_available()
    work = ROOT / "benchmarks" / "_work" / f"peer_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(work, size)
    flops = unet_step_flops(size)
    device = torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine()
    peak = peak_flops(device, args.peak_tflops) if on_gpu else None
    threads = torch.get_num_threads()
    plan = runs(size, model, data, work, args.peer.resolve(), on_gpu)  # launched from inside `work`
    plan = {k: v for k, v in plan.items() if not args.only or k in args.only}
    header = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__, "threads": threads,
              "settings": {**size, **SHARED, "alpha": size["rank"], "targets": "to_q, to_k, to_v, to_out.0"},
              "unet_step_tflop": round(flops / 1e12, 4)}
    path = args.out or RESULTS / f"peer_{args.size}{'' if on_gpu else '_cpu'}.json"
    rounds: dict[str, list[dict]] = {name: [] for name in plan}
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits every run alike
        for name, (target, run_args, precision) in plan.items():
            start = time.perf_counter()
            memory = launch(work, target, run_args, precision, threads)
            wall = time.perf_counter() - start
            is_example = target == str(args.peer.resolve())
            out_dir = work / "example" if is_example else Path(option(run_args, "output_dir"))
            times = example_times(out_dir / "logs") if is_example else our_times(out_dir)
            batch = size["batch"] if is_example else int(option(run_args, "train.batch_size"))
            rounds[name].append({"step": median_step(times, args.warmup), "wall": wall, "batch": batch, **memory})
            shutil.rmtree(out_dir, ignore_errors=True)  # the next round starts clean
            print(name, f"{rounds[name][-1]['step'] * 1000:.1f} ms/step", flush=True)
            # written after every run, so a machine taken back mid-way still leaves the runs it finished
            write_record(path, header, summarise(rounds, flops, size["batch"], peak))
    print(f"wrote {path}")


def option(run_args: list[str], key: str) -> str:
    """The value of a key=value override; the last one wins, as in the recipe loader."""
    return [a.split("=", 1)[1] for a in run_args if a.startswith(key + "=")][-1]


def summarise(rounds: dict[str, list[dict]], flops: float, flops_batch: int, peak: float | None) -> dict:
    results = {}
    for name, measured in rounds.items():
        if not measured:
            continue
        step, batch = statistics.median(m["step"] for m in measured), measured[0]["batch"]
        lora_flops = flops * batch / flops_batch  # a step's FLOPs grow linearly with the batch
        results[name] = {"batch": batch, "ms_per_step": round(step * 1000, 1),
                         "images_per_s": round(batch / step, 1),
                         "ms_per_step_each_round": [round(m["step"] * 1000, 1) for m in measured],
                         "mfu": round(lora_flops / step / peak, 3) if peak and "full" not in name else None,
                         "process_wall_s": round(statistics.median(m["wall"] for m in measured), 1),
                         "peak_rss_gib": max(m["peak_rss_gib"] for m in measured),
                         "peak_gpu_gib": measured[0]["peak_gpu_gib"]}
    example = results.get("diffusers example")
    for row in results.values():  # images/s, so runs at another batch compare fairly
        row["speed_vs_example"] = round(row["images_per_s"] / example["images_per_s"], 2) if example else None
    return results


def write_record(path: Path, header: dict, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
