"""The run folder: where a training run writes each of its files, spelled once.

    OUTPUT_DIR/
      config.yaml                         the resolved recipe config
      metrics.jsonl                       one line per optimizer step (loss, lr, time, GPU peak memory)
      logs/                               tensorboard events
      checkpoints/checkpoint-<step>/      resumable training state (trainable weights only)
      cache/                              latent caches (data.cache_latents=disk)
      samples/<tag>.png                   validation grids (step-000100.png, final.png)
      README.md                           the model card
      pytorch_lora_weights.safetensors    LoRA (diffusers layout)             lora, pivotal
      embeddings/<name>.safetensors       one token per file (diffusers)      textual_inversion, pivotal
      a1111/<name>.safetensors            the same vectors, A1111 layout      textual_inversion, pivotal
      learned_embeds.safetensors          the single token, when only one     textual_inversion, pivotal
      pivotal_combined.safetensors        kohya LoRA + bundled embeddings     pivotal
      pipeline/                           a whole diffusers pipeline          full
      model/                              DDPMPipeline + classes.json         ddpm_pixel
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
EMBEDDINGS_NAME = "learned_embeds.safetensors"  # the file name diffusers' textual-inversion example writes


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def sample_grid(self, tag: str) -> Path:
        return self.samples / f"{tag}.png"

    @property
    def model_card(self) -> Path:
        return self.root / "README.md"

    @property
    def lora(self) -> Path:
        return self.root / LORA_WEIGHT_NAME

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def a1111_embeddings(self) -> Path:
        return self.root / "a1111"

    @property
    def learned_embeds(self) -> Path:
        return self.root / EMBEDDINGS_NAME

    @property
    def pivotal_combined(self) -> Path:
        return self.root / "pivotal_combined.safetensors"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def pixel_model(self) -> Path:
        return self.root / "model"

    def relative(self, path: Path) -> str:
        """A path inside the run folder as the model card and logs show it."""
        return Path(path).relative_to(self.root).as_posix()
