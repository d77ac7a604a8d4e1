"""Command-line pieces shared by `ldm-finetune` (cli.py) and `python -m ldm_finetune.train` (train.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `ldm-finetune train` and `python -m ldm_finetune.train` (one definition for both)."""
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml", help="recipe YAML, e.g. recipes/lora.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides parsed as YAML scalars, e.g. train.max_steps=10 data.resolution=64")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args that also accepts KEY=VALUE overrides after flags (`train CONFIG --dry-run a.b=1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args
