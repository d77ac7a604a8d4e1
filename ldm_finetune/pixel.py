"""The from-scratch pixel-space DDPM track: a class-conditional diffusers UNet2DModel on grey CT slices.

    accelerate launch -m ldm_finetune.train recipes/ddpm_pixel.yaml      (train.py hands recipe: ddpm_pixel here)
    ldm-finetune sample --model runs/ddpm_pixel/model --class dry/thickness --n 8 --sampler ddim --steps 50 ...

One channel, 16-bit slices read at full precision, labels = (state, orientation) by default, classifier-free
guidance through a "no class" label (label dropout while training). It shares the loop (loop.py), EMA
(adapters.EMA), checkpoints, noise options and logging with the SD recipes; sampling uses the project's own DDPM /
DDIM samplers (diffusion.py). The saved model folder is a diffusers DDPMPipeline (+ classes.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_finetune.errors import UserError
from ldm_finetune.loop import NoHooks

CLASSES_FILE = "classes.json"


# --- data ----------------------------------------------------------------------------------------------------------

def class_name(record, columns: list[str]) -> str:
    return "/".join(str(record.meta.get(c)) for c in columns)


class LabelledSlices(torch.utils.data.Dataset):
    """Items {"index", "pixel_values": (1, R, R) in [-1, 1], "label": class index}."""

    def __init__(self, records, resolution: int, classes: list[str], columns: list[str], random_flip: bool = False,
                 repeats: int = 1):
        self.records, self.resolution, self.random_flip, self.repeats = records, resolution, random_flip, repeats
        self.labels = [classes.index(class_name(r, columns)) for r in records]

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def __getitem__(self, i: int) -> dict:
        from ldm_finetune.data import load_image, to_pixel_values

        index = i % len(self.records)
        flip = bool(self.random_flip and torch.rand(()).item() < 0.5)
        pixels = to_pixel_values(load_image(self.records[index].path), self.resolution, flip=flip, rgb=False)
        return {"index": index, "pixel_values": pixels, "label": self.labels[index]}


def training_classes(records, columns: list[str]) -> list[str]:
    missing = [c for c in columns if c not in records[0].meta]
    if missing:
        raise UserError(f"data.class_columns: metadata.jsonl has no column {missing[0]!r} "
                        f"(it has {', '.join(sorted(records[0].meta))})")
    return sorted({class_name(r, columns) for r in records})


# --- model ---------------------------------------------------------------------------------------------------------

def build_unet(cfg, num_classes: int):
    """UNet2DModel: ResNet blocks with GroupNorm, sinusoidal time embedding, self-attention at the configured sizes;
    one extra class embedding is the "no class" label for classifier-free guidance."""
    from diffusers import UNet2DModel

    m = cfg.model
    sizes = [cfg.data.resolution // 2**k for k in range(len(m.channel_mult))]
    down = ["AttnDownBlock2D" if s in m.attention_resolutions else "DownBlock2D" for s in sizes]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return UNet2DModel(sample_size=cfg.data.resolution, in_channels=1, out_channels=1,
                       block_out_channels=tuple(m.base_channels * k for k in m.channel_mult),
                       layers_per_block=m.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=m.norm_num_groups, act_fn=m.act_fn, dropout=m.dropout,
                       time_embedding_type="positional",
                       num_class_embeds=num_classes + 1 if m.class_conditional else None)


def noise_scheduler_for(cfg):
    """The diffusers DDPMScheduler of this schedule (saved with the model; used for add_noise / targets)."""
    from diffusers import DDPMScheduler

    from ldm_finetune.diffusion import DIFFUSERS_SCHEDULE

    d = cfg.diffusion
    return DDPMScheduler(num_train_timesteps=d.timesteps, beta_schedule=DIFFUSERS_SCHEDULE[d.schedule],
                         beta_start=d.beta_start, beta_end=d.beta_end, prediction_type=d.prediction_type,
                         clip_sample=True)


@dataclass
class PixelRun:
    cfg: object
    accelerator: object
    unet: object
    noise_scheduler: object
    null_label: int | None  # the "no class" label, None when unconditional


def pixel_step(run: PixelRun, batch: dict):
    """Noise the slices, predict epsilon or v, MSE (min-SNR weighted when asked)."""
    from ldm_finetune.noise import diffusion_loss, perturb_noise, sample_noise, training_target

    cfg = run.cfg
    x0 = batch["pixel_values"]  # (B, 1, R, R)
    noise = sample_noise(x0, cfg.noise.offset)
    timesteps = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],), device=x0.device).long()
    x_t = run.noise_scheduler.add_noise(x0, perturb_noise(noise, cfg.noise.input_perturbation), timesteps)
    labels = None
    if run.null_label is not None:
        labels = batch["label"].clone()
        drop = torch.rand(labels.shape, device=labels.device) < cfg.model.label_dropout
        labels[drop] = run.null_label  # classifier-free guidance: learn the unconditional model too
    model_pred = run.unet(x_t, timesteps, class_labels=labels).sample
    target = training_target(run.noise_scheduler, x0, noise, timesteps)
    return diffusion_loss(model_pred, target, timesteps, run.noise_scheduler, cfg.noise.min_snr_gamma).mean()


# --- sampling with the trained model -------------------------------------------------------------------------------

def unet_denoiser(unet, schedule, prediction_type: str, labels=None, null_label=None, guidance: float = 1.0):
    """x0-denoiser for the samplers; classifier-free guidance eps = eps_u + g (eps_c - eps_u) when guidance != 1."""
    from ldm_finetune.diffusion import x0_from_prediction

    def denoise(x_t, t):
        steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        if labels is None or guidance == 1.0:
            pred = unet(x_t, steps, class_labels=labels).sample
        else:
            both = unet(torch.cat([x_t, x_t]), torch.cat([steps, steps]),
                        class_labels=torch.cat([labels, torch.full_like(labels, null_label)])).sample
            cond, uncond = both.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        return x0_from_prediction(x_t, pred, schedule.abar(t), prediction_type)

    return denoise


@dataclass
class PixelModel:
    unet: object
    schedule: object
    prediction_type: str
    classes: list[str]  # empty: unconditional
    info: dict

    @property
    def null_label(self) -> int | None:
        return len(self.classes) if self.classes else None

    def label(self, name: str) -> int:
        if name not in self.classes:
            raise UserError(f"--class {name!r} is not a class of this model; it knows {', '.join(self.classes)}")
        return self.classes.index(name)

    @torch.no_grad()
    def sample(self, n: int, class_name: str | None, sampler: str, steps: int, eta: float = 0.0,
               guidance: float = 1.0, seed: int = 0, trajectory=frozenset(), device="cpu"):
        """(n, 1, R, R) in [-1, 1], plus the trajectory {t: x_t}."""
        from ldm_finetune.diffusion import sample

        labels = None
        if self.classes:
            if class_name is None:
                raise UserError(f"--class: this model is class-conditional; choose one of {', '.join(self.classes)}")
            labels = torch.full((n,), self.label(class_name), device=device, dtype=torch.long)
        elif class_name is not None:
            raise UserError("--class: this model is unconditional")
        self.unet.to(device).eval()
        denoise = unet_denoiser(self.unet, self.schedule, self.prediction_type, labels, self.null_label, guidance)
        size = self.unet.config.sample_size
        return sample(denoise, (n, 1, size, size), self.schedule, sampler, steps=steps, eta=eta,
                      generator=torch.Generator(device).manual_seed(seed), clip=(-1.0, 1.0),
                      trajectory=set(trajectory), device=device)


def save_pixel_model(folder: Path, unet, noise_scheduler, classes: list[str], info: dict) -> Path:
    """A diffusers DDPMPipeline folder (safetensors) plus classes.json; written atomically."""
    from diffusers import DDPMPipeline

    from data_prep.io import atomic_dir

    with atomic_dir(folder, overwrite=True) as tmp:
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(tmp, safe_serialization=True)
        (tmp / CLASSES_FILE).write_text(json.dumps({"classes": classes, **info}, indent=2))
    return folder


def load_pixel_model(folder: str | Path) -> PixelModel:
    from diffusers import DDPMScheduler, UNet2DModel

    from ldm_finetune.diffusion import DIFFUSERS_SCHEDULE, make_schedule

    folder = Path(folder)
    if not (folder / CLASSES_FILE).is_file() or not (folder / "unet").is_dir():
        raise UserError(f"--model {folder}: not a pixel DDPM model folder (expected unet/, scheduler/ and "
                        f"{CLASSES_FILE}, as written by recipes/ddpm_pixel.yaml in OUTPUT_DIR/model)")
    from ldm_finetune.models import quiet_loading

    quiet_loading()
    unet = UNet2DModel.from_pretrained(folder / "unet")
    config = DDPMScheduler.from_pretrained(folder / "scheduler").config
    kind = {v: k for k, v in DIFFUSERS_SCHEDULE.items()}[config.beta_schedule]
    schedule = make_schedule(kind, config.num_train_timesteps, config.beta_start, config.beta_end)
    info = json.loads((folder / CLASSES_FILE).read_text())
    return PixelModel(unet, schedule, config.prediction_type, info.pop("classes"), info)


def to_uint(images: torch.Tensor, bits: int = 8):
    """(n, 1, R, R) in [-1, 1] -> list of (R, R) uint8 / uint16 arrays."""
    import numpy as np

    top = 255 if bits == 8 else 65535
    scaled = ((images.clamp(-1, 1) + 1) / 2 * top).round().cpu().numpy()
    return [a[0].astype(np.uint8 if bits == 8 else np.uint16) for a in scaled]


# --- training ------------------------------------------------------------------------------------------------------

def validation_grid(run: PixelRun, ema, classes: list[str], step: int, tag: str):
    """images_per_class samples of every class (rows) with the EMA weights; saved under samples/."""
    import copy

    import numpy as np
    from PIL import Image

    from ldm_finetune.diffusion import make_schedule

    if not run.accelerator.is_main_process:
        return None
    v, cfg = run.cfg.validation, run.cfg
    unet = run.accelerator.unwrap_model(run.unet)
    unet = ema.averaged_copy(unet) if ema is not None else copy.deepcopy(unet)
    d = cfg.diffusion
    model = PixelModel(unet, make_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end), d.prediction_type,
                       classes, {})
    rows = []
    for name in classes or [None]:
        images, _ = model.sample(v.images_per_class, name, v.sampler, v.steps, eta=v.eta, guidance=v.guidance,
                                 seed=v.seed, device=run.accelerator.device)
        rows.append(np.concatenate(to_uint(images), axis=1))
    path = Path(cfg.output_dir) / "samples" / f"{tag}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def train_pixel(cfg) -> Path:
    """The ddpm_pixel recipe on the shared loop."""
    from ldm_finetune.checkpoints import register_trainable_only_hooks, resolve_resume
    from ldm_finetune.data import read_records

    records = read_records(cfg.data.train_dir)
    classes = training_classes(records, cfg.data.class_columns) if cfg.model.class_conditional else []
    resume_from = resolve_resume(cfg.checkpoint.resume, Path(cfg.output_dir) / "checkpoints")

    import yaml
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from ldm_finetune.adapters import EMA
    from ldm_finetune.configtools import to_dict
    from ldm_finetune.data import collate
    from ldm_finetune.loop import Loop, run_loop, start_tracking
    from ldm_finetune.train import check_environment, make_accelerator, make_optimizer, resolve_steps

    check_environment(cfg)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed, device_specific=True)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    unet = build_unet(cfg, len(classes)).to(accelerator.device)
    noise_scheduler = noise_scheduler_for(cfg)
    dataset = LabelledSlices(records, cfg.data.resolution, classes, cfg.data.class_columns, cfg.data.random_flip,
                             cfg.data.repeats)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=cfg.data.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = make_optimizer(cfg, [{"params": list(unet.parameters()), "lr": cfg.train.learning_rate}])
    per_epoch, max_steps = resolve_steps(cfg, math.ceil(len(dataloader) / accelerator.num_processes))
    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.train.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    prepared_unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader,
                                                                             lr_scheduler)
    ema = None
    hooks = NoHooks()
    if cfg.ema.enabled:
        ema = EMA(unet.parameters(), cfg.ema.decay, "cpu" if cfg.ema.on_cpu else accelerator.device)
        hooks = _EmaHooks(ema, unet)
        accelerator.register_for_checkpointing(ema)
    register_trainable_only_hooks(accelerator)
    model = torch.compile(prepared_unet) if cfg.model.compile else prepared_unet
    run = PixelRun(cfg, accelerator, model, noise_scheduler, len(classes) if classes else None)
    global_step = start_tracking(cfg, accelerator, resume_from)
    loop = Loop(cfg=cfg, accelerator=accelerator, models=[prepared_unet], optimizer=optimizer,
                lr_scheduler=lr_scheduler, dataloader=dataloader, params=list(unet.parameters()),
                step_fn=lambda batch: pixel_step(run, batch), hooks=hooks,
                validate=lambda step, tag: validation_grid(run, ema, classes, step, tag), max_steps=max_steps,
                per_epoch=per_epoch)
    global_step = run_loop(loop, global_step, resume_from)
    if accelerator.is_main_process:
        export = accelerator.unwrap_model(prepared_unet)
        if ema is not None:
            export = ema.averaged_copy(export)
        info = {"class_columns": cfg.data.class_columns, "resolution": cfg.data.resolution,
                "global_step": global_step, "ema": cfg.ema.enabled, "train_dir": str(cfg.data.train_dir)}
        folder = save_pixel_model(output_dir / "model", export, noise_scheduler, classes, info)
        validation_grid(run, ema, classes, global_step, "final")
        print(f"wrote {folder}")
    accelerator.end_training()
    return output_dir


class _EmaHooks(NoHooks):
    def __init__(self, ema, unet):
        self.ema, self.unet = ema, unet

    def after_optimizer_step(self, step: int) -> None:
        self.ema.update(self.unet.parameters())


# --- `ldm-finetune sample` -----------------------------------------------------------------------------------------

def baseline_slices(train_dir: Path, wanted: str | None, columns: list[str], resolution: int,
                    max_images: int) -> torch.Tensor:
    """(N, 1, R, R) training slices in [-1, 1] for the local-score baseline (one class, or all)."""
    from ldm_finetune.data import load_image, read_records, select_records, to_pixel_values

    records = read_records(train_dir)
    if wanted is not None:
        known = training_classes(records, columns)
        if wanted not in known:
            raise UserError(f"--class {wanted!r} is not in {train_dir}; it has {', '.join(known)}")
        records = [r for r in records if class_name(r, columns) == wanted]
    records = select_records(records, {}, max_images)
    return torch.stack([to_pixel_values(load_image(r.path), resolution, rgb=False) for r in records])


def _trajectory_steps(text: str, sampler: str, steps: int, T: int = 1000) -> list[int]:
    """The requested timesteps; with DDIM each snaps to the nearest timestep the sampler visits."""
    from ldm_finetune.diffusion import ddim_timesteps

    try:
        wanted = [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--trajectory {text!r}: expected timesteps separated by commas, e.g. 999,500,100") from None
    if any(not 0 <= t < T for t in wanted):
        raise UserError(f"--trajectory {text!r}: timesteps run from {T - 1} (pure noise) down to 0")
    if sampler == "ddim":
        visited = ddim_timesteps(T, steps)
        wanted = [min(visited, key=lambda v: abs(v - t)) for t in wanted]
    return sorted(set(wanted), reverse=True)


def sample_command(args) -> list[Path]:
    """Write OUT/<class>_<seed>_<i>.png (8- or 16-bit grey), the trajectory images and sampling.json."""
    from PIL import Image

    from data_prep.io import atomic_path
    from ldm_finetune.denoisers import local_denoiser
    from ldm_finetune.diffusion import make_schedule, sample

    trajectory = _trajectory_steps(args.trajectory, args.sampler, args.steps) if args.trajectory else []
    if args.n < 1:
        raise UserError(f"--n {args.n}: ask for at least one image")
    if args.baseline == "local-score":
        if args.train_dir is None:
            raise UserError("--baseline local-score needs --train-dir (a prep output's train/ folder)")
        schedule = make_schedule(args.schedule)
        slices = baseline_slices(args.train_dir, args.class_name, ["state", "orientation"], args.resolution,
                                 args.max_images)
        images, saved = sample(local_denoiser(slices.double(), args.patch, schedule), (args.n, *slices.shape[1:]),
                               schedule, args.sampler, steps=args.steps, eta=args.eta,
                               generator=torch.Generator().manual_seed(args.seed), clip=(-1.0, 1.0),
                               trajectory=set(trajectory), dtype=torch.float64)
        source = {"baseline": "local-score", "patch": args.patch, "train_dir": str(args.train_dir),
                  "training_images": len(slices), "schedule": args.schedule}
    else:
        if args.model is None:
            raise UserError("sample needs --model DIR (a pixel DDPM model folder) or --baseline local-score")
        model = load_pixel_model(args.model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        images, saved = model.sample(args.n, args.class_name, args.sampler, args.steps, args.eta, args.guidance,
                                     args.seed, trajectory, device)
        source = {"model": str(args.model), "guidance": args.guidance}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (args.class_name or "all").replace("/", "-")
    written = []
    for i, array in enumerate(to_uint(images.float(), args.bits)):
        path = out / f"{stem}_{args.seed}_{i:03d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
        written.append(path)
    for t, x_t in saved.items():
        for i, array in enumerate(to_uint(x_t.float(), 8)):
            folder = out / "trajectory"
            folder.mkdir(exist_ok=True)
            Image.fromarray(array).save(folder / f"{stem}_{args.seed}_{i:03d}_t{t:04d}.png")
    record = {**source, "class": args.class_name, "n": args.n, "sampler": args.sampler, "steps": args.steps,
              "eta": args.eta, "seed": args.seed, "trajectory": trajectory, "files": [p.name for p in written]}
    (out / "sampling.json").write_text(json.dumps(record, indent=2))
    return written
