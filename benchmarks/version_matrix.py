"""Install the lowest and the newest versions that pyproject.toml's ranges allow, each into its own virtual
environment, and run the interop smoke tests in each.

    python benchmarks/version_matrix.py                 # both environments -> benchmarks/results/version_matrix.json
    python benchmarks/version_matrix.py --env lowest    # one of them

"lowest" pins every dependency to its declared floor (`name>=X` -> `name==X`); "newest" lets pip take the newest
release each range allows. torch is the one exception, pinned in both to the build requirements.txt names (the
project's machines carry a CPU wheel of it; any other torch would pull a multi-GB CUDA build): the matrix is about
diffusers / transformers / peft / accelerate / datasets and the file formats, which is where the declared ranges
broke before. The smoke tests are the ones that load our files with diffusers' own loaders (LoRA with its text
encoder part and alpha, kohya export, embeddings in both layouts, the pivotal pair) and a short real LoRA run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work" / "version_matrix"
RESULT = ROOT / "benchmarks" / "results" / "version_matrix.json"
SMOKE_TESTS = ["tests/test_lora.py", "tests/test_sharing.py", "tests/test_interop.py"]
REPORTED = ["torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "datasets", "numpy",
            "huggingface-hub", "tokenizers"]


def requirement_parts(spec: str) -> tuple[str, str | None, str]:
    """'peft>=0.17,<1' -> ('peft', '0.17', 'peft>=0.17,<1'); the floor is what `>=` names."""
    spec = spec.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0)
    floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
    return name, floor.group(1) if floor else None, spec


def pinned_torch() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.strip()
    raise SystemExit("requirements.txt names no torch== pin")


def constraints(env: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    lines = [pinned_torch()]
    for spec in specs:
        name, floor, full = requirement_parts(spec)
        if name == "torch":
            continue
        lines.append(f"{name}=={floor}" if env == "lowest" and floor else full)
    return lines


def run(cmd: list[str], log, **kw) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw).returncode


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    found = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out.stdout or "[]")}
    return {name: found.get(name, "-") for name in REPORTED}


def check_env(env: str) -> dict:
    folder = WORK / env
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "constraints.txt").write_text("\n".join(constraints(env)) + "\n")
    python = folder / "venv" / "bin" / "python"
    result = {"env": env, "constraints": constraints(env)}
    with open(folder / "log.txt", "w") as log:
        start = time.perf_counter()
        steps = [[sys.executable, "-m", "venv", str(folder / "venv")],
                 [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                 [str(python), "-m", "pip", "install", "--quiet", "-c", str(folder / "constraints.txt"),
                  pinned_torch(), "-e", f"{ROOT}[test]"]]
        for cmd in steps:
            if run(cmd, log) != 0:
                result.update(status="install failed", log_tail=_tail(folder / "log.txt"))
                return result
        result["install_s"] = round(time.perf_counter() - start, 1)
        result["versions"] = installed_versions(python)
        start = time.perf_counter()
        code = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SMOKE_TESTS], log, cwd=ROOT)
        result["tests_s"] = round(time.perf_counter() - start, 1)
    tail = _tail(folder / "log.txt")
    result["status"] = "passed" if code == 0 else "failed"
    result["summary"] = next((line for line in reversed(tail.splitlines()) if " in " in line), "")
    if code != 0:
        result["log_tail"] = tail
    return result


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=["lowest", "newest"], action="append")
    args = parser.parse_args()
    results = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    for env in args.env or ["lowest", "newest"]:
        results[env] = check_env(env) | {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
        print(json.dumps(results[env], indent=1))
        RESULT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
