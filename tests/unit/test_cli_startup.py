"""Light commands start without torch: a registry, key or package-verify command in a fresh
interpreter never imports it (it costs seconds to import, and these commands never touch a tensor).

One real interpreter runs the commands one after another through the console-script entry point
(`shipyard.cli.main`) and reports after each whether torch has been imported, so a failure names
the first command that pulled it in; `python -X importtime -m shipyard COMMAND` shows the chain.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ROOT
from tests.registry_support import copy_package

# Runs each command line (a JSON list of argv lists) as `shipyard ...` would, then prints one
# JSON line per command: its exit code and the heavy modules imported so far.
RUNNER = """
import contextlib, io, json, sys
from shipyard.cli import main

HEAVY = ("torch", "numpy", "fastapi", "safetensors")
for argv in json.loads(sys.argv[1]):
    sys.argv = ["shipyard", *argv]
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    print(json.dumps({"argv": argv, "code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def run_in_one_interpreter(commands: list[list[str]]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_registry_key_and_package_commands_do_not_import_torch(
    home: Path, package_src: Path, tmp_path: Path
) -> None:
    pkg = str(copy_package(package_src, tmp_path / "pkg"))
    keys = str(tmp_path / "keys.json")
    signing = str(tmp_path / "release")
    commands = [
        ["package", "verify", pkg],
        ["package", "inspect", pkg],
        ["signing-keys", "generate", "-o", signing],
        ["package", "sign", pkg, "--key", f"{signing}.key"],
        ["package", "verify", pkg, "--public-key", f"{signing}.pub"],
        ["package", "pack", pkg, "-o", str(tmp_path / "pkg.ship")],
        ["package", "unpack", str(tmp_path / "pkg.ship"), "-o", str(tmp_path / "unpacked")],
        ["models", "register", pkg, "--name", "light"],
        ["models", "list"],
        ["models", "list", "light"],
        ["models", "show", "light:1"],
        ["models", "promote", "light:1", "--to", "production"],
        ["models", "history", "light"],
        ["models", "pull", "light@production", str(tmp_path / "pulled")],
        ["models", "register", pkg, "--name", "light"],
        ["models", "promote", "light:2", "--to", "production"],
        ["models", "rollback", "light"],
        ["models", "delete", "light:2"],
        ["api-keys", "add", "--scope", "infer", "--name", "billing", "--keys-file", keys],
        ["api-keys", "list", "--keys-file", keys],
        ["api-keys", "revoke", "billing", "--keys-file", keys],
    ]
    results = run_in_one_interpreter(commands)
    assert [r["argv"] for r in results] == commands
    assert [r["code"] for r in results] == [0] * len(commands), results
    heavy = [(" ".join(r["argv"]), r["heavy"]) for r in results if r["heavy"]]
    assert not heavy, f"{heavy[0][0]!r} imported {heavy[0][1]} (and every later one had them)"


@pytest.mark.parametrize("package", ["shipyard.data", "shipyard.package", "shipyard.serve"])
def test_lazy_exports_match_their_modules(package: str) -> None:
    """A lazy __init__ (PEP 562) gives the same objects as its modules; its TYPE_CHECKING imports
    (what mypy sees) and its table of names (what runs) list the same names from the same places."""
    module = importlib.import_module(package)
    table = module._EXPORTS
    assert sorted(table) == sorted(module.__all__)
    for name, where in table.items():
        assert getattr(module, name) is getattr(importlib.import_module(f"{package}.{where}"), name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    typed = {
        alias.name: node.module.removeprefix(f"{package}.")
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    assert typed == table
