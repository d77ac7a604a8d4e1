"""The training entry point (the accelerate launch target):
    accelerate launch -m ldm_finetune.train recipes/lora.yaml [key.sub=value ...] [--dry-run]
    ldm-finetune train recipes/lora.yaml [key.sub=value ...]          (same code, current process)

The config is parsed and checked (training/config.py) before any model loads; training/recipes.py picks the task
and training/fit.py runs it.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from ldm_finetune.arguments import add_train_arguments, parse_with_overrides
from ldm_finetune.core.configtools import to_dict
from ldm_finetune.core.errors import run_guarded
from ldm_finetune.training.config import load_config
from ldm_finetune.training.recipes import train
from ldm_finetune.core.threads import use_cpu_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_finetune.train", description="Train a recipe (one YAML from recipes/). Launch with "
        "`accelerate launch -m ldm_finetune.train CONFIG ...` for mixed precision on GPUs and multi-GPU (DDP).")
    add_train_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    use_cpu_threads()  # how many cores are free now (OMP_NUM_THREADS wins: accelerate launch sets it)
    train(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(run_from_args, parse_with_overrides(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
