"""The house rules, read from the source: no import cycles, and imports flow one way.

Imports are read with `ast`, so those under `if TYPE_CHECKING:` and inside
functions count too: a type-only cycle is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("marketplace_server", "aiida_stub", "eddie_sink", "eddie_common", "eddie_client", "eddie_cli")

# (importing modules under this prefix, may not import modules under this prefix)
LAYER_RULES = [
    ("marketplace_server.services", "marketplace_server.rpc"),
    ("marketplace_server.aiida", "marketplace_server.rpc"),
    ("marketplace_server.db", "marketplace_server.rpc"),
    ("marketplace_server.aiida", "marketplace_server.services"),
    ("marketplace_server.db", "marketplace_server.services"),
    ("marketplace_server.db", "marketplace_server.aiida"),
    ("marketplace_server.resources", "marketplace_server.services"),
    ("marketplace_server.resources", "marketplace_server.rpc"),
    ("marketplace_server.resources", "marketplace_server.aiida"),
    ("marketplace_server.deliveries", "marketplace_server.services"),
    ("marketplace_server.deliveries", "marketplace_server.aiida"),
    ("marketplace_server.deliveries", "marketplace_server.rpc"),
    ("eddie_common", "marketplace_server"),
    ("eddie_common", "aiida_stub"),
    ("eddie_common", "eddie_sink"),
    ("eddie_common", "eddie_client"),
    ("eddie_common", "eddie_cli"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module, or a module's member) refers to, if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(module: str, tree: ast.AST) -> Iterator[str]:
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {_resolve(name) for name in _imported_names(module, tree)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_program_packages_are_found() -> None:
    assert "marketplace_server.services.search" in MODULES
    assert "aiida_stub.instance" in MODULES
    assert GRAPH["marketplace_server.services.search"], "imports are read"


def test_no_module_imports_another_in_a_cycle_not_even_for_type_checking() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_type_only_cycle() -> None:
    source = "if TYPE_CHECKING:\n    from marketplace_server.clock import utcnow\n"
    names = {_resolve(n) for n in _imported_names("marketplace_server.errors", ast.parse(source))}
    assert "marketplace_server.clock" in names
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize(("importer", "forbidden"), LAYER_RULES)
def test_imports_flow_one_way(importer: str, forbidden: str) -> None:
    offending = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _within(module, importer)
        for target in targets
        if _within(target, forbidden)
    )
    assert offending == []


def test_nothing_local_is_tracked() -> None:
    """No virtualenv, cache or symlink leaving the checkout is committed (44da5a6 once committed
    `.venv` as a symlink to one developer's checkout, and every other checkout's venv broke)."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    local = (".venv", "var", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")
    wrong = []
    for line in listed.stdout.splitlines():
        mode, _, rest = line.partition(" ")
        path = rest.split("\t", 1)[1]
        if path.split("/")[0] in local or "/__pycache__/" in f"/{path}":
            wrong.append(f"{path}: local state")
        elif mode == "120000" and not (ROOT / path).resolve().is_relative_to(ROOT):
            wrong.append(f"{path}: a symlink out of the checkout")
    assert not wrong, wrong
