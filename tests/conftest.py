"""Shared fixtures: tiny phantom volumes on disk, and running the CLI in-process."""

from __future__ import annotations

import os

# No test may reach a model hub: with this set, hub ids fail at once instead of retrying for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on a 2-core machine: one thread each, or torch's thread pools fight over the cores (the tiny
    # models' many small ops got ~5x slower in the 1000-step sampler test)
    torch.set_num_threads(1)
    # and so does every process they start, and every command that picks its own count (core/threads.py)
    os.environ["OMP_NUM_THREADS"] = "1"

from data_prep.phantom import write_phantoms  # noqa: E402
from ldm_finetune.cli import main

# Small enough for fast tests, large enough that every state x orientation gets train and validation tiles at 32 px.
SMALL_DRY_SHAPE = (48, 80, 128)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    write_phantoms(out, SMALL_DRY_SHAPE, seed=3)
    return out


@pytest.fixture
def run_cli(capsys):
    """Run `ldm-finetune ARGS` in-process; returns (exit status, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random-init SD pipeline in diffusers layout, built once per session."""
    from ldm_finetune.models.stable_diffusion import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def prep_dataset(phantom_dir, tmp_path_factory):
    """A prep output at 32 px of all nine state x orientation concepts (train/ and validation/)."""
    from data_prep.config import PrepConfig, VolumeSpec
    from data_prep.phantom import STATES
    from data_prep.prep import run_prep

    out = tmp_path_factory.mktemp("prep") / "ds"
    cfg = PrepConfig(volumes=[VolumeSpec(s, phantom_dir / f"{s}.tif") for s in STATES], out=out, resolution=32)
    run_prep(cfg, show_progress=False)
    return out


@pytest.fixture(scope="session")
def small_train_dir(prep_dataset, tmp_path_factory):
    """Seven training slices (one per concept, seven concepts): 4 batches of 2, so 5 steps cross an epoch."""
    import json
    import shutil

    src = prep_dataset / "train"
    out = tmp_path_factory.mktemp("small") / "train"
    rows, seen = [], set()
    for line in (src / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if (row["state"], row["orientation"]) not in seen and len(rows) < 7:
            seen.add((row["state"], row["orientation"]))
            rows.append(row)
    for row in rows:
        (out / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / row["file_name"], out / row["file_name"])
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(prep_dataset / "manifest.json", out.parent / "manifest.json")
    return out


def lora_overrides(model_dir, train_dir, output_dir, **extra):
    """Command-line overrides that turn recipes/lora.yaml into a seconds-long CPU run on the tiny model."""
    settings = {
        "model.pretrained": model_dir, "data.train_dir": train_dir, "output_dir": output_dir,
        "data.resolution": 32, "data.num_workers": 0, "train.batch_size": 2, "train.max_steps": 3,
        "train.mixed_precision": "no", "train.lr_warmup_steps": 1, "validation.prompts": "[]",
        "validation.num_inference_steps": 2, "logging.report_to": "none", "checkpoint.every_steps": "null",
        "train.learning_rate": 1e-3,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]
