"""No pickle anywhere in the library: nothing we load can execute code.

Scans every .py under src/ (AST, so comments and strings do not count) for pickle-family imports,
`torch.load` without `weights_only=True`, `np.load` without `allow_pickle=False`, pandas
`read_pickle`, and the builtins `eval` / `exec`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}

# The one exception: DCP's checkpoint metadata is a pickle, read with an allow-list
# `pickle.Unpickler` subclass (find_class refuses every global not named; tested in
# tests/unit/test_fsdp_parts.py). torch's weights_only unpickler cannot read protocol-4 frames.
ALLOWED = {"src/shipyard/train/checkpoint.py:import pickle"}


def _allowed(problem: str) -> bool:
    file, _, rest = problem.partition(":")
    return f"{file}:{rest.partition(': ')[2]}" in ALLOWED


def _keyword_is(call: ast.Call, name: str, value: bool) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value
        for kw in call.keywords
    )


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def scan(source: str, filename: str) -> list[str]:
    """Every unsafe construct in `source`, as 'file:line: what'."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec"):
                problems.append(f"{where}: builtin {name}()")
            elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
                problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False):
                problems.append(f"{where}: {name} without allow_pickle=False")
            elif name.endswith("read_pickle"):
                problems.append(f"{where}: {name}()")
    return problems


def test_library_has_no_pickle_eval_or_exec() -> None:
    files = sorted((ROOT / "src").rglob("*.py"))
    assert len(files) > 10
    problems = [
        p
        for f in files
        for p in scan(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))
        if not _allowed(p)
    ]
    assert not problems, "unsafe loading in the library:\n" + "\n".join(problems)


def test_scanner_catches_each_pattern() -> None:
    code = """
import pickle
import dill.settings
from cloudpickle import dumps
import torch, numpy as np
torch.load("x")
torch.load("x", weights_only=False)
np.load("x.npy")
np.load("x.npy", allow_pickle=True)
eval("1")
exec("x = 1")
torch.load("ok", weights_only=True)
np.load("ok.npy", allow_pickle=False)
model.eval()
"""
    problems = scan(code, "t.py")
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "6", "7", "8", "9", "10", "11"]


def test_scanner_accepts_the_existing_safe_loaders() -> None:
    checkpoint = Path(ROOT / "src" / "shipyard" / "train" / "checkpoint.py").read_text()
    assert "weights_only=True" in checkpoint
    problems = scan(checkpoint, "src/shipyard/train/checkpoint.py")
    assert [p for p in problems if not _allowed(p)] == []
    assert "def find_class" in checkpoint  # the pickle import serves the allow-list unpickler
