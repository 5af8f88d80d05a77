"""Every benchmark script starts and explains itself (`--help`), so a refactor cannot leave one
broken until the next time someone measures."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts() -> None:
    assert len(SCRIPTS) >= 6


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_help(script: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


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
