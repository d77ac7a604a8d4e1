"""A procedural captioned world that a small text-to-image model can learn in minutes on a CPU: coloured shapes and
textures, drawn from a seed, no files needed. It is what the mini base (`ldm-finetune mini-base`) is pretrained on,
so that fine-tuning on CT slices has something to learn *from* and something to *forget*.

- shapes: "a red circle", "a blue square on a white background" (6 colours, 3 shapes, 3 backgrounds, varied sizes
  and positions);
- textures, under the class noun `texture` that the study's DreamBooth used: "a striped texture",
  "a black and white checkerboard texture", "a zigzag texture", "a dotted texture" (varied period, phase, angle),
  and, for a quarter of them, the bare class noun: "a texture", "a black and white texture". DreamBooth's class
  prompt is that bare noun, so the base must draw a texture for it (and the prior can only keep what the base knows).

CT slices are deliberately absent: whatever CT-likeness a fine-tuned model shows comes from the fine-tuning.
Every image carries its ground truth (`WorldItem`), and `parse_prompt` recovers the truth a prompt asks for, which
is what the probe (models/world_probe.py) checks generated images against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side in pixels
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
           "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ["circle", "square", "triangle"]
TEXTURES = ["striped", "checkerboard", "zigzag", "dotted"]
KINDS = SHAPES + TEXTURES  # what the probe tells apart
CLASS_NOUN = "texture"
CLASS_PROMPTS = [f"a {CLASS_NOUN}", f"a black and white {CLASS_NOUN}"]  # the class noun alone, as DreamBooth uses it
# the study's DreamBooth identifiers, lower-case as CLIP reads them; the mini base holds each as one token that no
# caption uses (models/tokenizer.py adds them), so it starts as rare as DreamBooth wants an identifier to be
IDENTIFIERS = ["w17h3r", "th1ck", "w@rp", "1nj3c7"]
# words the mini base's tokenizer must hold as single tokens besides the world's own (drift probes, the project's
# captions and Textual Inversion initializers), so every shipped recipe runs against it unchanged
EXTRA_WORDS = ["a", "an", "of", "on", "and", "with", "the", "horse", "beach", "two", "zebras", "zebra", "skin",
               "carbon", "composite", "material", "slice", "dry", "compacted", "injected", "resin", "compressed",
               "thickness", "warp", "weft", "woven", "fibre", "tomography", "photo", "sf_dry", "sf_thickness",
               "sf_warp", "sf_weft", "sf_injected", "sf_compacted", "sf_dry-compacted"]


@dataclass(frozen=True)
class WorldItem:
    kind: str  # a shape or a texture kind
    colour: str | None  # the shape's colour (None for textures: they are black and white)
    background: str | None  # the shape's background (None for textures)
    caption: str


def world_words() -> list[str]:
    """Every word a world caption can use, then the extra words: the mini base's vocabulary."""
    words = ["a", "on", "background", "and", CLASS_NOUN] + list(COLOURS) + list(BACKGROUNDS) + SHAPES + TEXTURES
    return list(dict.fromkeys(words + EXTRA_WORDS))


def parse_prompt(prompt: str) -> WorldItem:
    """The truth a world prompt asks for ("a red circle on a black background" -> circle, red, black). A prompt that
    names the class noun but no texture kind ("a texture") asks for kind CLASS_NOUN: any texture is right."""
    words = prompt.lower().replace(",", " ").split()
    kind = next((w for w in words if w in KINDS), None)
    if kind is None and CLASS_NOUN in words:
        return WorldItem(CLASS_NOUN, None, None, prompt)
    if kind is None:
        raise ValueError(f"{prompt!r} names no world shape or texture ({', '.join(KINDS)}) nor {CLASS_NOUN!r}")
    if kind in TEXTURES:
        return WorldItem(kind, None, None, prompt)
    colour = next((w for w in words[:words.index(kind)] if w in COLOURS), None)
    background = "grey"
    if "background" in words:
        background = next(w for w in words[words.index(kind):] if w in BACKGROUNDS)
    return WorldItem(kind, colour, background, prompt)


def sample_item(rng: np.random.Generator) -> WorldItem:
    """A random caption of the world: shapes two times in three, textures otherwise."""
    if rng.random() < 2 / 3:
        kind = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        backgrounds = [b for b in BACKGROUNDS if b != colour]
        background = "grey" if rng.random() < 0.5 else backgrounds[rng.integers(len(backgrounds))]
        caption = f"a {colour} {kind}" + ("" if background == "grey" else f" on a {background} background")
        return WorldItem(kind, colour, background, caption)
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    caption = f"a {kind} {CLASS_NOUN}" if rng.random() < 0.5 else f"a black and white {kind} {CLASS_NOUN}"
    if rng.random() < 0.25:
        caption = caption.replace(f" {kind}", "")  # the bare class noun
    return WorldItem(kind, None, None, caption)


def _grid(size: int = SIZE):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return y, x


def draw_shape(item: WorldItem, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    y, x = _grid(size)
    r = rng.uniform(0.2, 0.36) * size  # half-size
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    if item.kind == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
    elif item.kind == "square":
        mask = (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
    else:  # an upright isosceles triangle: apex at the top, base at the bottom
        top, bottom = cy - r, cy + r
        half_width = (y - top) / (2 * r) * r
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUNDS[item.background]
    image[mask] = COLOURS[item.colour]
    return image


def draw_texture(item: WorldItem, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    y, x = _grid(size)
    period = rng.uniform(5.0, 9.0)
    phase = rng.uniform(0, period)
    if item.kind == "striped":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        u = x * np.cos(angle) + y * np.sin(angle)
        on = ((u + phase) % period) < period / 2
    elif item.kind == "checkerboard":
        on = (((x + phase) // (period / 2)) + ((y + phase) // (period / 2))) % 2 == 0
    elif item.kind == "zigzag":
        amplitude = period / 2
        tri = np.abs(((x + phase) % period) - period / 2) / (period / 2) * amplitude  # a triangle wave along x
        on = ((y - tri) % period) < period / 2.5
    else:  # dotted: dots on a square lattice
        cell = period
        dy = ((y + phase) % cell) - cell / 2
        dx = ((x + phase) % cell) - cell / 2
        on = dy ** 2 + dx ** 2 <= (cell * 0.28) ** 2
    image = np.empty((size, size, 3), np.float32)
    image[:] = COLOURS["black"]
    image[on] = COLOURS["white"]
    return image


def draw(item: WorldItem, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]."""
    image = draw_shape(item, rng, size) if item.kind in SHAPES else draw_texture(item, rng, size)
    return image / 255.0


def world_samples(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[WorldItem]]:
    """n images (n, size, size, 3) in [0, 1] with their items; the same seed gives the same world."""
    rng = np.random.default_rng(seed)
    items = [sample_item(rng) for _ in range(n)]
    return np.stack([draw(item, rng, size) for item in items]), items


def world_prompts() -> list[str]:
    """A fixed set of prompts covering the world (for the base's probe score and the drift probes)."""
    shapes = [f"a {c} {s}" for s in SHAPES for c in COLOURS]
    on_background = [f"a {c} {s} on a {b} background" for s in SHAPES for c, b in
                     (("red", "white"), ("blue", "black"), ("yellow", "black"), ("green", "white"))]
    textures = [f"a {k} {CLASS_NOUN}" for k in TEXTURES]
    return shapes + on_background + textures
