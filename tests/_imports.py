"""The import graph of the ``lowrank`` package, read from the source with :mod:`ast` (nothing is imported).

Every ``import`` statement counts: module level, inside functions and under ``TYPE_CHECKING``. An import
of a name that a package re-exports (``from lowrank.nn import LowRankLinear``) is followed to the module
that defines it, so the graph holds the dependencies a reader would follow, not the package files.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "lowrank"


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted((src / ROOT_PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name, node.lineno


class ImportGraph:
    """Edges ``importer -> imported`` between modules of the package, each with the line of the import."""

    def __init__(self, src: Path = SRC) -> None:
        self.files = module_files(src)
        self.trees = {m: ast.parse(p.read_text(), str(p)) for m, p in self.files.items()}
        self._reexports = {m: self._package_reexports(m) for m in self.files}
        self.edges: dict[str, dict[str, int]] = {m: {} for m in self.files}
        for module, tree in self.trees.items():
            is_package = self.files[module].name == "__init__.py"
            for base, name, line in _imports(tree, module, is_package):
                target = self._resolve(base, name)
                if target is not None and target != module:
                    self.edges[module].setdefault(target, line)

    def _package_reexports(self, module: str) -> dict[str, str]:
        """For a package: name -> defining submodule, from its ``from <submodule> import name`` lines."""
        if self.files[module].name != "__init__.py":
            return {}
        out = {}
        for node in self.trees[module].body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in self.files:
                for alias in node.names:
                    out[alias.asname or alias.name] = node.module
        return out

    def _resolve(self, base: str, name: str | None) -> str | None:
        if base != ROOT_PACKAGE and not base.startswith(ROOT_PACKAGE + "."):
            return None
        if name is not None:
            if f"{base}.{name}" in self.files:
                return f"{base}.{name}"
            seen = set()
            while name in self._reexports.get(base, {}) and base not in seen:
                seen.add(base)
                base = self._reexports[base][name]
        while base not in self.files and "." in base:
            base = base.rsplit(".", 1)[0]
        return base if base in self.files else None

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        out: list[list[str]] = []
        counter = 0

        def visit(v: str) -> None:
            nonlocal counter
            index[v] = low[v] = counter
            counter += 1
            stack.append(v)
            on_stack.add(v)
            for w in self.edges[v]:
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
                    out.append(sorted(component))

        for v in sorted(self.edges):
            if v not in index:
                visit(v)
        return sorted(out)
