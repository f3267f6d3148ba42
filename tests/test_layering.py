"""The architecture's layering (docs/ARCHITECTURE.md), checked over every source file: packages
import only from lower layers, no import cycles between packages or between modules (lazy imports
inside functions count; `if TYPE_CHECKING:` imports do not), and no source file over the size budget."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "turnwise"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("types",),
    ("backends",),
    ("algo", "track"),
    ("config",),
    ("env", "policy"),
    ("runtime", "adapter"),
    ("rollout",),
    ("train", "eval"),
    ("service", "client"),
    ("demo",),
    ("cli",),
)
"""Lowest first; a package may import its own modules and those of lower layers only."""
MAX_LINES = 500


def _layer_of(unit: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """turnwise modules imported anywhere in `tree`, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("turnwise"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("turnwise"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level package (or top-level module) under turnwise."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "turnwise"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in `graph` (as a path), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := dfs(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


def test_every_package_has_a_layer():
    units = {_unit(m) for m in _graph()} - {"turnwise"}
    assert units <= {u for names in LAYERS for u in names}, f"packages without a layer: {units}"


def test_packages_import_only_lower_layers():
    bad = []
    for module, targets in _graph().items():
        unit = _unit(module)
        if unit == "turnwise":
            continue
        for t in targets:
            other = _unit(t)
            if other not in ("turnwise", unit) and _layer_of(other) >= _layer_of(unit):
                bad.append(f"{module} imports {t} ({unit} is not above {other})")
    assert not bad, "\n".join(sorted(bad))


def test_no_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    assert _cycle(packages) is None, f"package cycle: {' -> '.join(_cycle(packages) or [])}"


def test_no_cycle_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its modules is not a cycle of logic
    graph = {m: {t for t in ts if not (m.startswith(t + ".") or t.startswith(m + "."))} for m, ts in graph.items()}
    found = _cycle(graph)
    assert found is None, f"module cycle: {' -> '.join(found or [])}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_source_files_stay_small(path: Path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (budget {MAX_LINES}): split it"


def test_the_checks_catch_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
