"""peerd's import graph has no cycle and follows its layers.

Every ``import`` in ``peerd/`` counts, the ones inside functions and under ``TYPE_CHECKING``
too: a lazy import still ties the two modules together. An edge goes from a module to the module
it names (``from peerd.http import hls`` names ``peerd.http`` and ``peerd.http.hls``); the parent
package a submodule import runs first is not counted, so a package may re-export its submodules.

The layers, lowest first; a module may import its own layer and the ones below, never above:

1. base      -- ``peerd`` (the version), ``peerd.errors`` (the one error root), ``peerd.paths``
                (state directory and Unix-socket helpers; standard library only)
2. core      -- ``peerd.core``: pure logic; imports nothing of peerd but core and errors, and no
                I/O library (asyncio, aiohttp, aiosqlite, av, boto3/botocore, socket)
3. leaves    -- settings and process-wide handles every part may use: ``config`` (with
                ``media.options``, the packaging settings it validates), ``identity``,
                ``metrics``, ``logs``, ``systemd``, ``lock``
4. catalog   -- ``peerd.catalog``: SQLite and its migrations
5. store     -- ``peerd.store``: blob files
6. runtime   -- ``peerd.runtime``: the handles above, opened together, and the node's facts
7. delivery  -- ``peerd.delivery``: the resolver and the ``Source`` interface
8. services  -- ``http``, ``api``, ``media``, ``p2p``, ``discovery``, ``replication``,
                ``webrtc``, ``live``, ``ui``, ``coordinator``, ``control``: one part each, built and
                handed their parts by the daemon
9. daemon    -- ``peerd.daemon``: the one place that builds and supervises every service
10. cli      -- the command line: ``peerd.__main__``, ``ctl``, ``cli``, ``install``, ``demo``
                and each part's ``cli`` module (``media.cli``, ``replication.cli``, ``api.cli``)
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peerd"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("peerd", "peerd.errors", "peerd.paths")),
    ("core", ("peerd.core",)),
    (
        "leaves",
        (
            "peerd.config",
            "peerd.media.options",
            "peerd.identity",
            "peerd.metrics",
            "peerd.logs",
            "peerd.systemd",
            "peerd.lock",
        ),
    ),
    ("catalog", ("peerd.catalog",)),
    ("store", ("peerd.store",)),
    ("runtime", ("peerd.runtime",)),
    ("delivery", ("peerd.delivery",)),
    (
        "services",
        (
            "peerd.http",
            "peerd.api",
            "peerd.media",
            "peerd.p2p",
            "peerd.discovery",
            "peerd.replication",
            "peerd.webrtc",
            "peerd.live",
            "peerd.ui",
            "peerd.coordinator",
            "peerd.control",
        ),
    ),
    ("daemon", ("peerd.daemon",)),
    (
        "cli",
        (
            "peerd.__main__",
            "peerd.ctl",
            "peerd.cli",
            "peerd.install",
            "peerd.demo",
            "peerd.media.cli",
            "peerd.replication.cli",
            "peerd.api.cli",
        ),
    ),
]
IO_LIBRARIES = ("asyncio", "aiohttp", "aiosqlite", "av", "boto3", "botocore", "socket")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(path: Path, package: str) -> Iterable[str]:
    """Every dotted name ``path`` imports, at any depth (functions, ``TYPE_CHECKING``)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> peerd modules it imports, module -> third-party top-level names it imports)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    outside: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in imported_names(path, package):
            if target.split(".")[0] != "peerd":
                outside[name].add(target.split(".")[0])
                continue
            while target and target not in mods:  # ``from m import function`` names m
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph, outside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def layer_of(module: str) -> int:
    """The layer of ``module``: the longest matching prefix wins (``peerd.media.cli`` is cli)."""
    best, best_len = -1, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__name__}")
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, as 'module (layer) -> module (layer)'."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) -> "
                    f"{target} ({LAYERS[layer_of(target)][0]})"
                )
    return bad


def test_no_import_cycle() -> None:
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_no_layer_imports_a_higher_one() -> None:
    graph, _ = import_graph()
    assert upward_imports(graph) == []


def test_core_is_pure() -> None:
    graph, outside = import_graph()
    core = [m for m in graph if layer_of(m) == 1]
    assert core
    for module in core:
        assert graph[module] <= {"peerd.errors", *core}, module
        assert not outside[module] & set(IO_LIBRARIES), module


def test_the_checks_see_function_level_cycles_and_upward_imports(tmp_path: Path) -> None:
    """The checks themselves: a cycle closed by an import inside a function, and a core module
    reaching up into the store, are both found."""
    pkg = tmp_path / "peerd"
    (pkg / "core").mkdir(parents=True)
    (pkg / "store").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "store" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from peerd.core import ids\n")
    (pkg / "core" / "ids.py").write_text(
        "import asyncio\n\ndef f():\n    from peerd.config import x\n"
    )
    (pkg / "core" / "playlist.py").write_text("from ..store import blobs\n")
    (pkg / "store" / "blobs.py").write_text("")
    graph, outside = import_graph(pkg)
    assert cycles(graph) == [["peerd.config", "peerd.core.ids"]]
    assert upward_imports(graph) == [
        "peerd.core.ids (core) -> peerd.config (leaves)",
        "peerd.core.playlist (core) -> peerd.store (store)",
        "peerd.core.playlist (core) -> peerd.store.blobs (store)",
    ]
    assert outside["peerd.core.ids"] == {"asyncio"}


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("peerd.media.cli", "cli"),
        ("peerd.media.ingest", "services"),
        ("peerd.media.options", "leaves"),
        ("peerd.core.ids", "core"),
        ("peerd.__main__", "cli"),
    ],
)
def test_layer_of(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)][0] == layer
