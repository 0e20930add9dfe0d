"""The package's import graph: imports run one way and never in a circle (module-level and lazy alike).

Layers, top to bottom (README "Development"): cli -> api -> workflows -> build -> engine -> recipe
-> models / data / viz -> configurable / registry / errors / zoo / version / ops. A module may import its
own layer or lower ones, never a higher one. The recipe sits above models and data because
validating a recipe looks its components up in the registries that models and data fill.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segcli"

LAYERS = [  # (module-name prefix, layer); the longest matching prefix wins
    ("segcli.cli", 0), ("segcli.__main__", 0),
    ("segcli.api", 1), ("segcli", 1),  # the package itself re-exports the API lazily
    ("segcli.workflows", 2),
    ("segcli.build", 3), ("segcli.onnx_model", 3),
    ("segcli.engine", 4),
    ("segcli.recipe", 5),
    ("segcli.models", 6), ("segcli.data", 6), ("segcli.viz", 6), ("segcli.convert", 6),
    ("segcli.configurable", 7), ("segcli.registry", 7), ("segcli.errors", 7), ("segcli.zoo", 7), ("segcli.download", 7),
    ("segcli.version", 7), ("segcli.allocator", 7), ("segcli.outputs", 7),
    ("segcli.ops", 7),  # score maps, token counts, BatchNorm folding: shared by models and the engine
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every segcli module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from X import y` imports X.y when that is a module, else X
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def layer(name: str) -> int:
    return max(((len(prefix), rank) for prefix, rank in LAYERS if name == prefix or name.startswith(prefix + ".")),
               default=(0, -1))[1]


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer():
    assert [name for name in GRAPH if layer(name) < 0] == []


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_run_one_way(name):
    upward = sorted(target for target in GRAPH[name] if layer(target) < layer(name))
    assert upward == [], f"{name} (layer {layer(name)}) imports a higher layer: {upward}"


def test_the_engine_imports_no_model_module():
    """The engine knows no model (STYLE: detectron2's trainer): it runs whatever ``nn.Module`` it is
    given through its scores (``segcli.ops``), never a class or helper of ``segcli.models``."""
    found = sorted(f"{name} -> {target}" for name in GRAPH if layer(name) == layer("segcli.engine")
                   for target in GRAPH[name] if target == "segcli.models" or target.startswith("segcli.models."))
    assert found == []


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
