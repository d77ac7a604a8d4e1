"""Generated slices in the scanner's grey levels: single-channel TIFF whose values are prep's intensity window run
backwards, so a lab can put them beside its scans and measure on them (porosity, fibre fraction, grey histograms).

prep maps raw voxels v to g = clip((v - lo) / (hi - lo), 0, 1) and quantizes g to 8 or 16 bits; a training run
records each state's window (`ldm_finetune.windows` in its files' headers). A generated grey level g in [0, 1] maps
back to lo + g (hi - lo): the scanner's units, clipped where prep's window clipped. Each TIFF says how it was made in
its ImageDescription tag (JSON), which tifffile and ImageJ / Fiji show.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import tifffile

from ldm_finetune.core.classes import split_class
from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import atomic_path
from ldm_finetune.core.layout import RunLayout
from ldm_finetune.sharing.metadata import PIXEL_SIZES_KEY, WINDOWS_KEY, file_header

PIXEL_MODEL_INFO = "classes.json"  # a pixel DDPM folder's facts (models/pixel_unet.py) hold the same keys
# TIFF's ResolutionUnit knows centimetres; a pixel size in these units becomes pixels per centimetre in the tags
CENTIMETRES = {"nm": 1e-7, "um": 1e-4, "µm": 1e-4, "micron": 1e-4, "mm": 0.1, "cm": 1.0, "m": 100.0}


def parse_window(text: str) -> tuple[float, float]:
    """'LO,HI' -> (lo, hi), LO < HI."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--window {text!r}: expected LO,HI (two numbers, e.g. 9000,50000)") from None
    if not lo < hi:
        raise UserError(f"--window {text!r}: LO must be below HI")
    return lo, hi


def from_unit(grey: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """[0, 1] grey levels -> scanner units (float64), the inverse of prep's window."""
    lo, hi = window
    return lo + np.clip(grey.astype(np.float64), 0.0, 1.0) * (hi - lo)


def scanner_array(grey: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """(H, W) scanner values: uint16 when the window lies within uint16's range (CT volumes mostly are), float32
    otherwise (float reconstructions, negative Hounsfield-like units)."""
    values = from_unit(grey, window)
    lo, hi = window
    if lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return np.clip(np.rint(values), np.ceil(lo), np.floor(hi)).astype(np.uint16)
    return values.astype(np.float32)


def run_windows(paths: list[str]) -> dict[str, tuple[float, float]]:
    """The per-state windows a model's trained files carry ({} when none does): LoRA / embedding files and run
    folders from `--lora` / `--embedding`, and a full fine-tune's `training_metadata.json`."""
    return {state: (float(lo), float(hi)) for state, (lo, hi) in _recorded(paths, WINDOWS_KEY).items()}


def run_pixel_sizes(paths: list[str]) -> dict[str, tuple[float, str]]:
    """{state/orientation: (pixel side, unit)} at the size the model was trained at ({} when not recorded)."""
    return {name: (float(size), unit) for name, (size, unit) in _recorded(paths, PIXEL_SIZES_KEY).items()}


def _recorded(paths: list[str], key: str) -> dict:
    """One header key's JSON mapping merged over a model's files (the first file naming an entry wins)."""
    merged: dict = {}
    for path in map(Path, paths):
        for value in _headers(path, key):
            for name, entry in (value if isinstance(value, dict) else json.loads(value)).items():
                merged.setdefault(name, entry)
    return merged


def _headers(path: Path, key: str) -> list:
    """The key's values in a model's files: safetensors headers hold JSON text, a pixel model's info the mapping."""
    if path.is_dir():
        for meta in (path / "training_metadata.json", path / PIXEL_MODEL_INFO, path / "model" / PIXEL_MODEL_INFO):
            if meta.is_file():
                return [w for w in [json.loads(meta.read_text()).get(key)] if w]
        files = RunLayout(path).adapter_files()
    else:
        files = [path]
    headers = [file_header(f) for f in files if f.is_file() and f.suffix == ".safetensors"]
    return [h[key] for h in headers if h.get(key)]


def pixel_size_for(prompt: str, sizes: dict[str, tuple[float, str]]) -> dict:
    """{"pixel_size", "pixel_unit"} for a prompt: the size every class shares, else the class whose state and
    orientation the prompt names; {} when neither settles it (the TIFF then has no physical scale)."""
    if len(set(sizes.values())) == 1:
        chosen = next(iter(sizes.values()))
    else:
        named = [c for c in sizes if all(_names(prompt, part) for part in split_class(c))]
        if len(named) != 1:
            return {}
        chosen = sizes[named[0]]
    return {"pixel_size": chosen[0], "pixel_unit": chosen[1]}


def _names(prompt: str, word: str) -> bool:
    """Whether a prompt names `word` as a word ('sf_dry' names dry, not dry-compacted)."""
    return re.search(rf"(?<![A-Za-z0-9-]){re.escape(word)}(?![A-Za-z0-9-])", prompt) is not None


def window_for(prompt: str, windows: dict[str, tuple[float, float]], override: tuple[float, float] | None,
               what: str = "prompt"):
    """(window, state or None) for one prompt: --window if given; the single window every state shares; else the
    state the prompt names (as a word: 'sf_dry' names dry, not dry-compacted)."""
    if override is not None:
        return override, None
    if not windows:
        raise UserError("--format tiff: this model carries no scanner window (its files were not trained on prep "
                        "data of this version); pass --window LO,HI in the scanner's units")
    if len(set(windows.values())) == 1:
        return next(iter(windows.values())), None
    named = [s for s in windows if _names(prompt, s)]
    if len(named) != 1:
        listing = ", ".join(f"{s} {list(w)}" for s, w in sorted(windows.items()))
        raise UserError(f"--format tiff: {what} {prompt!r} names {'no' if not named else 'more than one'} state, "
                        f"and the states' windows differ ({listing}); name one state or pass --window LO,HI")
    return windows[named[0]], named[0]


def write_tiff(path: Path, rgb: np.ndarray, window: tuple[float, float], facts: dict) -> Path:
    """One (H, W) TIFF in scanner units, its facts as JSON in the description tag, written atomically."""
    grey = rgb.mean(axis=-1) if rgb.ndim == 3 else rgb  # the model draws RGB; CT is grey
    array = scanner_array(grey, window)
    description = json.dumps(facts | {"window": list(window), "units": "scanner grey levels (prep's window, "
                                      "inverted)", "dtype": str(array.dtype)}, sort_keys=True)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, description=description, metadata=None, photometric="minisblack",
                         **_resolution_tags(facts))
    return path


def _resolution_tags(facts: dict) -> dict:
    """XResolution / YResolution in pixels per centimetre when the pixel size has a physical unit, so Fiji's
    measurements come out in the scanner's units; nothing otherwise."""
    per_cm = CENTIMETRES.get(str(facts.get("pixel_unit", "")).lower())
    if not per_cm or not facts.get("pixel_size"):
        return {}
    pixels = 1.0 / (facts["pixel_size"] * per_cm)
    return {"resolution": (pixels, pixels), "resolutionunit": "CENTIMETER"}
