"""The benchmark scripts stay runnable: the GPU throughput script, in its CPU smoke mode on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_train_gpu_benchmark_smoke_run_on_cpu():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--presets", "tiny", "--device", "cpu",
           "--resolution", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--no-record"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert row["preset"] == "tiny" and row["images_per_s"] > 0 and row["tflop_per_step"] > 0
    assert 0 < row["lora_params_m"] < row["unet_params_m"]
