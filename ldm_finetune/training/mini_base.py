"""`ldm-finetune mini-base OUT`: pretrain the mini base (models/mini_base.py) on the procedural world, on fit().

Two tasks, each one `fit` run with its own small config:
1. `VaeTask`: the AutoencoderKL on world images and generic procedural textures (never CT), L1 + L2 + a tiny KL;
2. `TextToImageTask`: UNet and CLIP text encoder together on VAE latents of world images (cached posterior moments,
   10 % of captions dropped so classifier-free guidance works), trained with the recipes' DiffusionObjective
   (models/noise.py) on SD's epsilon schedule.
Then the world probe is trained and the base's own generations are scored on the world prompts. The result is a
diffusers StableDiffusionPipeline folder (safetensors) that every recipe loads as `model.pretrained`.

Builds are cached per machine (`mini_base_cached`): a folder keyed by the settings and the code that builds it,
written atomically, with a lock so two processes asking at once build it once.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_finetune.core.configtools import to_dict
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_dir
from ldm_finetune.data.caches import sample_latents, tokenize
from ldm_finetune.data.world import (
    CLASS_PROMPTS,
    IDENTIFIERS,
    draw,
    sample_item,
    world_prompts,
    world_samples,
    world_words,
)
from ldm_finetune.models.mini_base import (
    CONTEXT_TOKENS,
    build_text_encoder,
    build_unet,
    build_vae,
    inference_scheduler,
    texture_fields,
)
from ldm_finetune.models.noise import DiffusionObjective
from ldm_finetune.models.stable_diffusion import SD_SCHEDULE, sd_pipeline
from ldm_finetune.models.tokenizer import write_word_tokenizer
from ldm_finetune.models.world_probe import WorldProbe, train_probe
from ldm_finetune.training.config import LoggingConfig, RunSettings, TrainConfig
from ldm_finetune.training.fit import fit
from ldm_finetune.training.mini_base_settings import MiniBaseSettings
from ldm_finetune.training.task import Task

PACKAGE = Path(__file__).resolve().parent.parent


def build_code() -> list[Path]:
    """Every module of the package that the build runs: this file and, transitively, the ldm_finetune modules it
    imports (fit, the loop, the configs, the world, ...), read from the import statements so that every process
    computes the same list."""
    seen, todo = set(), [Path(__file__).resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in (n for n in names if n.split(".")[0] == "ldm_finetune"):
                module = PACKAGE.parent.joinpath(*name.split("."))
                todo += [p for p in (module.with_suffix(".py"), module / "__init__.py") if p.is_file()]
    return sorted(seen)


# --- each phase's run settings (what fit reads) ---------------------------------------------------------------------

def phase_config(out: Path, steps: int, batch: int, lr: float, seed: int, warmup: int = 0,
                 schedule: str = "constant_with_warmup", decay: int = 0) -> RunSettings:
    train = TrainConfig(batch_size=batch, max_steps=steps, learning_rate=lr, weight_decay=0.0,
                        lr_scheduler=schedule, lr_warmup_steps=warmup, lr_decay_steps=decay, mixed_precision="no")
    logging = LoggingConfig(report_to="none", every_steps=50)
    record = {"output_dir": str(out), "seed": seed, "train": to_dict(train), "logging": to_dict(logging)}
    return RunSettings(out, train, seed, logging=logging, record=record)


# --- phase 1: the VAE -----------------------------------------------------------------------------------------------

def vae_phase_config(out: Path, settings: MiniBaseSettings) -> RunSettings:
    # a cosine decay: CT is outside the VAE's data, and with a constant rate its PSNR there swung by 2 dB between
    # runs that differed only in thread count and length
    return phase_config(out, settings.vae_steps, settings.vae_batch, settings.vae_lr, settings.seed, schedule="cosine")


class ProceduralImages(torch.utils.data.Dataset):
    """Item i: a world image (with probability `world_share`) or a generic grey texture, drawn from (seed, i): no
    storage."""

    def __init__(self, n: int, seed: int, world_share: float):
        self.n, self.seed, self.world_share = n, seed, world_share

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        image = draw(sample_item(rng), rng) if rng.random() < self.world_share else texture_fields(1, rng)[0]
        return {"pixel_values": torch.from_numpy(image.transpose(2, 0, 1)) * 2 - 1}  # (3, 32, 32) in [-1, 1]


class VaeTask(Task):
    def __init__(self, settings: MiniBaseSettings, out: Path):
        self.settings, self.out = settings, out  # the VAE is saved to OUT
        self.vae = None

    def build(self, accelerator):
        s = self.settings
        torch.manual_seed(s.seed)
        self.vae = build_vae(s.arch).to(accelerator.device)
        return ProceduralImages(s.vae_steps * s.vae_batch, s.seed, s.vae_world_share)

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.vae.parameters()), "lr": self.settings.vae_lr}]

    def trained_models(self) -> dict:
        return {"vae": self.vae}

    def use_prepared(self, models: dict) -> None:
        self.model = models["vae"]

    def loss(self, batch: dict):
        x = batch["pixel_values"]
        posterior = self.model.encode(x).latent_dist
        reconstruction = self.model.decode(posterior.sample()).sample
        # L1 keeps edges sharp, L2 the grey levels; a tiny KL keeps the latent space smooth without blurring
        return F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()

    def save(self, global_step: int) -> list[Path]:
        self.vae.save_pretrained(self.out, safe_serialization=True)
        return [self.out]


# --- phase 2: UNet + text encoder -----------------------------------------------------------------------------------

def text_to_image_phase_config(out: Path, settings: MiniBaseSettings) -> RunSettings:
    if not 0 <= settings.decay_steps <= settings.steps:
        raise UserError(f"mini-base: --decay-steps {settings.decay_steps} must be between 0 and --steps "
                        f"({settings.steps})")
    warmup = min(100, settings.steps - settings.decay_steps)
    schedule = "warmup_stable_decay" if settings.decay_steps else "constant_with_warmup"
    return phase_config(out, settings.steps, settings.batch, settings.lr, settings.seed, warmup=warmup,
                        schedule=schedule, decay=settings.decay_steps)


class CaptionedLatents(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": i}


class TextToImageTask(Task):
    def __init__(self, settings: MiniBaseSettings, vae_dir: Path, tokenizer_dir: Path):
        self.settings, self.vae_dir, self.tokenizer_dir = settings, vae_dir, tokenizer_dir
        schedule = {k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"}  # a DDIM-only key
        self.objective = DiffusionObjective.from_config(settings.noise,
                                                        DDPMScheduler(prediction_type="epsilon", **schedule))

    def build(self, accelerator):
        s = self.settings
        self.accelerator = accelerator
        self.tokenizer = write_word_tokenizer(world_words(), self.tokenizer_dir, CONTEXT_TOKENS,
                                              added=IDENTIFIERS)
        self.vae = AutoencoderKL.from_pretrained(self.vae_dir).requires_grad_(False).eval()
        images, items = world_samples(s.world_images, s.seed + 1)
        with torch.no_grad():
            x = torch.from_numpy(images.transpose(0, 3, 1, 2)) * 2 - 1
            self.moments = torch.cat([self.vae.encode(x[i:i + 256]).latent_dist.parameters
                                      for i in range(0, len(x), 256)])  # (N, 8, 8, 8): mean and log-variance
        # SD's convention: latents scaled to unit variance (SD 1.x/2.x use 0.18215 for their VAE)
        self.vae.register_to_config(scaling_factor=float(1.0 / self.moments.chunk(2, dim=1)[0].std()))
        self.ids = tokenize(self.tokenizer, [it.caption for it in items])
        self.empty = tokenize(self.tokenizer, [""])[0]
        torch.manual_seed(s.seed)
        self.text_encoder = build_text_encoder(s.arch, self.tokenizer).to(accelerator.device)
        self.unet = build_unet(s.arch).to(accelerator.device)
        return CaptionedLatents(s.world_images)

    def parameter_groups(self) -> list[dict]:
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        return [{"params": params, "lr": self.settings.lr}]

    def trained_models(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def use_prepared(self, models: dict) -> None:
        self.model, self.encoder = models["unet"], models["text_encoder"]

    def loss(self, batch: dict):
        index = batch["index"]
        latents = sample_latents(self.moments[index], self.vae.config.scaling_factor)
        ids = self.ids[index].clone()
        ids[torch.rand(len(ids)) < self.settings.caption_dropout] = self.empty  # for classifier-free guidance
        noised = self.objective.noised(latents)
        model_pred = self.model(noised.x_t, noised.timesteps, self.encoder(ids)[0]).sample
        return self.objective.loss(model_pred, noised).mean()

    def pipeline(self):
        unwrap = self.accelerator.unwrap_model
        return sd_pipeline(self.vae, unwrap(self.encoder), self.tokenizer, unwrap(self.model), inference_scheduler())

    def save(self, global_step: int) -> list[Path]:
        return []


# --- the build ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def probe_generations(pipe, probe: WorldProbe, prompts: list[str], seeds: int, guidance: float,
                      steps: int = 20) -> list[dict]:
    """The probe's verdict on the base's generations of `prompts`, `seeds` times each."""
    pipe.set_progress_bar_config(disable=True)
    results = []
    for seed in range(seeds):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        results += probe.check(images, prompts)
    return results


def score_base(pipe, probe: WorldProbe, seeds: int, guidance: float) -> dict:
    """Share of world prompts whose generations the probe reads right (kind, colour, background), per seed; and
    the share of class-noun prompts ("a texture") drawn as a texture, over 8x as many seeds (two prompts only)."""
    results = probe_generations(pipe, probe, world_prompts(), seeds, guidance)
    out = {"probe_ok": float(np.mean([r["ok"] for r in results])), "n": len(results)}
    for key in ("kind", "colour", "background"):
        values = [r[key] for r in results if key in r]
        out[f"probe_{key}"] = float(np.mean(values))
    class_noun = probe_generations(pipe, probe, CLASS_PROMPTS, 8 * seeds, guidance)
    out["probe_class_noun"] = float(np.mean([r["ok"] for r in class_noun]))
    return out


def build_mini_base(settings: MiniBaseSettings, out: Path) -> dict:
    """Pretrain the mini base into OUT (a diffusers pipeline folder, written atomically); returns its build info."""
    out = Path(out)
    started = time.time()
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        work = tmp / "build"
        t2i_run = text_to_image_phase_config(work / "text_to_image", settings)  # bad settings fail before the VAE
        fit(vae_phase_config(work / "vae", settings), VaeTask(settings, work / "vae" / "vae"))
        vae_seconds = time.time() - started
        t2i = TextToImageTask(settings, work / "vae" / "vae", tmp / "tokenizer")
        fit(t2i_run, t2i)
        pipe = t2i.pipeline()
        for model in (pipe.vae, pipe.text_encoder, pipe.unet):
            model.eval()
        pipe.save_pretrained(tmp, safe_serialization=True)
        train_seconds = time.time() - started
        probe = train_probe(settings.probe_steps, seed=settings.seed)
        save_file({k: v.contiguous() for k, v in probe.net.state_dict().items()}, str(tmp / "probe.safetensors"))
        info = {"settings": asdict(settings), "seconds": {"vae": round(vae_seconds, 1),
                                                          "text_to_image": round(train_seconds - vae_seconds, 1)},
                "parameters_m": {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 3)
                                 for name, m in (("vae", pipe.vae), ("unet", pipe.unet),
                                                 ("text_encoder", pipe.text_encoder))},
                "probe_accuracy_on_world": probe.score(),
                **score_base(pipe, probe, settings.eval_seeds, settings.guidance)}
        info["seconds"]["total"] = round(time.time() - started, 1)
        info["threads"] = torch.get_num_threads()  # CPU reductions depend on it: same count, same bits
        info["rebuild_command"] = (f"ldm-finetune mini-base OUT --rebuild --no-cache --seed {settings.seed} "
                                   f"--vae-steps {settings.vae_steps} --steps {settings.steps} "
                                   f"--decay-steps {settings.decay_steps}")
        info["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__}
        for run in ("vae", "text_to_image"):
            shutil.rmtree(work / run / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "vae" / "vae", ignore_errors=True)  # the same weights are in OUT/vae
        (tmp / "mini_base.json").write_text(json.dumps(info, indent=2))
    return info


# --- the per-machine cache ------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("LDM_FINETUNE_CACHE", Path.home() / ".cache" / "ldm_finetune"))


def build_key(settings: MiniBaseSettings) -> str:
    """Identifies a build: its settings, the code that builds it, and the library versions that run it."""
    h = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for path in build_code():
        h.update(Path(path).read_bytes())
    h.update(f"{torch.__version__}|{diffusers.__version__}|{transformers.__version__}".encode())
    return h.hexdigest()[:16]


def mini_base_cached(settings: MiniBaseSettings | None = None) -> Path:
    """The mini base for these settings, built once per machine: later calls (and other processes waiting on the
    lock) get the same folder."""
    settings = settings or MiniBaseSettings()
    folder = cache_root() / "mini-base" / build_key(settings)
    return _made_once(folder, lambda: build_mini_base(settings, folder))


def _made_once(folder: Path, make) -> Path:
    """`make()` writes `folder` (atomically) unless it is there; the lock makes a second process wait for the first
    and then find the folder made."""
    if (folder / "mini_base.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "mini_base.json").is_file():
            make()
    return folder


# --- the shipped weights --------------------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "mini_base"
PACKED_WEIGHTS = "weights.safetensors"  # every model's weights in fp16 (the repository's 20 MB budget)
PARTS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def pack_mini_base(folder: Path, out: Path) -> Path:
    """A built mini base -> the form shipped in the package: one fp16 safetensors file with every model (and the
    probe), their configs, the tokenizer and the build record. fp16 halves the size; unpacking casts back to fp32."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    tensors = {f"{name}.{k}": v.to(torch.float16).contiguous()
               for name in PARTS for k, v in getattr(pipe, name).state_dict().items()}
    tensors.update({f"probe.{k}": v.to(torch.float16).contiguous()
                    for k, v in load_file(folder / "probe.safetensors").items()})
    configs = {name: dict(getattr(pipe, name).config) for name in ("unet", "vae")}
    configs["text_encoder"] = pipe.text_encoder.config.to_dict()
    configs["scheduler"] = dict(pipe.scheduler.config)
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        save_file(tensors, str(tmp / PACKED_WEIGHTS))
        (tmp / "configs.json").write_text(json.dumps(configs, indent=1, sort_keys=True, default=str))
        shutil.copy(folder / "mini_base.json", tmp / "mini_base.json")
        shutil.copytree(folder / "tokenizer", tmp / "tokenizer")  # vocab.json + merges.txt
    return out


def unpack_mini_base(packed: Path, out: Path) -> Path:
    """The shipped form -> a diffusers pipeline folder (fp32 weights) that recipes load as model.pretrained."""
    tensors = load_file(str(packed / PACKED_WEIGHTS))
    configs = json.loads((packed / "configs.json").read_text())
    models = {}
    for name, cls in PARTS.items():
        if name == "text_encoder":
            config = {k: v for k, v in configs[name].items() if k not in ("architectures", "transformers_version")}
            model = cls(CLIPTextConfig(**config))
        else:
            model = cls.from_config({k: v for k, v in configs[name].items() if not k.startswith("_")})
        state = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        model.load_state_dict(state)
        models[name] = model.eval()
    scheduler = DDIMScheduler.from_config({k: v for k, v in configs["scheduler"].items() if not k.startswith("_")})
    tokenizer = CLIPTokenizer.from_pretrained(packed / "tokenizer")
    pipe = sd_pipeline(models["vae"], models["text_encoder"], tokenizer, models["unet"], scheduler)
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_file({k[len("probe."):]: v.float() for k, v in tensors.items() if k.startswith("probe.")},
                  str(tmp / "probe.safetensors"))
        shutil.copy(packed / "mini_base.json", tmp / "mini_base.json")
    return out


def shipped_mini_base() -> Path:
    """The shipped mini base, unpacked once per machine into the cache (keyed by the packed weights' hash)."""
    digest = hashlib.sha256((SHIPPED / PACKED_WEIGHTS).read_bytes()).hexdigest()[:16]
    folder = cache_root() / "mini-base" / f"shipped-{digest}"
    return _made_once(folder, lambda: unpack_mini_base(SHIPPED, folder))
