"""The package graph: DESIGN.md's layers hold, and no function hides an import of shipyard.

The layers contract lives in pyproject.toml ([tool.importlinter]) and `make lint` runs it too;
running it here makes a layering break a test failure with the offending import chain.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "shipyard"
# The CLI imports each verb's library lazily so `shipyard --help` starts fast; that is the one
# place a function-level import of shipyard is allowed (it never breaks a cycle: cli is on top).
LAZY_ALLOWED = {"cli"}


def _function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            module = None
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                module = "." * node.level + (node.module or "")
            if module and (module == "shipyard" or module.startswith(("shipyard.", "."))):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {module}")
    return found


def test_no_function_level_imports_of_shipyard_outside_the_cli() -> None:
    offenders = [
        hit
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] not in LAZY_ALLOWED
        for hit in _function_level_imports(path)
    ]
    assert not offenders, "imports inside functions (move them to the top, or fix the layer):\n" + (
        "\n".join(offenders)
    )


def test_the_checker_sees_a_hidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import shipyard.errors\n"
        "def f():\n    from shipyard.train import fit\n    import json\n    return fit\n"
        "class C:\n    async def g(self):\n        from . import x\n"
    )
    assert _function_level_imports(sample, tmp_path) == [
        "sample.py:3: shipyard.train",
        "sample.py:8: .",
    ]


def test_layers_contract_is_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout
