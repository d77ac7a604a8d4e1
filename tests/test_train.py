"""Launch-style tests of the training loop with recipes/lora.yaml on the tiny model and phantom slices.

One real `accelerate launch` subprocess checks the artifacts a user gets; in-process runs (`ldm-finetune train`,
the same code) check resume, caching and failure handling.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import lora_overrides

LORA_YAML = Path(__file__).parent.parent / "recipes" / "lora.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launched_run(tiny_model_dir, small_train_dir, tmp_path_factory):
    """`accelerate launch -m ldm_finetune.train recipes/lora.yaml` for 3 steps, checkpointing every step."""
    out = tmp_path_factory.mktemp("launch") / "run"
    overrides = lora_overrides(tiny_model_dir, small_train_dir, out, **{
        "checkpoint.every_steps": 1, "checkpoint.total_limit": 2, "validation.every_steps": 2,
        "validation.prompts": "['sf_dry sf_thickness', 'horse on a beach']", "logging.report_to": "tensorboard",
        "logging.every_steps": 1})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldm_finetune.train", str(LORA_YAML),
           *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_launch_writes_every_artifact(launched_run):
    out = launched_run
    for name in ("pytorch_lora_weights.safetensors", "README.md", "config.yaml", "metrics.jsonl",
                 "samples/final.png", "samples/step-000002.png"):
        assert (out / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard log"
    # total_limit=2 pruned checkpoint-1; nothing half-written is left behind
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    # a LoRA checkpoint holds the adapter, not the whole UNet again
    trainable = load_file(out / "checkpoints" / "checkpoint-3" / "trainable_0.safetensors")
    assert trainable and all("lora_" in k for k in trainable)


def test_lora_file_keys_and_metadata(launched_run, tiny_model_dir, small_train_dir):
    path = launched_run / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert modules == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in ".0"
    assert meta["ldm_finetune.recipe"] == "lora" and meta["ldm_finetune.global_step"] == "3"
    unet_file = Path(tiny_model_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    assert meta["ldm_finetune.base_model_sha256"] == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    manifest = small_train_dir.parent / "manifest.json"
    assert meta["ldm_finetune.dataset_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert json.loads(meta["ldm_finetune.config"])["noise"]["offset"] == 0.1
    assert "sf_dry sf_thickness" in json.loads(meta["ldm_finetune.trigger_words"])
    assert json.loads(meta["ldm_finetune.versions"])["diffusers"]
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 16 and adapter["unet.lora_alpha"] == 16
    card = (launched_run / "README.md").read_text()
    assert "sf_dry sf_thickness" in card and "samples/final.png" in card and "load_lora_weights" in card

    # the client-layout file beside it: the same modules in kohya keys, an explicit alpha each, the same header facts
    client = launched_run / f"{launched_run.name}.safetensors"
    assert f"`{client.name}`" in card and "ComfyUI" in card
    with safe_open(str(client), framework="pt") as f:
        kohya_meta = f.metadata()
        alphas = [f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")]
    assert len(alphas) == len(keys) // 2 and set(alphas) == {16.0}
    assert kohya_meta["ss_network_dim"] == "16" and kohya_meta["ldm_finetune.global_step"] == "3"


def test_plain_diffusers_loads_the_lora_and_it_changes_generations(launched_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        return pipe("sf_dry sf_thickness", num_inference_steps=3, height=32, width=32, generator=g,
                    output_type="np").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    before = images(pipe)
    pipe.load_lora_weights(launched_run)  # the folder, unchanged: diffusers finds pytorch_lora_weights.safetensors
    after = images(pipe)
    assert abs(after - before).max() > 1e-4
    trained = load_file(launched_run / "pytorch_lora_weights.safetensors")
    assert all(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k)  # B started at zero


def run_train(*overrides):
    from ldm_finetune.train import main

    return main([str(LORA_YAML), *map(str, overrides)])


def test_resume_replays_the_same_run_exactly(tiny_model_dir, small_train_dir, tmp_path):
    """5 steps in one go == 2 steps, then resume from that checkpoint for 3 more (crossing an epoch of 4 batches):
    same global step, LR schedule, optimizer state, RNG and data order, so bit-identical weights."""
    common = dict(**{"train.max_steps": 5, "checkpoint.every_steps": 2, "train.lr_warmup_steps": 2,
                     "train.lr_scheduler": "cosine", "data.cache_latents": "none"})
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, tmp_path / "a", **common)) == 0
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, resumed, **common,
                                     **{"checkpoint.resume": "latest"})) == 0
    full = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    tail = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in tail] == [3, 4, 5]
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    assert strip(tail) == strip(full[2:])  # same losses and learning rates step by step
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def losses_per_cache_mode(model_dir, train_dir, tmp_path, modes, **extra) -> dict:
    """{mode: the loss of every step} of one short LoRA run per latent-cache mode (text cached unless "none")."""
    losses = {}
    for mode in modes:
        out = tmp_path / mode
        assert run_train(*lora_overrides(model_dir, train_dir, out, **{
            "data.cache_latents": mode, "data.cache_text": mode != "none", **extra})) == 0
        losses[mode] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return losses


def test_latent_and_text_caches_do_not_change_training(tiny_model_dir, small_train_dir, tmp_path):
    """Cached VAE posteriors are sampled like on-the-fly encoding, so the losses match step for step."""
    losses = losses_per_cache_mode(tiny_model_dir, small_train_dir, tmp_path, ("none", "memory", "disk"))
    assert losses["none"] == pytest.approx(losses["memory"], rel=1e-5)
    assert losses["memory"] == losses["disk"]
    assert len(list((tmp_path / "disk" / "cache").glob("latents-*.safetensors"))) == 1


def test_frozen_encoders_run_as_the_caches_encode_under_mixed_precision(tiny_model_dir, small_train_dir, tmp_path):
    """With bf16 the uncached step encodes images and captions outside the step's autocast, in the frozen weights'
    own dtype, exactly as the caches do, so caching still changes nothing (under autocast it did)."""
    losses = losses_per_cache_mode(tiny_model_dir, small_train_dir, tmp_path, ("none", "memory"),
                                   **{"train.mixed_precision": "bf16"})
    assert losses["none"] == pytest.approx(losses["memory"], rel=1e-5)


def test_noise_options_and_text_encoder_lora_train(tiny_model_dir, small_train_dir, tmp_path):
    out = tmp_path / "v"
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, out, **{
        "model.prediction_type": "v_prediction", "noise.zero_terminal_snr": "true", "noise.min_snr_gamma": 5,
        "noise.input_perturbation": 0.1, "lora.text_encoder": "true", "lora.targets": "[attention, resnet]",
        "train.gradient_accumulation_steps": 2, "train.mixed_precision": "bf16"})) == 0
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(".conv1.lora_A." in k for k in keys)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert f.metadata()["ldm_finetune.prediction_type"] == "v_prediction"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_model_dir, small_train_dir, tmp_path,
                                                                      capsys):
    out = tmp_path / "nan"
    code = run_train(*lora_overrides(tiny_model_dir, small_train_dir, out, **{
        "train.learning_rate": 1e30, "train.max_grad_norm": "null", "checkpoint.every_steps": 1,
        "train.lr_warmup_steps": 0}))
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 1 and line.startswith("error: loss became nan at step"), err
    kept = Path(line.split("Last good checkpoint: ")[1].split(". ")[0])
    assert kept.parent == out / "checkpoints" and kept.is_dir()
    assert not (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"data.train_dir": "/nonexistent/train"}, "data.train_dir: /nonexistent/train does not exist"),
    ({"model.pretrained": "/nonexistent/model"}, "model.pretrained: /nonexistent/model does not exist"),
    ({"model.pretrained": "some-org/not-downloaded"}, "and pass the folder"),
    ({"model.attention": "xformers"}, "model.attention=xformers"),
    ({"train.optimizer": "adamw8bit"}, "bitsandbytes"),
    ({"checkpoint.resume": "/nonexistent/ckpt"}, "checkpoint.resume: /nonexistent/ckpt is not a checkpoint"),
])
def test_bad_runs_fail_in_one_line(tiny_model_dir, small_train_dir, tmp_path, capsys, overrides, message):
    pytest.importorskip("torch")
    if "xformers" in str(overrides) and torch.cuda.is_available():
        pytest.skip("xformers may exist on GPU machines")
    code = run_train(*lora_overrides(tiny_model_dir, small_train_dir, tmp_path / "r", **overrides))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_prep_root_instead_of_train_folder_gets_a_hint(tiny_model_dir, prep_dataset, tmp_path, capsys):
    code = run_train(*lora_overrides(tiny_model_dir, prep_dataset, tmp_path / "r"))
    assert code == 2 and "use its train/ folder" in capsys.readouterr().err


def test_two_process_ddp_run_on_cpu(tiny_model_dir, small_train_dir, tmp_path):
    """Two processes (DDP over gloo): one metrics line per step, per-process RNG in the checkpoint, one LoRA file."""
    import os

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ldm_finetune.train",
           str(LORA_YAML), *lora_overrides(tiny_model_dir, small_train_dir, out, **{"checkpoint.every_steps": 2})]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert load_file(out / "pytorch_lora_weights.safetensors")
