"""The demo end to end at its smallest settings, through the installed command, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ldm_finetune.demo import DREAMBOOTH_SAMPLES

pytestmark = pytest.mark.slow
SMALLEST = ["--shape", "32", "64", "96", "--resolution", "32", "--lora-steps", "2", "--sd-steps", "2",
            "--ddpm-steps", "2", "--ddpm-resolution", "16", "--eval-images", "4", "--quiet"]


def demo(*args):
    cmd = [sys.executable, "-m", "ldm_finetune.cli", "demo", *args]
    # one thread: pytest-xdist already runs one test per core
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def test_demo_runs_every_stage_and_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    result = demo("--out", str(out), *SMALLEST)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for k, stage in enumerate(["phantom", "prep", "mini-base", "lora-dreambooth", "textual-inversion", "generate",
                               "ddpm-pixel", "evaluate"], 1):
        assert f"[{k}/8] {stage} done in" in result.stdout
    report = out / "evaluation" / "report.html"
    assert f"Open the report in a browser: {report.resolve()}" in result.stdout
    # each recipe ran through accelerate launch and wrote its shareable files
    assert (out / "runs" / "lora_dreambooth" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "runs" / "textual_inversion" / "embeddings").iterdir()) == [
        "dry-compacted-slice.safetensors", "dry-slice.safetensors", "injected-slice.safetensors"]
    assert (out / "runs" / "ddpm_pixel" / "model" / "classes.json").is_file()
    assert "accelerate launch -m ldm_finetune.train recipes/lora_dreambooth.yaml" in result.stdout
    assert (out / "logs" / "ddpm_pixel.log").stat().st_size > 0
    assert len(list((out / "generated" / "lora_dreambooth").glob("*.png"))) == 2 * len(DREAMBOOTH_SAMPLES)  # 2 seeds
    assert len(list((out / "generated" / "textual_inversion").glob("*.png"))) == 6
    # the report: images, numbers for every model, and the plain statement of what the mini-* models show
    html = report.read_text()
    assert html.count("<img") >= 10
    assert "pretrained on a world of coloured shapes" in html and "in its decoder's space" in html
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    fidelity = metrics["fidelity"]
    assert set(fidelity["dry/thickness"]["models"]) == {"mini-base", "mini-lora-dreambooth",
                                                        "mini-textual-inversion", "ddpm-pixel", "local-score"}
    # LoRA+DreamBooth has one concept per class (all nine), the slow baseline one class per cut
    assert set(fidelity["dry-compacted/warp"]["models"]) == {"mini-base", "mini-lora-dreambooth",
                                                             "mini-textual-inversion", "ddpm-pixel", "local-score"}
    assert "local-score" not in fidelity["dry/warp"]["models"]
    # the pixel DDPM makes smaller images than the real slices: scored at its own size, against its own floor
    assert fidelity["dry/thickness"]["models"]["ddpm-pixel"]["size"] == 16
    # drift probes on world prompts carry the world probe's ground truth beside the weight-free scores
    for model in ("mini-lora-dreambooth", "mini-textual-inversion"):
        red_circle = metrics["probes"]["models"][model]["prompts"]["a red circle"]
        assert 0 <= red_circle["world_probe_tuned"] <= 1 and 0 <= red_circle["world_probe_base"] <= 1
    assert json.loads((out / "demo.json").read_text())["status"] == "done"


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    result = demo("--out", str(tmp_path), *SMALLEST)
    assert result.returncode == 2
    assert "folder is not empty and is not a demo output" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_an_interrupted_demo_folder_can_be_rerun(tmp_path, run_cli, monkeypatch):
    """Ctrl-C mid-run exits 130 and leaves the folder marked as the demo's, so the same command runs again there."""
    out = tmp_path / "demo"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import ldm_finetune.demo

    monkeypatch.setattr(ldm_finetune.demo, "run_prep", interrupted)  # the name the demo calls
    for _ in range(2):
        code, stdout, err = run_cli("demo", "--out", out, *SMALLEST)
        assert code == 130 and "[1/8] phantom done" in stdout and "not a demo output" not in err
    assert json.loads((out / "demo.json").read_text()) == {"status": "running", "done": ["phantom"],
                                                           "seconds": {"phantom": pytest.approx(0, abs=60)}}


def test_every_subcommand_is_documented_in_help_and_readme():
    import argparse
    from pathlib import Path

    from ldm_finetune.cli import build_parser

    root = Path(__file__).parent.parent
    readme = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description, f"{name}: no description"
        undocumented = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
        assert not undocumented, f"{name}: arguments without help: {undocumented}"
        assert f"ldm-finetune {name}" in readme, f"README and docs/ never show `ldm-finetune {name}`"
