"""The package's shape, checked: no import cycles between bench's modules (imports inside
functions count too), no module over 450 lines, and the layering rules module docstrings state
that a reader most relies on (ray only where runs are launched; no torch in the analysis and
reporting side)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for f in BENCH.rglob("*.py"):
        parts = f.relative_to(BENCH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (a `from X import y` where
    X.y is a module names X.y, not the package X)."""
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            out.update(subs if len(subs) == len(node.names) else [node.module, *subs])
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, except what sits under ``if TYPE_CHECKING:`` (never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _owner(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    return {m: {o for i in _imports(f) if (o := _owner(i)) and o != m and o.startswith("bench")}
            for m, f in MODULES.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_bench():
    assert cycles(graph()) == []


def test_no_module_over_450_lines():
    long = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# module -> packages it must not import, anywhere in the file (from the module docstrings)
FORBIDDEN = {
    "bench.analysis": {"torch", "ray"}, "bench.fit": {"torch", "ray"}, "bench.crossing": {"torch", "ray"},
    "bench.spread": {"torch", "ray"}, "bench.report": {"torch", "ray"}, "bench.planner": {"torch", "ray"},
    "bench.config": {"torch", "ray"}, "bench.plan": {"torch", "ray"}, "bench.store": {"torch", "ray"},
    "bench.records": {"torch", "ray"}, "bench.events": {"torch", "ray"}, "bench.safeio": {"torch", "ray"},
    "bench.summary": {"torch", "ray"}, "bench.errors": {"torch", "ray"}, "bench.telemetry": {"torch", "ray"},
    "bench.worker": {"ray"}, "bench.step": {"ray"}, "bench.feed": {"ray"}, "bench.comm": {"torch", "ray"},
    "bench.divergence": {"torch", "ray"},
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_layering(module):
    names = {i.split(".")[0] for i in _imports(MODULES[module])}
    assert names.isdisjoint(FORBIDDEN[module]), names & FORBIDDEN[module]
