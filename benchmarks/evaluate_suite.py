"""The weight-free evaluation suite on 1,000 generated + 1,000 real 512 x 512 slices (target: under 60 s on the
project's 2-core machine).

The 'real' set is a prep-style folder (train/ + validation/ with metadata.jsonl, 9 state x orientation classes) of
synthetic three-phase fields whose correlation length and grey levels depend on the class; the 'generated' set is
1,000 more fields of the same classes (different seeds). Timed: `evaluate.evaluate_sets` end to end (loading the
PNGs, statistics, floors, bootstrap, PRDC, pyramid SWD, classifier, memorisation, 3D consistency, report).

    python benchmarks/evaluate_suite.py                 # 1000 + 1000 at 512 px
    python benchmarks/evaluate_suite.py --n 200 --size 256
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

RESULTS = Path(__file__).parent / "results"
STATES = ["dry", "dry-compacted", "injected"]
ORIENTATIONS = ["thickness", "warp", "weft"]


def field(rng, size, state, orientation):
    sigma = {"thickness": 3.0, "warp": 6.0, "weft": 10.0}[orientation]
    g = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    g = (g - g.mean()) / g.std()
    levels = {"dry": [0.08, 0.15, 0.8], "dry-compacted": [0.08, 0.2, 0.85], "injected": [0.1, 0.45, 0.85]}[state]
    img = np.array(levels)[np.digitize(g, [-0.4, 0.6])] + 0.03 * rng.standard_normal((size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_split(folder: Path, n: int, size: int, seed: int, metadata: bool) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        state, orientation = STATES[i % 3], ORIENTATIONS[(i // 3) % 3]
        name = f"{state}__{orientation}/{i:05d}.png" if not metadata else f"{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(field(rng, size, state, orientation)).save(folder / name, compress_level=1)
        rows.append({"file_name": name, "text": "", "state": state, "orientation": orientation})
    if metadata:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="generated images, and real training images")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    from ldm_finetune.evaluation.evaluate import SuiteSettings, evaluate_sets
    from ldm_finetune.evaluation.imagesets import load_generated

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_split(tmp / "real" / "train", args.n, args.size, 1, metadata=True)
        write_split(tmp / "real" / "validation", args.n // 5, args.size, 2, metadata=True)
        write_split(tmp / "generated", args.n, args.size, 3, metadata=False)
        start = time.perf_counter()
        generated = {"model": load_generated(tmp / "generated", "model", None)}
        results = evaluate_sets(SuiteSettings(tmp / "real", max_real=None), generated, tmp / "out")
        seconds = time.perf_counter() - start
    record = {"machine": platform.processor() or platform.machine(), "settings": vars(args),
              "seconds": seconds, "target_seconds": 60,
              "classifier_accuracy": results.classifier.models["model"].accuracy,
              "ceiling_accuracy": results.classifier.ceiling_accuracy}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"evaluate_suite_{args.n}x{args.size}px.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
