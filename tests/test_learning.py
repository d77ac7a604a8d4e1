"""Does a recipe *learn*? Fine-tuned from the shipped mini base (a pretrained text-to-image model of our own), a few
dozen LoRA steps must move the generations for a CT caption toward the real CT slices, and the same run with a
learning rate of 0 must not (the check can fail). Textual Inversion must leave the base untouched: every world
prompt renders exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ldm_finetune.evaluation.registry import distance_in_floors
from ldm_finetune.train import main as train_main
from ldm_finetune.training.mini_base import shipped_mini_base

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
CAPTION = "sf_dry sf_thickness"


@pytest.fixture(scope="module")
def mini_base(tmp_path_factory):
    import os

    os.environ.setdefault("LDM_FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    return shipped_mini_base()


def dry_thickness_dir(prep_dataset, out: Path) -> Path:
    """The dry / thickness slices only: one concept, as a DreamBooth-style LoRA would see it."""
    import json
    import shutil

    src = prep_dataset / "train"
    out.mkdir(parents=True)
    rows = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if (r["state"], r["orientation"]) == ("dry", "thickness")]
    for r in rows:
        shutil.copy(src / r["file_name"], out / r["file_name"])
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def generate(model: Path, prompts: list[str], lora: Path | None = None, embeddings: Path | None = None,
             seeds=range(8)) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    if embeddings is not None:
        for file in sorted(embeddings.glob("*.safetensors")):
            pipe.load_textual_inversion(str(file))
    images = [pipe(prompts, num_inference_steps=20, guidance_scale=4.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(s), output_type="np").images for s in seeds]
    return np.concatenate(images)


def distance_to_ct(images: np.ndarray, real_dir: Path) -> float:
    """How far grey generations are from the real slices, in real-vs-real floors (one half of the slices against the
    other) averaged over the registry's distances. (Grey levels and spectrum alone were fooled: a base's squares on
    grey share CT's grey histogram, and no VAE of this size draws CT's grain.)"""
    real = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255
                     for p in sorted(real_dir.glob("*.png"))])
    return distance_in_floors(real[0::2], real[1::2], images.mean(axis=3).astype(np.float32))


# a learning rate of 0 is refused by the config, so the "nothing learned" run uses 1e-12: the LoRA stays ~zero
@pytest.mark.parametrize("learning_rate, learns", [(3e-3, True), (1e-12, False)])
def test_a_few_lora_steps_move_a_ct_caption_toward_ct(mini_base, prep_dataset, tmp_path, learning_rate, learns):
    data = dry_thickness_dir(prep_dataset, tmp_path / "train")
    out = tmp_path / "lora"
    code = train_main([str(ROOT / "recipes" / "lora.yaml"), f"model.pretrained={mini_base}", f"data.train_dir={data}",
                       f"output_dir={out}", "data.resolution=32", "train.batch_size=4", "train.max_steps=100",
                       f"train.learning_rate={learning_rate}", "train.lr_warmup_steps=0", "lora.rank=8",
                       "lora.alpha=8", "validation.prompts=[]", "logging.report_to=none"])
    assert code == 0
    before = distance_to_ct(generate(mini_base, [CAPTION]), data)
    after = distance_to_ct(generate(mini_base, [CAPTION], lora=out), data)
    if learns:
        assert after < 0.7 * before, (before, after)  # measured: 11.5 -> 2.4 floors
    else:
        assert abs(after - before) < 0.02 * before, (before, after)  # nothing learned, nothing moved


def test_textual_inversion_leaves_every_world_prompt_unchanged(mini_base, prep_dataset, tmp_path):
    out = tmp_path / "ti"
    code = train_main([str(ROOT / "recipes" / "textual_inversion.yaml"), f"model.pretrained={mini_base}",
                       f"data.train_dir={prep_dataset / 'train'}", f"output_dir={out}", "data.resolution=32",
                       "train.max_steps=5", "validation.prompts=[]", "logging.report_to=none"])
    assert code == 0
    prompts = ["a red circle", "a striped texture", "a blue square on a white background"]
    base = generate(mini_base, prompts, seeds=[0])
    with_tokens = generate(mini_base, prompts, embeddings=out / "embeddings", seeds=[0])
    assert np.array_equal(base, with_tokens)  # new tokens only: the base model is untouched
    trained = generate(mini_base, ["A <dry-slice> of a carbon composite material"], embeddings=out / "embeddings",
                       seeds=[0])
    assert trained.shape == (1, 32, 32, 3)
