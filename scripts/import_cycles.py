"""Import cycles among the project's modules: every import counts, at module level, inside
functions and under TYPE_CHECKING. Prints the cycles (strongly connected components of the
import graph) and exits 1 if there is one. Run from the repo root:

    python scripts/import_cycles.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOTS = ("allocator", "consul", "cni", "admin")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for top in ROOTS:
        for f in (root / top).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = f
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets += [a.name.removeprefix("ipam_da_consul.") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                where = ".".join(base + ([node.module] if node.module else []))
            else:
                where = (node.module or "").removeprefix("ipam_da_consul.")
            # `from . import logs` names the module cni.logs; `from .x import f`, the module x.
            targets += [f"{where}.{a.name}" if f"{where}.{a.name}" in known else where
                        for a in node.names]
    edges = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    found = cycles(graph)
    print(f"{len(known)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycles")
    for component in found:
        print("cycle:", ", ".join(f"{m} -> {sorted(graph[m] & set(component))}" for m in component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
