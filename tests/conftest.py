"""Shared fixtures: tiny phantom volumes on disk, and running the CLI in-process."""

from __future__ import annotations

import pytest

from data_prep.phantom import write_phantoms
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
