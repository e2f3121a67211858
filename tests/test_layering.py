"""The layering contract of ``pyproject.toml`` ``[tool.lowrank] layers``, checked over the import graph.

Run ``python tests/test_layering.py --write-readme`` after changing the contract to re-render the README's
layering block.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from _imports import ImportGraph

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- layers: rendered from pyproject.toml by tests/test_layering.py -->"
END = "<!-- layers: end -->"


def contract(pyproject: Path = ROOT / "pyproject.toml") -> list[list[str]]:
    """The layers, top first, each a list of independent packages."""
    lines = tomllib.loads(pyproject.read_text())["tool"]["lowrank"]["layers"]
    return [[name.strip() for name in line.split("|")] for line in lines]


def owner(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, package) of the most specific contract package that contains ``module``."""
    best = None
    for index, line in enumerate(layers):
        for package in line:
            if (module == package or module.startswith(package + ".")) and (
                best is None or len(package) > len(best[1])
            ):
                best = (index, package)
    return best


def violations(graph: ImportGraph, layers: list[list[str]]) -> list[str]:
    """One line per import that breaks the contract, and per module the contract does not place."""
    out = []
    for module in sorted(graph.edges):
        here = owner(module, layers)
        if here is None:
            out.append(f"{module}: in no layer of the contract")
            continue
        for target, line in sorted(graph.edges[module].items()):
            there = owner(target, layers)
            if there is None:
                continue  # reported as its own module
            upward = there[0] < here[0]
            sideways = there[0] == here[0] and there[1] != here[1]
            if upward or sideways:
                kind = "a layer above" if upward else "an independent package"
                where = f"{graph.files[module].name}:{line}"
                out.append(f"{where} {module} imports {target} ({kind}: {there[1]})")
    return out


def render(layers: list[list[str]]) -> str:
    """The README block: one line per layer, top first."""
    rows = ["```text"]
    for index, line in enumerate(layers):
        rows.append(("    " if index else "") + " | ".join(line))
    rows.append("```")
    return "\n".join(rows)


def _readme_block(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


# ---------------------------------------------------------------- the contract holds


def test_no_module_imports_from_a_layer_above_or_an_independent_package():
    problems = violations(ImportGraph(), contract())
    assert not problems, "layering contract broken:\n" + "\n".join(problems)


def test_no_import_cycles_not_even_inside_functions():
    cycles = ImportGraph().cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_readme_layering_block_is_rendered_from_the_contract():
    assert _readme_block(README.read_text()) == render(contract()), (
        "README layering block is stale: run `python tests/test_layering.py --write-readme`"
    )


def test_every_package_of_the_contract_exists():
    files = ImportGraph().files
    for line in contract():
        for package in line:
            assert package in files, f"the contract names {package}, which is not a module"


# ---------------------------------------------------------------- the checker catches what it should


def _tree(tmp_path: Path, files: dict[str, str]) -> ImportGraph:
    for name, text in files.items():
        path = tmp_path / "lowrank" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ImportGraph(tmp_path)


def test_checker_finds_an_upward_import_inside_a_function(tmp_path):
    graph = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "def f():\n    from lowrank.high.b import g\n",
            "high/__init__.py": "",
            "high/b.py": "from lowrank.low.a import f\ng = 1\n",
        },
    )
    layers = [["lowrank"], ["lowrank.high"], ["lowrank.low"]]
    problems = violations(graph, layers)
    assert len(problems) == 1 and "lowrank.low.a imports lowrank.high.b (a layer above" in problems[0]
    assert graph.cycles() == [["lowrank.high.b", "lowrank.low.a"]]


def test_checker_follows_reexports_and_type_checking_imports(tmp_path):
    graph = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "x/__init__.py": "from lowrank.x.impl import Thing\n",
            "x/impl.py": "Thing = 1\n",
            "y/__init__.py": "",
            "y/user.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lowrank.x import Thing\n"
            ),
        },
    )
    assert graph.edges["lowrank.y.user"] == {"lowrank.x.impl": 3}
    layers = [["lowrank"], ["lowrank.x", "lowrank.y"]]
    assert "an independent package" in violations(graph, layers)[0]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-readme"]:
        sys.exit("usage: python tests/test_layering.py --write-readme")
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + render(contract()) + "\n" + text[end:])
    print("README layering block rendered")
