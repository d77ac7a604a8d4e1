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
      <run name>.safetensors              the LoRA in the kohya layout with    lora, pivotal
                                          explicit alphas (pivotal: + its
                                          bundle_emb.* tokens): what ComfyUI /
                                          A1111 / kohya load from models/Lora/
      pipeline/                           a whole diffusers pipeline          full
      model/                              DDPMPipeline + classes.json         ddpm_pixel
      training_finished.json              the step a finished run reached (resume=latest then does nothing)
      .run.lock                           held while a run writes here: a second run into the folder is refused
"""

from __future__ import annotations

from pathlib import Path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
EMBEDDINGS_NAME = "learned_embeds.safetensors"  # the file name diffusers' textual-inversion example writes


def client_name(root: Path) -> str:
    """The run folder's name, kept clear of the diffusers-layout file names it sits beside."""
    name = Path(root).resolve().name or "lora"
    if f"{name}.safetensors" in (LORA_WEIGHT_NAME, EMBEDDINGS_NAME):
        name += "_kohya"
    return name


class RunLayout:
    """The paths of one run folder (what the tree above shows)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.logs = self.root / "logs"
        self.checkpoints = self.root / "checkpoints"
        self.cache = self.root / "cache"
        self.samples = self.root / "samples"
        self.model_card = self.root / "README.md"
        self.lora = self.root / LORA_WEIGHT_NAME
        self.embeddings = self.root / "embeddings"
        self.a1111_embeddings = self.root / "a1111"
        self.learned_embeds = self.root / EMBEDDINGS_NAME
        # named after the run, because clients list LoRAs by file name in one models/Lora/ folder
        self.client_lora = self.root / f"{client_name(self.root)}.safetensors"
        self.pipeline = self.root / "pipeline"
        self.pixel_model = self.root / "model"
        self.lock = self.root / ".run.lock"  # held (flock) while a run writes here
        self.finished = self.root / "training_finished.json"  # written when a run has reached its last step

    def adapter_files(self) -> list[Path]:
        """The run's LoRA (diffusers layout) and embedding files that exist: what it adds to its base model."""
        return [f for f in [self.lora, *sorted(self.embeddings.glob("*.safetensors"))] if f.is_file()]

    def sample_grid(self, tag: str) -> Path:
        return self.samples / f"{tag}.png"

    def relative(self, path: Path) -> str:
        """A path inside the run folder as the model card and logs show it."""
        return Path(path).relative_to(self.root).as_posix()
