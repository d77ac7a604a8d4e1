"""The demo's wall time on an idle machine and beside one busy neighbour process, in one run (the machines are noisy,
so both are measured back to back), with the thread counts the demo chose (core/threads.py).

    python benchmarks/demo_under_load.py            # the default demo, twice
    python benchmarks/demo_under_load.py --neighbour-threads 2
    python benchmarks/demo_under_load.py --keep /tmp/demo   # keeps the idle run's folder for demo_concepts.py
    python benchmarks/demo_under_load.py --idle-only         # the report's numbers alone (kept as "idle_only")

The neighbour is a process that keeps `--neighbour-threads` cores busy with matrix products (another training job,
say). Goal (issue 23): loaded time <= 2x idle time on 2 cores. Results: results/demo_under_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

NEIGHBOUR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def run_demo(out: Path, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the demo choose
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ldm_finetune.cli", "demo", "--out", str(out), "--quiet", *extra],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"demo failed: {result.stderr[-2000:]}")
    stages = json.loads((out / "demo.json").read_text())["seconds"]
    threads = re.findall(r"\((\d+) CPU threads?", result.stdout)
    return {"seconds": round(seconds, 1), "stages": stages, "training_threads": [int(t) for t in threads],
            "report": headline(json.loads((out / "evaluation" / "metrics.json").read_text()))}


def headline(metrics: dict) -> dict:
    """Per model, what the report says it learned: its fidelity distances in real-vs-real floors (each distance
    over its floor, averaged over the distances and the classes it drew) and the classifier's accuracy."""
    ratios: dict[str, list[float]] = {}
    for entry in metrics["fidelity"].values():
        for name, model in entry["models"].items():
            floor = model.get("floor") or entry.get("floor") or {}  # a set scored at its own size has its own floor
            values = [model["values"][k] / floor[k] for k in floor if not k.startswith("prdc") and floor[k] > 0]
            if values:
                ratios.setdefault(name, []).append(sum(values) / len(values))
    models = metrics["classifier"]["models"]
    return {name: {"floors": round(sum(r) / len(r), 2), "classes": len(r),
                   "accuracy": round(models.get(name, {}).get("accuracy", 0), 3)}
            | ({"decoder_accuracy": round(models[name]["decoder_accuracy"], 3)}
               if "decoder_accuracy" in models.get(name, {}) else {})
            for name, r in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbour-threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="run the idle demo into this folder and keep it (for "
                        "demo_concepts.py); the loaded one is always discarded")
    parser.add_argument("--idle-only", action="store_true", help="skip the loaded run: the report's numbers alone, "
                        "recorded as idle_only beside the last full run")
    parser.add_argument("demo_args", nargs="*", help="extra `ldm-finetune demo` flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        idle = run_demo(args.keep or Path(tmp) / "idle", args.demo_args)
        print("idle", idle, flush=True)
        if args.idle_only:
            return record({"idle_only": {"date": time.strftime("%Y-%m-%d"), "demo_args": args.demo_args} | idle})
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(args.neighbour_threads)])
        try:
            time.sleep(3)
            loaded = run_demo(Path(tmp) / "loaded", args.demo_args)
        finally:
            neighbour.kill()
        print("loaded", loaded, flush=True)
    record({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "neighbour_threads": args.neighbour_threads,
            "demo_args": args.demo_args, "idle": idle, "loaded": loaded,
            "loaded_over_idle": round(loaded["seconds"] / idle["seconds"], 2)})


def record(update: dict) -> None:
    """Merged into results/demo_under_load.json: a full run replaces the last one and keeps any idle_only entry."""
    path = RESULTS / "demo_under_load.json"
    RESULTS.mkdir(exist_ok=True)
    result = (json.loads(path.read_text()) if path.is_file() else {}) | update
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(update, indent=2))


if __name__ == "__main__":
    main()
