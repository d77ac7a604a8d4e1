"""Bad input a user meets with models, datasets and resources: one line naming the file / key and what to do,
exit status 2, nothing half-written. (TIFF, config and run-folder cases live beside the code they exercise:
test_tiff_inputs, test_volume, test_recipe_config, test_faults, ...)"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_finetune.core.layout import LORA_WEIGHT_NAME, RunLayout
from ldm_finetune.models.lora import add_lora, lora_state_dict
from ldm_finetune.models.stable_diffusion import build_pipeline
from ldm_finetune.sharing.lora import save_lora
from ldm_finetune.training.config import LoraConfig
from tests.conftest import lora_overrides
from tests.test_faults import copy_dataset, one_line_error, run_train


def error_after_progress(capsys) -> str:
    """The one error line of a run that failed mid-training (the progress bar shares stderr and ends its line)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


GENERATE = ["--prompt", "a", "--n", "1", "--steps", "1", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def lora_weights(tmp_path_factory):
    pipe = build_pipeline("tiny")
    add_lora(pipe.unet, pipe.text_encoder, LoraConfig(rank=4, alpha=4.0, text_encoder=True))
    weights, meta = lora_state_dict(pipe.unet, pipe.text_encoder)
    return weights, meta


def edited_lora(tmp_path, lora_weights, edit) -> str:
    weights, meta = lora_weights
    key = next(k for k in weights if k.endswith("attn2.to_v.lora_B.weight"))
    folder = tmp_path / "lora"
    save_lora(folder, edit(dict(weights), key), meta, {})
    return str(folder)


@pytest.mark.parametrize("edit, expected", [
    (lambda w, k: w | {k: torch.zeros(w[k].shape[0], 8)}, "down matrix rank 4, up matrix rank 8; the file is damaged"),
    (lambda w, k: {n: v for n, v in w.items() if n != k}, "no up matrix for its down matrix"),
    (lambda w, k: w | {k: torch.zeros(48, 4)},
     "wrong shape (first: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v (LoRA output 48, model 32))"),
], ids=["ranks-disagree", "up-matrix-missing", "wrong-output-width"])
def test_a_lora_of_the_wrong_shape(lora_weights, tiny_model_dir, tmp_path, run_cli, edit, expected):
    lora = edited_lora(tmp_path, lora_weights, edit)
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--lora", lora, *GENERATE, "--out", tmp_path / "x")
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_an_embedding_of_another_width(tiny_model_dir, tmp_path, run_cli):
    emb = tmp_path / "wide.safetensors"  # an SD 2.x embedding (1024 wide) on an SD 1.x encoder (768), here 48 vs 32
    save_file({"<wide>": torch.zeros(1, 48)}, str(emb))
    code, _, err = run_cli("generate", "--model", tiny_model_dir, "--embedding", emb, *GENERATE,
                           "--out", tmp_path / "x")
    assert code == 2 and err.startswith(f"error: --embedding {emb}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


# --- datasets ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("edit, expected", [
    (lambda rows: [], "lists no images"),
    (lambda rows: rows[:-1] + [dict(rows[-1], file_name="gone.png")], "images in"),
    (lambda rows: rows[:-1] + [{k: v for k, v in rows[-1].items() if k != "text"}], "no caption column 'text'"),
], ids=["empty-split", "caption-row-without-its-image", "image-row-without-its-caption"])
def test_a_dataset_whose_captions_and_images_disagree(tiny_model_dir, small_train_dir, tmp_path, capsys, edit,
                                                      expected):
    data = copy_dataset(small_train_dir, tmp_path / "train", edit)
    code = run_train(*lora_overrides(tiny_model_dir, data, tmp_path / "run"))
    assert code == 2 and expected in one_line_error(capsys) and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"train.batch_size": 8}, {"train.gradient_accumulation_steps": 4}],
                         ids=["batch", "accumulation"])
def test_a_batch_the_dataset_cannot_fill(tiny_model_dir, small_train_dir, tmp_path, capsys, settings):
    """Seven images: a batch of 8, or 2 x 4 accumulated, cannot be made once per epoch."""
    code = run_train(*lora_overrides(tiny_model_dir, small_train_dir, tmp_path / "run", **settings))
    err = one_line_error(capsys)
    assert code == 2 and "images per optimizer step, but" in err and "gives 7 per epoch" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_anneal_longer_than_a_run_set_in_epochs(tiny_model_dir, small_train_dir, tmp_path, capsys):
    """Seven images at batch 2: one epoch is 4 steps, too few for 1 warm-up + 5 annealing ones; known only once the
    dataset is counted, and still refused before anything is written to the run folder."""
    code = run_train(*lora_overrides(tiny_model_dir, small_train_dir, tmp_path / "run", **{
        "train.max_steps": "null", "train.epochs": 1, "train.lr_scheduler": "warmup_stable_decay",
        "train.lr_decay_steps": 5}))
    err = one_line_error(capsys)
    assert code == 2 and "lr_warmup_steps (1) + lr_decay_steps (5) exceed the run's 4 steps" in err, err
    layout = RunLayout(tmp_path / "run")
    assert not layout.config.exists() and not layout.checkpoints.exists()  # (the lock and the data cache stay)


# --- resources -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_checkpoint(tiny_model_dir, small_train_dir, tmp_path, capsys, monkeypatch):
    """The second checkpoint's save dies half-way with ENOSPC: one line, the first checkpoint intact, no partial
    folder left; after space is freed, resume finishes the run."""
    import accelerate

    out = tmp_path / "run"
    args = lora_overrides(tiny_model_dir, small_train_dir, out, **{"checkpoint.every_steps": 2, "train.max_steps": 4})
    real_save = accelerate.Accelerator.save_state

    def save_until_full(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            (RunLayout(out).checkpoints / ".checkpoint-4.part").mkdir(exist_ok=True)
            (RunLayout(out).checkpoints / ".checkpoint-4.part" / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_until_full)
    code = run_train(*args)
    err = error_after_progress(capsys)
    assert code == 2 and "cannot write checkpoint-4 (No space left on device)" in err and "resume=latest" in err
    checkpoints = sorted(p.name for p in RunLayout(out).checkpoints.iterdir())
    assert checkpoints == ["checkpoint-2"] and not RunLayout(out).lora.exists()
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real_save)
    assert run_train(*args) == 0
    assert json.loads(RunLayout(out).finished.read_text())["global_step"] == 4


@pytest.mark.slow
def test_a_disk_that_fills_up_while_the_adapter_is_written(tiny_model_dir, small_train_dir, tmp_path, capsys,
                                                            monkeypatch):
    import ldm_finetune.sharing.lora as sharing_lora

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 10)  # a partial write, then the error
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(sharing_lora, "save_file", full)
    out = tmp_path / "run"
    code = run_train(*lora_overrides(tiny_model_dir, small_train_dir, out))
    err = error_after_progress(capsys)
    assert code == 2 and "No space left on device; free some space and rerun" in err, err
    assert not RunLayout(out).lora.exists() and not RunLayout(out).finished.exists()
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".part"))]
    monkeypatch.undo()
    assert run_train(*lora_overrides(tiny_model_dir, small_train_dir, out)) == 0  # with space again it runs through
    assert load_file(RunLayout(out).lora) and LORA_WEIGHT_NAME == RunLayout(out).lora.name


def test_a_mini_base_anneal_longer_than_its_steps_fails_before_any_training(run_cli, tmp_path):
    code, _, err = run_cli("mini-base", tmp_path / "base", "--rebuild", "--no-cache", "--steps", "10",
                           "--decay-steps", "20")
    assert code == 2 and err == "error: mini-base: --decay-steps 20 must be between 0 and --steps (10)\n", err
    assert not (tmp_path / "base").exists()
