"""Captions per (state, orientation), from a template.

Styles (the study's three ways of naming a concept, DESIGN.md):
- "prefix" (default, full fine-tuning / LoRA): rare `sf_` words, `sf_dry sf_thickness`;
- "dreambooth": rare identifiers before a class noun, `a w17h3r th1ck texture`;
- "textual_inversion": one placeholder token per concept, `A <dry-thickness> of a carbon composite material`.
A custom `template` may use {state}, {orientation}, {state_id}, {orientation_id} and {class_noun}.
"""

from __future__ import annotations

import string

from ldm_finetune.core.errors import UserError

STYLES = {
    "prefix": "sf_{state} sf_{orientation}",
    "dreambooth": "a {state_id} {orientation_id} {class_noun}",
    "textual_inversion": "A <{state}-{orientation}> of a carbon composite material",
}
# The study's DreamBooth identifiers (w17h3r, th1ck, w@rp, 1nj3C7); the two it did not name follow the same style.
DEFAULT_IDENTIFIERS = {
    "dry": "w17h3r",
    "dry-compacted": "c0mp4ct",
    "injected": "1nj3C7",
    "thickness": "th1ck",
    "warp": "w@rp",
    "weft": "w3ft",
}
FIELDS = ("state", "orientation", "state_id", "orientation_id", "class_noun")


def resolve_template(style: str, template: str | None) -> str:
    if template is None:
        if style not in STYLES:
            raise UserError(f"captions.style: {style!r} is not one of {', '.join(STYLES)}")
        template = STYLES[style]
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise UserError(f"captions.template {template!r}: {exc}") from None
    unknown = sorted(names - set(FIELDS))
    if unknown:
        raise UserError(f"captions.template uses {{{unknown[0]}}}; allowed fields: {', '.join(FIELDS)}")
    return template


def caption(template: str, state: str, orientation: str, identifiers: dict[str, str], class_noun: str) -> str:
    ids = DEFAULT_IDENTIFIERS | identifiers
    return template.format(
        state=state,
        orientation=orientation,
        state_id=ids.get(state, state),
        orientation_id=ids.get(orientation, orientation),
        class_noun=class_noun,
    )
