"""Command-line pieces shared by `ldm-finetune` (cli.py) and `python -m ldm_finetune.train` (train.py)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
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


def field_default(settings: type, name: str):
    """The default a settings dataclass declares for one field (MISSING for a required one)."""
    found = {f.name: f for f in fields(settings)}[name]
    if found.default is MISSING and found.default_factory is not MISSING:
        return found.default_factory()
    return found.default


def shown(value, sep: str = " ") -> str:
    """A default as the user would type it: lists and tuples as their items."""
    return sep.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def setting(parser: argparse.ArgumentParser, flag: str, settings: type, help: str, *, name: str | None = None,
            merged: bool = False, sep: str = " ", **kwargs) -> argparse.Action:
    """A flag for one field of a settings dataclass, whose default is that field's: declared once, printed by
    DefaultsFormatter. `merged`: the value may also come from a config file (prep), so the flag defaults to None
    (the file, else the dataclass, decides) and the help names the dataclass's default."""
    name = name or flag.lstrip("-").replace("-", "_")
    default = field_default(settings, name)
    if "type" not in kwargs and "action" not in kwargs and "nargs" not in kwargs \
            and isinstance(default, (int, float, str, Path)) and not isinstance(default, bool):
        kwargs["type"] = type(default) if not isinstance(default, Path) else Path
    if merged:
        help = f"{help} (default: {shown(default, sep)})" if default is not None else help
        default = None
    action = parser.add_argument(flag, default=default, help=help, **kwargs)
    action.setting = (settings, name, sep)  # what tests/test_cli_defaults.py checks the printed default against
    return action


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that prints every flag's default from the flag itself, so that no number is written twice. Flags without
    a default (None, False, an empty string) and helps that already say theirs are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "(default" in text or default is None or default is False \
                or default == "" or default is argparse.SUPPRESS:
            return text
        sep = getattr(action, "setting", (None, None, " "))[2]
        return f"{text} (default: {shown(action.default, sep)})"
