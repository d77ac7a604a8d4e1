"""Every recipe in recipes/ runs as shipped, the way its first line says: `accelerate launch -m ldm_finetune.train
recipes/X.yaml`, from a project folder whose prep output is where the recipes look (data/slices/train).

Only the model path (the offline tiny model instead of the hub id) and step counts (train.max_steps, the
validation images' sampling steps, and pivotal.ti_steps so that both phases fit) are overridden, plus, for
DreamBooth's generated class prior, the number of class images (200 as shipped: each one is a 30-step generation at
512 px, an hour on this CPU; 4 here exercise the same code). Everything else - 512 px, batch size, caches, mixed
precision `auto`, offset noise, validation prompts and seeds, checkpointing, logging - is the file's own. The run
times are logged (pytest -s shows them) and quoted in the issue notes; no test asserts a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ldm_finetune.demo import launch_command
from ldm_finetune.training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
STEPS = 2
UNAVOIDABLE = {"dreambooth.yaml": ["dreambooth.num_class_images=4"], "pivotal_tuning.yaml": ["pivotal.ti_steps=1"]}
# sampling steps of the end-of-run validation images (30 DDIM steps x 8 images at 512 px, or 50 x 36 for the pixel
# DDPM, are most of a run's time on this CPU); the images are still rendered and saved as shipped otherwise
SAMPLING_STEPS = {"ddpm_pixel.yaml": "validation.steps=2"}

# the files each recipe's shareable output must hold (besides config.yaml, the model card and the finished marker)
OUTPUTS = {
    "lora.yaml": ["pytorch_lora_weights.safetensors", "{run}.safetensors"],
    "lora_dreambooth.yaml": ["pytorch_lora_weights.safetensors", "{run}.safetensors"],
    "dreambooth.yaml": ["pipeline/model_index.json"],
    "full_finetune.yaml": ["pipeline/model_index.json"],
    "textual_inversion.yaml": ["embeddings/dry-slice.safetensors", "a1111/injected-slice.safetensors"],
    "pivotal_tuning.yaml": ["pytorch_lora_weights.safetensors", "{run}.safetensors"],
    "ddpm_pixel.yaml": ["model/model_index.json", "model/README.md"],
}
pytestmark = pytest.mark.slow


def test_every_shipped_recipe_is_covered():
    assert {p.name for p in SHIPPED} == set(OUTPUTS)


@pytest.fixture(scope="module")
def project(tmp_path_factory, phantom_dir, tiny_model_dir):
    """A user's project folder: data/slices/train from prep, every 16th thickness and 8th warp / weft slice (~180
    images: every recipe's concepts are there, and caching them at 512 px stays short on a CPU)."""
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.prep import run_prep

    folder = tmp_path_factory.mktemp("project")
    volumes = [VolumeSpec(p.stem, p) for p in sorted(phantom_dir.glob("*.tif"))]
    run_prep(PrepConfig(volumes=volumes, out=folder / "data" / "slices", resolution=32,
                        stride={"thickness": 16, "warp": 8, "weft": 8}), show_progress=False)
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    return folder


@pytest.mark.parametrize("recipe", [p.name for p in SHIPPED])
def test_shipped_recipe_runs_as_shipped(recipe, project, tiny_model_dir):
    overrides = [f"train.max_steps={STEPS}", SAMPLING_STEPS.get(recipe, "validation.num_inference_steps=2"),
                 *UNAVOIDABLE.get(recipe, [])]
    if recipe != "ddpm_pixel.yaml":  # the pixel DDPM trains from scratch: no base model
        overrides.insert(0, f"model.pretrained={tiny_model_dir}")
    threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else str(os.cpu_count() or 1)
    command = launch_command(Path("recipes") / recipe, overrides, ["--num_cpu_threads_per_process", threads])
    start = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                            text=True, timeout=1800)
    seconds = time.perf_counter() - start
    print(f"\n{recipe}: {seconds:.0f} s on this CPU ({STEPS} steps, as shipped otherwise)")
    assert result.returncode == 0, result.stderr[-3000:]
    out = project / load_config(project / "recipes" / recipe).output_dir
    finished = json.loads((out / "training_finished.json").read_text())
    assert finished["global_step"] == STEPS
    card = [] if recipe == "ddpm_pixel.yaml" else ["README.md"]  # the pixel model's card is inside model/
    for name in [n.format(run=out.name) for n in OUTPUTS[recipe]] + card + ["config.yaml"]:
        assert (out / name).is_file(), f"{recipe}: {name} missing"
    assert list((out / "samples").glob("*.png")), f"{recipe}: no validation images"
