"""The package's shape: no import cycles, and each family imports only below it.

Read from the source with ``ast`` (nothing is imported), counting every
import: at module level, inside functions, and under ``if TYPE_CHECKING:``
(a type-only cycle still ties two modules together for a reader and for a
refactor, and turns into a real one the day the import moves up).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relay"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".pyx") and "__pycache__" not in path.parts:
            found[_module_name(path)] = path
    return found


MODULES = _sources()


def _resolve(name: str) -> str | None:
    """The relay module *name* refers to (a name inside a module: that module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """relay modules that *module* imports, anywhere in its source."""
    if path.suffix == ".pyx":
        # Cython source: only its Python-level import statements are read
        # (cimports of .pxd files name declarations, not modules).
        lines = [
            line for line in path.read_text().splitlines()
            if line.lstrip().startswith(("import ", "from ")) and " cimport " not in line
        ]
        tree = ast.parse("\n".join(line.strip() for line in lines))
    else:
        tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from x import y" imports the module x.y, or a name of x (then
            # x itself counts). The parent packages every import runs first
            # are no dependency of the importer's own.
            names = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in MODULES]
            if len(names) < len(node.names):
                names.append(prefix)
        else:
            continue
        for name in names:
            resolved = _resolve(name)
            if resolved is not None and resolved != module:
                targets.add(resolved)
    return targets


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _in(module: str, family: str) -> bool:
    return module == family or module.startswith(family + ".")


def test_the_graph_is_read() -> None:
    """The checks below see real edges (a parser that found none passes everything)."""
    assert "relay.runtime" in GRAPH["relay.app"]
    assert "relay.http.protocol" in GRAPH["relay.upstream._exchange_py"]
    # Relative imports, of modules and of names.
    assert {"relay._fast", "relay.debug"} <= GRAPH["relay.app"]
    assert "relay.features.cache" in GRAPH["relay.pipeline"]
    # A TYPE_CHECKING-only import counts, and so does one inside a function.
    assert "relay.http.request" in GRAPH["relay.keys.admission"]
    assert "relay.keys.manage" in GRAPH["relay.runtime"]
    # The Cython sources' Python imports are read too.
    assert "relay._fast._meters_py" in GRAPH["relay._fast._meters_c"]
    # A package's parents are not counted as its importers' dependencies.
    assert "relay" not in GRAPH["relay.runtime"]


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


FORBIDDEN = {
    # The HTTP layer is the bottom of the request path: it knows requests
    # and connections, nothing of what relay does with them.
    "relay.http": (
        "relay.pipeline", "relay.runtime", "relay.app", "relay.features", "relay.accounting",
        "relay.ops", "relay.keys", "relay.upstream",
    ),
    # Feature families are building blocks: the pipeline composes them, and
    # the runtime holds them; they never reach back up.
    "relay.upstream": ("relay.pipeline", "relay.runtime", "relay.app"),
    "relay.features": ("relay.pipeline", "relay.runtime", "relay.app"),
    "relay.accounting": ("relay.pipeline", "relay.runtime", "relay.app"),
    "relay.ops": ("relay.pipeline", "relay.runtime", "relay.app"),
    "relay.keys": ("relay.pipeline", "relay.runtime", "relay.app"),
}


@pytest.mark.parametrize("family", sorted(FORBIDDEN))
def test_layering(family: str) -> None:
    crossings = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _in(module, family)
        for target in targets
        if any(_in(target, banned) for banned in FORBIDDEN[family])
    )
    assert crossings == []


def test_fast_imports_only_itself() -> None:
    """The extensions and their twins depend on nothing else of relay."""
    crossings = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _in(module, "relay._fast")
        for target in targets
        if not _in(target, "relay._fast")
    )
    assert crossings == []
