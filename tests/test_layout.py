"""The package's shape: no import circle, dependencies one way (config -> model -> engines / io ->
stages -> jobs), thin job entry points. Read from the source with ``ast``, so an import inside a
function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("blsp_ray", "serve", "jobs")

# Lower layers never import higher ones.
LAYERS = [
    ("blsp_ray.config", "blsp_ray.drops", "blsp_ray.text"),
    ("blsp_ray.model",),
    ("blsp_ray.io", "blsp_ray.engines", "blsp_ray.runtime", "blsp_ray.speech_lm", "blsp_ray.metrics",
     "blsp_ray.heldout", "blsp_ray.train", "blsp_ray.cli", "blsp_ray.console", "blsp_ray.demo"),
    ("blsp_ray.stages",),
    ("jobs", "serve"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports anywhere in its body (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name}: not in any layer of tests/test_layout.py (add it where it belongs)")


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_dependencies_run_one_way():
    wrong = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
             for m, deps in sorted(_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_jobs_are_thin_entry_points():
    """Every ``jobs/X.py`` is a few lines calling ``blsp_ray.stages.X.main``."""
    for path in sorted((REPO / "jobs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        assert len(text.splitlines()) <= 15, f"{path.name}: {len(text.splitlines())} lines"
        assert f"from blsp_ray.stages.{path.stem} import main" in text, f"{path.name} does not call blsp_ray.stages.{path.stem}.main"
        assert (REPO / "blsp_ray" / "stages" / path.name).exists()
