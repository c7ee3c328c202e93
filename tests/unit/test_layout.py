"""The package's layers, read from the source: imports only go down, no cycles, no stage imports a stage.

cli                                   commands (the `detloop` console script)
base evaluate trigger mix finetune retrain gate promote search   the pipeline stages: thin run(cfg)
production | fiftyone                 serving, monitoring, A/B set | inspection and App review
training                              train a model in one run and register it
evaluation                            one detection evaluator, the gate rules and report
team                                  the local team stack (PostgreSQL, S3, MLflow with auth, SLURM) and roles
tracking                              MLflow runs, the Model Registry, promotion and its audit trail
model                                 Ultralytics loading and the MLflow pyfunc contract
data                                  anchor, inbox, review, pool, mix rules, manifests, formats
core                                  config, errors, environment, stage entry point
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "detloop"
STAGES = ("base", "evaluate", "trigger", "mix", "finetune", "retrain", "gate", "promote", "search")
LAYERS = {
    "core": 0,
    "data": 1,
    "model": 2,
    "pyfunc": 2.5,  # the registered model's entry: the stable import path of the contract in model/
    "serving_model": 2.6,  # the model-from-code file MLflow runs when it loads a registered version
    "tracking": 3,
    "team": 3.5,  # the local team stack and the roles: above tracking, below everything that uses MLflow runs
    "evaluation": 4,
    "training": 5,
    "production": 6,
    "fiftyone": 6,
    **dict.fromkeys(STAGES, 7),
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a detloop module in ``path``, function bodies included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("detloop"):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("detloop")]
    return out


def resolved(module: str, names: list[str], known: set[str]) -> list[str]:
    """The detloop modules an import statement reaches (``from detloop.data import pool`` -> detloop.data.pool)."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
    return subs or [module]


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


SOURCES = sorted(PACKAGE.rglob("*.py"))
KNOWN = {module_name(p) for p in SOURCES}
EDGES = {
    module_name(p): [(line, target, names) for line, m, names in imports(p) for target in resolved(m, names, KNOWN)]
    for p in SOURCES
}


def test_every_module_sits_in_a_named_layer():
    unplaced = sorted(m for m in KNOWN if m != "detloop" and layer(m) not in LAYERS)
    assert not unplaced, f"modules outside the layers {sorted(LAYERS)}: {unplaced}"


def test_imports_only_go_down():
    upward = []
    for source, edges in EDGES.items():
        if source == "detloop":
            continue
        for line, target, _ in edges:
            a, b = layer(source), layer(target)
            if b is None or a == b:
                continue
            if LAYERS[b] >= LAYERS[a]:
                upward.append(f"{source}:{line} imports {target} ({a} -> {b})")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_no_stage_imports_another_stage():
    found = [
        f"{source}:{line} imports {target}"
        for source, edges in EDGES.items()
        for line, target, _ in edges
        if layer(target) in STAGES and source != target
    ]
    assert not found, "\n".join(found)


def test_no_import_cycles():
    graph = {s: {t for _, t, _ in edges if t in KNOWN and t != s} for s, edges in EDGES.items()}
    graph = {s: {t for t in ts if t != "detloop"} for s, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{source}:{line} takes {', '.join(n for n in names if n.startswith('_'))} from {target}"
        for source, edges in EDGES.items()
        for line, target, names in edges
        if any(n.startswith("_") for n in names)
    ]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_module_is_a_thin_entry_point(stage):
    tree = ast.parse((PACKAGE / f"{stage}.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "run" in functions
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "main" for t in n.targets) for n in tree.body)


def test_upward_import_is_caught(tmp_path):
    """The check itself fails on an upward import (data importing a stage)."""
    fake = tmp_path / "detloop" / "data" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from detloop.gate import run\n")
    edges = imports(fake)
    assert edges == [(1, "detloop.gate", ["run"])]
    assert LAYERS[layer(edges[0][1])] > LAYERS["data"]
