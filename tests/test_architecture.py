"""The package's layers, checked from the source with `ast` (no import runs): imports point one way only.

    core <- data_prep <- data <- models <- sharing <- adapters <- training <- generation <- evaluation <- CLI & demo

Every import counts, at module top or inside a function: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# lower number = lower layer; a module may import its own layer or any lower one
LAYERS = {"ldm_finetune.core": 0, "data_prep": 1, "ldm_finetune.data": 2, "ldm_finetune.models": 3,
          "ldm_finetune.sharing": 4, "ldm_finetune.adapters": 5, "ldm_finetune.training": 6,
          "ldm_finetune.generation": 7, "ldm_finetune.evaluation": 8, "ldm_finetune": 9}
CLI_MODULES = {"ldm_finetune.cli", "ldm_finetune.train", "ldm_finetune.demo", "ldm_finetune.arguments"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[str, int]:
    """The layer a module belongs to: the longest matching prefix in LAYERS."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def imports_of(path: Path) -> set[str]:
    """Every project module this file imports (`from pkg import mod` counts as pkg.mod when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "ldm_finetune").rglob("*.py")) + sorted((ROOT / "data_prep").rglob("*.py"))
    modules = {module_name(f): f for f in files}
    return {name: {m for m in imports_of(f) if m in modules and m != name} for name, f in modules.items()}


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component with two or more modules is a cycle
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down_the_layers(graph):
    upward = []
    for module, deps in graph.items():
        if module in ("ldm_finetune",):
            continue
        _, rank = layer_of(module)
        for dep in deps:
            if dep == "ldm_finetune":  # the package itself: only __version__
                continue
            dep_layer, dep_rank = layer_of(dep)
            if dep_rank > rank:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_data_prep_uses_only_the_common_base(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("data_prep") for d in deps
           if d.startswith("ldm_finetune") and not d.startswith("ldm_finetune.core")]
    assert not bad, bad


def test_generation_and_evaluation_do_not_import_training(graph):
    """Drawing from and scoring a model read only what a run wrote (model folders, files, headers), so they keep
    working on models trained elsewhere and on runs made by older versions."""
    bad = [f"{m} -> {d}" for m, deps in graph.items()
           if m.startswith(("ldm_finetune.generation", "ldm_finetune.evaluation"))
           for d in deps if d.startswith("ldm_finetune.training")]
    assert not bad, bad


def test_nothing_below_the_cli_imports_argparse_or_the_cli():
    bad = []
    for path in sorted((ROOT / "ldm_finetune").rglob("*.py")) + sorted((ROOT / "data_prep").rglob("*.py")):
        name = module_name(path)
        if name in CLI_MODULES:
            continue
        hits = imports_of(path) & ({"argparse"} | CLI_MODULES)
        if hits:
            bad.append(f"{name} imports {', '.join(sorted(hits))}")
    assert not bad, bad


def test_the_check_can_fail():
    """The layer rule itself: an import from a lower layer up into training is reported."""
    assert layer_of("ldm_finetune.models.lora")[1] < layer_of("ldm_finetune.training.fit")[1]
    assert layer_of("data_prep.volume")[1] < layer_of("ldm_finetune.data.records")[1]
    assert layer_of("ldm_finetune.cli")[1] == LAYERS["ldm_finetune"]
