"""The pixel DDPM's model: a class-conditional diffusers UNet2DModel (one channel, "no class" label for guidance),
its DDPMScheduler, and the saved form (a DDPMPipeline folder + classes.json) with sampling on our samplers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_dir, quantize
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.models.diffusion import DIFFUSERS_SCHEDULE, make_schedule, sample, seeded, x0_from_prediction
from ldm_finetune.models.stable_diffusion import quiet_loading

CLASSES_FILE = "classes.json"


def build_unet(cfg, num_classes: int):
    """UNet2DModel: ResNet blocks with GroupNorm, sinusoidal time embedding, self-attention at the configured sizes;
    one extra class embedding is the "no class" label for classifier-free guidance."""

    m = cfg.model
    sizes = [cfg.data.resolution // 2**k for k in range(len(m.channel_mult))]
    down = ["AttnDownBlock2D" if s in m.attention_resolutions else "DownBlock2D" for s in sizes]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return UNet2DModel(sample_size=cfg.data.resolution, in_channels=1, out_channels=1,
                       block_out_channels=tuple(m.base_channels * k for k in m.channel_mult),
                       layers_per_block=m.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=m.norm_num_groups, act_fn=m.act_fn, dropout=m.dropout,
                       time_embedding_type="positional", resnet_time_scale_shift=m.resnet_time_scale_shift,
                       num_class_embeds=num_classes + 1 if m.class_conditional else None)


def noise_scheduler_for(cfg):
    """The diffusers DDPMScheduler of this schedule (saved with the model; used for add_noise / targets)."""

    d = cfg.diffusion
    return DDPMScheduler(num_train_timesteps=d.timesteps, beta_schedule=DIFFUSERS_SCHEDULE[d.schedule],
                         beta_start=d.beta_start, beta_end=d.beta_end, prediction_type=d.prediction_type,
                         clip_sample=True)


def unet_denoiser(unet, schedule, prediction_type: str, labels=None, null_label=None, guidance: float = 1.0,
                  guidance_rescale: float = 0.0):
    """x0-denoiser for the samplers; classifier-free guidance eps = eps_u + g (eps_c - eps_u) when guidance != 1,
    its clean-image estimate rescaled by `guidance_rescale` (rescaled_guidance)."""

    def denoise(x_t, t):
        steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        abar = schedule.abar(t)
        if labels is None or guidance == 1.0:
            return x0_from_prediction(x_t, unet(x_t, steps, class_labels=labels).sample, abar, prediction_type)
        both = unet(torch.cat([x_t, x_t]), torch.cat([steps, steps]),
                    class_labels=torch.cat([labels, torch.full_like(labels, null_label)])).sample
        cond, uncond = both.chunk(2)
        x0 = x0_from_prediction(x_t, uncond + guidance * (cond - uncond), abar, prediction_type)
        if guidance_rescale:
            x0 = rescaled_guidance(x0, x0_from_prediction(x_t, cond, abar, prediction_type), guidance_rescale)
        return x0

    return denoise


def rescaled_guidance(x0_guided: torch.Tensor, x0_cond: torch.Tensor, mix: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, sec. 3.4) on the clean-image estimate: each image's spread about its mean
    brought back to the conditional estimate's, mixed `mix` : 1 - mix with the plain guided estimate. Guidance
    decides the class but pushes a slice's contrast past the data's (grey levels clip at both ends); the rescale
    keeps the class and gives the contrast back."""
    dims = tuple(range(1, x0_guided.ndim))
    mean = x0_guided.mean(dims, keepdim=True)
    ratio = x0_cond.std(dims, keepdim=True) / (x0_guided.std(dims, keepdim=True) + 1e-8)
    return mix * (mean + (x0_guided - mean) * ratio) + (1 - mix) * x0_guided


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
               guidance: float = 1.0, seed: int | list[int] = 0, trajectory=frozenset(), device="cpu",
               guidance_rescale: float = 0.0):
        """(n, 1, R, R) in [-1, 1], plus the trajectory {t: x_t}. `seed` seeds the batch, or is a list of n seeds,
        one per image: then each image is the one that seed gives alone, and a batch costs less than its images
        one by one (the evaluation's use)."""

        labels = None
        if self.classes:
            if class_name is None:
                raise UserError(f"--class: this model is class-conditional; choose one of {', '.join(self.classes)}")
            labels = torch.full((n,), self.label(class_name), device=device, dtype=torch.long)
        elif class_name is not None:
            raise UserError("--class: this model is unconditional")
        self.unet.to(device).eval()
        denoise = unet_denoiser(self.unet, self.schedule, self.prediction_type, labels, self.null_label, guidance,
                                guidance_rescale)
        size = self.unet.config.sample_size
        return sample(denoise, (n, 1, size, size), self.schedule, sampler, steps=steps, eta=eta,
                      generator=seeded(seed, n, device), clip=(-1.0, 1.0),
                      trajectory=set(trajectory), device=device)


def save_pixel_model(folder: Path, unet, noise_scheduler, classes: list[str], info: dict) -> Path:
    """A diffusers DDPMPipeline folder (safetensors) plus classes.json and a model card; written atomically."""

    with atomic_dir(folder, overwrite=True) as tmp:
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(tmp, safe_serialization=True)
        (tmp / CLASSES_FILE).write_text(json.dumps({"classes": classes, **info}, indent=2))
        (tmp / "README.md").write_text(pixel_model_card(unet, classes, info))
    return folder


def pixel_model_card(unet, classes: list[str], info: dict) -> str:
    """How to sample the saved model: the class list matters, since plain DDPMPipeline cannot pass a label."""
    conditional = bool(classes)
    lines = ["---", "library_name: diffusers", "tags: [ddpm, unconditional-image-generation, ldm_finetune, "
             "x-ray-tomography]", "---", "",
             f"# Pixel DDPM ({info.get('resolution')} px, {info.get('global_step')} steps)", "",
             f"A {'class-conditional' if conditional else 'unconditional'} UNet2DModel trained from scratch with "
             f"ldm_finetune on X-ray tomography slices; {sum(p.numel() for p in unet.parameters()):,} parameters.", ""]
    if conditional:
        lines += ["Classes (label = index): " + ", ".join(f"`{i}` {c}" for i, c in enumerate(classes)), "",
                  "Sample a class with `ldm-finetune sample --model THIS_FOLDER --class NAME`. Plain "
                  "`DDPMPipeline(...)()` cannot pass the label the UNet needs at every step.", ""]
    else:
        lines += ["`DDPMPipeline.from_pretrained(THIS_FOLDER)()` samples it.", ""]
    return "\n".join(lines)


def load_pixel_model(folder: str | Path) -> PixelModel:
    folder = Path(folder)
    if (RunLayout(folder).pixel_model / CLASSES_FILE).is_file():  # a training run's folder: its model/ inside
        folder = RunLayout(folder).pixel_model
    if not (folder / CLASSES_FILE).is_file() or not (folder / "unet").is_dir():
        raise UserError(f"--model {folder}: not a pixel DDPM model folder (expected unet/, scheduler/ and "
                        f"{CLASSES_FILE}, as written by recipes/ddpm_pixel.yaml in OUTPUT_DIR/model)")

    quiet_loading()
    unet = UNet2DModel.from_pretrained(folder / "unet")
    config = DDPMScheduler.from_pretrained(folder / "scheduler").config
    kind = {v: k for k, v in DIFFUSERS_SCHEDULE.items()}[config.beta_schedule]
    schedule = make_schedule(kind, config.num_train_timesteps, config.beta_start, config.beta_end)
    info = json.loads((folder / CLASSES_FILE).read_text())
    return PixelModel(unet, schedule, config.prediction_type, info.pop("classes"), info)


def to_grey_arrays(images: torch.Tensor, bits: int = 8) -> list:
    """(n, 1, R, R) in [-1, 1] -> list of (R, R) uint8 / uint16 arrays."""
    unit = ((images.clamp(-1, 1) + 1) / 2).cpu().numpy()
    return [quantize(a[0], bits) for a in unit]
