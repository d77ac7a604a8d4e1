"""Shared fixtures: tiny phantom volumes on disk, and running the CLI in-process."""

from __future__ import annotations

import os

# No test may reach a model hub: with this set, hub ids fail at once instead of retrying for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from data_prep.phantom import write_phantoms  # noqa: E402
from ldm_finetune.cli import main  # noqa: E402

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
    from ldm_finetune.models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
