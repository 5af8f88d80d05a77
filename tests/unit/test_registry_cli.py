"""`shipyard models ...` through the real Typer app (CliRunner), plus one real subprocess."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT
from tests.registry_support import copy_package
from typer.testing import CliRunner, Result

from shipyard.cli import app
from shipyard.errors import RegistryError
from shipyard.package import verify_package

VERBS = ("register", "list", "show", "promote", "rollback", "history", "delete", "pull")


@pytest.fixture
def pkg(package_src: Path, tmp_path: Path) -> Path:
    return copy_package(package_src, tmp_path / "pkg")


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["models", *args], terminal_width=200)


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def fails(*args: str) -> str:
    """The ShipyardError a verb raises (main() turns it into one red line and exit 2)."""
    result = run(*args)
    assert isinstance(result.exception, RegistryError), (result.output, result.exception)
    return str(result.exception)


def test_every_verb_has_an_example_in_its_help() -> None:
    for verb in VERBS:
        out = ok(verb, "--help")
        assert "Example:" in out and f"shipyard models {verb}" in out, verb


def test_cli_flow(home: Path, pkg: Path, tmp_path: Path) -> None:
    out = ok("register", str(pkg), "--tag", "team=vision", "--description", "first try")
    assert "registered reg:1" in out
    ok("register", str(pkg), "--name", "reg")
    ok("register", str(pkg), "--name", "other")

    listed = ok("list")
    assert "reg" in listed and "other" in listed
    models = json.loads(ok("list", "--json"))
    assert [(m["name"], m["latest_version"]) for m in models] == [("other", 1), ("reg", 2)]
    versions = json.loads(ok("list", "reg", "--json"))
    assert [v["version"] for v in versions] == [1, 2]
    assert "first try" in ok("list", "reg")

    shown = json.loads(ok("show", "reg:1", "--json"))
    assert shown["tags"] == {"team": "vision"} and shown["task"] == "regression"
    assert "manifest sha256" in ok("show", "reg")

    assert "reg@production -> reg:1" in ok("promote", "reg:1", "--to", "production")
    assert "reg@production -> reg:2" in ok("promote", "reg:2", "--to", "production")
    assert json.loads(ok("show", "reg@production", "--json"))["version"] == 2
    assert "reg@production -> reg:1" in ok("rollback", "reg")
    assert "reg@staging -> reg:2" in ok("promote", "reg:2", "--to", "staging")
    assert "no earlier target" in fails("rollback", "reg", "--alias", "staging")
    events = json.loads(ok("history", "reg", "--alias", "production", "--json"))
    assert [(e["action"], e["version"], e["undone"]) for e in events] == [
        ("rollback", 1, False),
        ("promote", 2, True),
        ("promote", 1, False),
    ]
    assert {e["actor"] for e in events} == {f"cli:{getpass.getuser()}"}
    assert "rolled" in ok("history", "reg") and "cli:" in ok("history", "reg")

    pulled = tmp_path / "pulled"
    assert "pulled reg:1" in ok("pull", "reg@production", str(pulled))
    assert verify_package(pulled).name == "reg"

    assert "--force" in fails("delete", "reg:1")
    assert "deleted reg:1" in ok("delete", "reg:1", "--force")
    assert "deleted other:1" in ok("delete", "other:1")
    assert [v["version"] for v in json.loads(ok("list", "reg", "--json"))] == [2]


def test_cli_errors(home: Path, pkg: Path) -> None:
    ok("register", str(pkg))
    assert "did you mean 'reg'" in fails("show", "rge")
    assert "existing versions: 1" in fails("show", "reg:4")
    assert "invalid model name" in fails("register", str(pkg), "--name", "../evil")
    assert "invalid model name" in fails("register", str(pkg), "--name", "a/b")
    assert "KEY=VALUE" in fails("register", str(pkg), "--tag", "novalue")
    assert "NAME:VERSION" in fails("promote", "reg", "--to", "production")
    assert "NAME:VERSION" in fails("delete", "reg@production")
    assert "invalid alias" in fails("promote", "reg:1", "--to", "Prod")


def test_real_process_prints_one_red_line_and_exits_2(home: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "shipyard", "models", "show", "nosuch:1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "SHIPYARD_HOME": str(home)},
        timeout=120,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
    assert "no model named 'nosuch'" in lines[0] and "Traceback" not in bad.stderr
    assert (home / "registry.db").is_file()
