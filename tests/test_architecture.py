"""The shape of the code, read from its source: layers, no import cycles, backends named only by themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from phi3cli.backends import registry

PACKAGE = Path(__file__).resolve().parent.parent / "phi3cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The phi3cli modules a module imports anywhere in its body (lazy imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from phi3cli.x import name` imports phi3cli.x
                target = target.rpartition(".")[0]
            # A module's own parent packages are already being imported when it runs: not an edge.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def test_no_import_cycles_lazy_imports_included():
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(path, name, known) for name, path in mods.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_core_knows_no_typer_or_rich():
    for name, path in modules().items():
        if name.startswith("phi3cli.cli"):
            continue
        heavy = {i.split(".")[0] for i in imports_of_anything(path)} & {"typer", "rich", "click"}
        assert not heavy, f"{name} imports {heavy}"


def imports_of_anything(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def string_constants(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


@pytest.mark.parametrize("backend", sorted(registry()))
def test_a_backend_is_spelled_only_in_its_own_package(backend):
    """Outside phi3cli/backends/, code never names a backend (help texts and messages built from specs aside)."""
    spelled = [
        name
        for name, path in modules().items()
        if not name.startswith("phi3cli.backends") and backend in string_constants(path)
    ]
    assert not spelled, f"{backend!r} is spelled in {spelled}"


def test_no_module_grows_past_its_job():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"split these by job: {long}"
