"""What the shared files say about themselves: ModelSpec ids, kohya / A1111 ss_* keys, no local paths."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm_finetune.models.stable_diffusion import base_model_info
from ldm_finetune.sharing.lora import kohya_header
from ldm_finetune.sharing.metadata import tensors_sha256, training_header
from ldm_finetune.training.config import load_config

LORA = Path(__file__).parent.parent / "recipes" / "lora.yaml"


def unet(cross: int):
    return SimpleNamespace(config=SimpleNamespace(cross_attention_dim=cross))


@pytest.mark.parametrize("cross, prediction, family, architecture", [
    (768, "epsilon", "sd_v1", "stable-diffusion-v1"),
    (1024, "epsilon", "sd_v2", "stable-diffusion-v2-512"),
    (1024, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v"),
    (32, "epsilon", "other", "ldm_finetune-sd-cross32"),
])
def test_base_family_and_modelspec_architecture(cross, prediction, family, architecture):
    info = base_model_info("stabilityai/some-model", unet(cross), prediction)
    assert (info["family"], info["architecture"], info["base_model"]) == (family, architecture,
                                                                          "stabilityai/some-model")


def test_a1111_sees_an_sd2_lora_and_its_training_facts(tmp_path):
    model = tmp_path / "models" / "sd21-base"
    (model / "unet").mkdir(parents=True)
    cfg = load_config(LORA, [f"model.pretrained={model}", f"data.train_dir={tmp_path / 'data' / 'train'}",
                             f"output_dir={tmp_path / 'runs' / 'lora'}", "train.max_steps=7"])
    base = base_model_info(str(model), unet(1024), "epsilon")
    header = training_header(cfg, base, ["sf_dry sf_thickness"] * 3, ["sf_dry sf_thickness"], 7, "epsilon", "lora",
                             num_train_images=3)
    weights = {"unet.a.lora_A.weight": torch.zeros(16, 4), "unet.a.lora_B.weight": torch.zeros(4, 16)}
    kohya = kohya_header(header, weights)
    assert header["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert kohya["ss_base_model_version"] == "sd_v2" and kohya["ss_v2"] == "True"
    assert kohya["ss_network_alpha"] == "16.0" and kohya["ss_network_dim"] == "16"
    assert kohya["ss_resolution"] == "(512, 512)" and kohya["ss_max_train_steps"] == "7"
    assert kohya["ss_num_train_images"] == "3" and kohya["ss_noise_offset"] == "0.1" and kohya["ss_seed"] == "0"
    assert header["modelspec.author"] and header["modelspec.description"]
    # no local path of the trainer's machine travels with the file
    assert str(tmp_path) not in json.dumps(header) + json.dumps(kohya)
    assert header["ldm_finetune.base_model"] == "sd21-base"


def test_weights_hash_depends_on_the_values():
    a = {"x": torch.zeros(3), "y": torch.ones(2)}
    assert tensors_sha256(a) == tensors_sha256(dict(reversed(list(a.items()))))
    assert tensors_sha256(a) != tensors_sha256({"x": torch.zeros(3), "y": torch.full((2,), 2.0)})
