"""The core stays lean: importing the package or its math pulls in no transformers and starts no CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", ["import lowrank", "import lowrank.linalg", "import lowrank.nn"])
def test_core_imports_no_transformers(statement):
    loaded = _modules_after(statement)
    assert "transformers" not in loaded, f"{statement!r} imported transformers"


def test_package_import_is_lazy():
    loaded = _modules_after("import lowrank")
    assert "torch" not in loaded, "import lowrank should not import torch until a function is used"


def test_cli_help_imports_no_torch():
    loaded = _modules_after("import lowrank.cli as c; c.build_parser()")
    assert "torch" not in loaded, "building the CLI parser must stay instant (no torch import)"


def test_unknown_attribute_raises():
    import lowrank

    with pytest.raises(AttributeError, match="no_such_name"):
        lowrank.no_such_name  # noqa: B018
