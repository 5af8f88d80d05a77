"""The `shipyard` command line, run as a real subprocess: exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer
import yaml
from tests.conftest import EXAMPLES, ROOT

from shipyard.cli import VERBS, app, verbs_needed


def shipyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_version_and_help() -> None:
    out = shipyard("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("shipyard ")
    helped = shipyard("--help")
    assert helped.returncode == 0
    assert "config" in helped.stdout and "Examples" in helped.stdout


def test_a_command_line_builds_only_the_verb_it_names() -> None:
    assert verbs_needed(["train", "examples/digits-mlp.yaml"]) == ["train"]
    assert verbs_needed(["--debug", "models", "list"]) == ["models"]
    assert verbs_needed(["--version"]) == []
    assert verbs_needed(["--help"]) is None
    assert verbs_needed([]) is None
    assert verbs_needed(["trian"]) is None  # click's "did you mean" needs every name
    # the full app has every verb and only those (a verb outside VERBS could not be run alone)
    assert sorted(typer.main.get_group(app).commands) == sorted(VERBS)


def test_one_verb_does_not_import_the_others() -> None:
    code = (
        "import sys\n"
        "from shipyard.cli import build_app, verbs_needed\n"
        "build_app(verbs_needed(['--debug', 'models', 'list']))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('shipyard.cli.', 'shipyard.serve'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['shipyard.cli.models_cmd',", "'shipyard.cli.tables']"]


def test_root_flags_and_a_misspelt_verb() -> None:
    out = shipyard("--debug", "models", "--help")
    assert out.returncode == 0 and "register" in out.stdout
    out = shipyard("trian")
    assert out.returncode == 2 and "Did you mean 'train'?" in out.stderr


def test_validate_all_examples() -> None:
    out = shipyard("config", "validate", *map(str, EXAMPLES))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok ") == len(EXAMPLES)


def test_misspelt_key_exits_2_with_one_line(tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLES[0].read_text())
    raw["train"]["batch_sise"] = raw["train"].pop("batch_size")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    out = shipyard("config", "validate", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "train.batch_sise" in lines[0] and "did you mean 'batch_size'" in lines[0]
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    out = shipyard("--debug", "config", "validate", str(tmp_path / "missing.yaml"))
    assert out.returncode != 0
    assert "Traceback" in out.stderr


def test_show_applies_overrides() -> None:
    path = ROOT / "examples" / "digits-mlp.yaml"
    out = shipyard("config", "show", str(path), "--set", "train.epochs=7", "--set", "optim.lr=0.5")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["train"]["epochs"] == 7
    assert shown["optim"]["lr"] == 0.5
    assert shown["train"]["grad_accum"] == 1  # defaults are filled in


def test_schema_is_json() -> None:
    out = shipyard("config", "schema")
    assert out.returncode == 0
    assert json.loads(out.stdout)["title"] == "shipyard run config"
