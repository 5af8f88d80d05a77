"""Every benchmark script starts and explains itself (`--help`), so a refactor cannot leave one
broken until the next time someone measures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

# `python SCRIPT --help` for every script, in one fresh interpreter so that torch and shipyard
# are imported once rather than once per script: each script still runs as __main__ with its own
# folder first on sys.path, so its module-level imports and its argument parser are exercised.
HELP_ALL = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys, traceback
    out_path, scripts = sys.argv[1], sys.argv[2:]
    results = {}
    for script in scripts:
        stdout, stderr = io.StringIO(), io.StringIO()
        sys.argv = [script, "--help"]
        sys.path[0] = script.rsplit("/", 1)[0]
        code = 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
        results[script] = {
            "returncode": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()
        }
    with open(out_path, "w") as f:
        json.dump(results, f)
    """
)


def test_there_are_benchmark_scripts() -> None:
    assert len(SCRIPTS) >= 6


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each script's `--help`: its exit code, stdout and stderr, by path."""
    out_path = tmp_path_factory.mktemp("bench-help") / "helps.json"
    out = subprocess.run(
        [sys.executable, "-c", HELP_ALL, str(out_path), *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    results: dict[str, dict[str, Any]] = json.loads(out_path.read_text())
    return results


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_help(script: Path, helps: dict[str, dict[str, Any]]) -> None:
    out = helps[str(script)]
    assert out["returncode"] == 0, out["stderr"]
    assert "usage:" in out["stdout"]


def _fsdp_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp_vs_ddp", ROOT / "benchmarks/fsdp_vs_ddp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsdp_benchmark_fails_when_the_losses_differ() -> None:
    bench = _fsdp_benchmark()
    same = {"ddp": {"final_loss": 2.5}, "fsdp": {"final_loss": 2.5 + 1e-6}}
    bench.check_losses(same)  # within tolerance: no exit
    differ = {"ddp": {"final_loss": 2.5}, "fsdp": {"final_loss": 2.6}}
    with pytest.raises(SystemExit, match=r"final losses differ: ddp 2\.500000, fsdp 2\.600000"):
        bench.check_losses(differ)
