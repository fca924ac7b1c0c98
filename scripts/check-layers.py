#!/usr/bin/env python3
"""Check that broker/ imports only downwards and has no import cycle.

    scripts/check-layers.py [--root DIR] [--known FILE]

Every import counts: module level, inside functions, relative or absolute.
The layers, lowest first (docs/architecture.md explains them):

    0  broker.wire                      the protocol: imports nothing of ours
    1  broker.bus                       the bus logic, over wire
    2  broker.access  broker.payload    policy and payloads, over bus and wire
       broker.activation                service files and the catalogue of activatable names
    3  broker.io                        the trio shell, over all of the above
    4  broker.launch                    the launcher and the broker's main
    5  broker.client                    helpers for applications
    6  broker.cli                       the command line

A module may import its own package and any lower layer. Importing a higher
layer is an "upward" violation; importing another package of the same layer
(access <-> payload) is one too, so that siblings stay independent. Any
import cycle between modules is a violation whatever the layers.

Violations still to be fixed are listed in the known file (default
scripts/layers-known.txt), one per line with the reason after a '#':

    upward broker.launch.broker_process -> broker.cli   # why it is still there
    cycle broker.bus.driver broker.bus.router   # modules of the cycle, sorted

The check fails on a violation that is not listed, and on a listed one that
is gone, so the list can only shrink. Standard library only.
"""

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "broker"
LAYERS = [
    ["broker.wire"],
    ["broker.bus"],
    ["broker.access", "broker.activation", "broker.payload"],
    ["broker.io"],
    ["broker.launch"],
    ["broker.client"],
    ["broker.cli"],
]
RANK = {pkg: rank for rank, pkgs in enumerate(LAYERS) for pkg in pkgs}


def longest_prefix(name: str, known, shortest: int = 1) -> str | None:
    """The longest dotted prefix of ``name``, of at least ``shortest`` parts, that is in ``known``."""
    parts = name.split(".")
    for n in range(len(parts), shortest - 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in known:
            return prefix
    return None


def layer_of(module: str) -> str | None:
    """The layer package a module belongs to (None: the empty top-level package)."""
    layer = longest_prefix(module, RANK, shortest=2)
    if layer is not None:
        return layer
    if module == PACKAGE:
        return None
    raise SystemExit(f"check-layers: {module} is in no layer: add its package to LAYERS")


def find_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py under root/broker."""
    mods = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _from_base(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` statement imports from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"

    def resolve(name: str) -> str | None:
        """The longest module of ours that ``name`` names or lies in."""
        return longest_prefix(name, modules)

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, is_pkg, node)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            subs = (f"{base}.{alias.name}" for alias in node.names)
            targets = [sub if sub in modules else resolve(base) for sub in subs]
        else:
            continue
        out.extend((t, node.lineno) for t in targets if t is not None)
    return out


def build_graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    modules = find_modules(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod, path in modules.items():
        for target, line in imports_of(mod, path, modules):
            if target != mod:
                graph[mod].setdefault(target, line)
    return modules, graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return sorted(found)


def violations(root: Path) -> dict[str, str]:
    """Violation key -> where it is (for the message)."""
    modules, graph = build_graph(root)
    out = {}
    for mod in sorted(graph):
        src = layer_of(mod)
        for target, line in sorted(graph[mod].items()):
            dst = layer_of(target)
            if dst is None or dst == src:
                continue
            if src is None or RANK[dst] >= RANK[src]:
                how = "sideways" if src is not None and RANK[dst] == RANK[src] else "upward"
                where = f"{modules[mod].relative_to(root)}:{line}: {how} import ({src} may not import {dst})"
                out[f"upward {mod} -> {target}"] = where
    for comp in cycles(graph):
        edges = [
            f"{modules[a].relative_to(root)}:{graph[a][b]} imports {b}"
            for a in comp
            for b in sorted(graph[a])
            if b in comp
        ]
        out["cycle " + " ".join(comp)] = "import cycle: " + "; ".join(edges)
    return out


def read_known(path: Path) -> tuple[dict[str, str], list[str]]:
    known: dict[str, str] = {}
    problems: list[str] = []
    if not path.exists():
        return known, problems
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, reason = text.partition("#")
        key = " ".join(key.split())
        if not sep or not reason.strip():
            problems.append(f"{path}:{n}: a known violation needs its reason after '#'")
        if key in known:
            problems.append(f"{path}:{n}: {key!r} is listed twice")
        known[key] = reason.strip()
    return known, problems


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=here.parent, help="the tree holding broker/")
    ap.add_argument("--known", type=Path, default=None, help="known violations (default scripts/layers-known.txt)")
    args = ap.parse_args(argv)
    known_path = args.known or args.root / "scripts" / "layers-known.txt"
    found = violations(args.root)
    known, problems = read_known(known_path)
    if known_path.is_relative_to(args.root):
        known_path = known_path.relative_to(args.root)  # for the messages
    for key in sorted(found.keys() - known.keys()):
        problems.append(f"{found[key]}\n    new violation: fix it (or, with a reason, list '{key}' in {known_path})")
    for key in sorted(known.keys() - found.keys()):
        problems.append(f"{known_path}: '{key}' is fixed: remove it from the list")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"check-layers: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check-layers: ok ({len(found)} known violation(s) left in {known_path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
