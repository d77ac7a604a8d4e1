"""Each command-line default is declared once: flags for a settings dataclass take the field's default, and every
default `--help` prints is the one the flag (and so the dataclass) really has."""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, fields

import pytest

from data_prep.config import PrepConfig
from ldm_finetune.arguments import DefaultsFormatter, field_default, setting, shown
from ldm_finetune.cli import build_parser, main
from ldm_finetune.demo_settings import DemoSettings
from ldm_finetune.generation.settings import GenerateSettings, SampleSettings

PRINTED = re.compile(r"\(default: ([^)]*)\)")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def mismatches(parser: argparse.ArgumentParser) -> list[str]:
    """Flags whose printed default is not their real one, or whose real one is not their dataclass's."""
    bad = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help is None:
            continue
        printed = PRINTED.findall(" ".join(formatter._get_help_string(action).split()))
        if hasattr(action, "setting"):
            settings, name, sep = action.setting
            declared = field_default(settings, name)
            expected = [] if declared is None or declared is False or declared == "" else [shown(declared, sep)]
            if action.default not in (declared, None) or printed != expected:
                bad.append(f"{action.option_strings[0]}: prints {printed}, declared {declared!r}")
        elif action.default not in (None, False) and printed and printed != [shown(action.default)]:
            bad.append(f"{action.option_strings[0]}: prints {printed}, default {action.default!r}")
    return bad


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_printed_default_is_the_real_one(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and "usage: ldm-finetune" in capsys.readouterr().out
    assert not mismatches(subcommands()[name])


@pytest.mark.parametrize("name, settings", [("generate", GenerateSettings), ("sample", SampleSettings),
                                            ("demo", DemoSettings)])
def test_flags_of_a_settings_dataclass_default_to_its_fields(name, settings):
    """A flag named like a field has the field's default, so the dataclass and the CLI cannot drift apart."""
    actions = {a.dest: a for a in subcommands()[name]._actions}
    covered = [f.name for f in fields(settings) if f.name in actions and field_default(settings, f.name) is not MISSING]
    assert len(covered) >= 8
    for field_name in covered:
        default = actions[field_name].default
        declared = field_default(settings, field_name)
        assert default == declared or (isinstance(declared, tuple) and list(declared) == default), field_name


def test_prep_flags_leave_the_yaml_file_in_charge_but_print_its_defaults():
    actions = {a.dest: a for a in subcommands()["prep"]._actions}
    assert actions["resolution"].default is None  # a flag not given must not override prep.yaml
    assert "(default: 512)" in actions["resolution"].help and PrepConfig.resolution == 512


def test_the_check_can_fail():
    """A help that states a default by hand, and a flag set apart from its dataclass, are both reported."""
    parser = argparse.ArgumentParser(formatter_class=DefaultsFormatter)
    parser.add_argument("--steps", type=int, default=50, help="steps (default: 30)")
    drifted = setting(parser, "--n", SampleSettings, "images")
    drifted.default = 3
    assert len(mismatches(parser)) == 2
