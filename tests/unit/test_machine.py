"""What a benchmark or compression report records about the machine: the CPU's model name (not
just the architecture `platform.processor()` often gives) and the instruction-set flags that
matter for PyTorch's CPU kernels and hashing."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from shipyard.compress import measure
from shipyard.compress.measure import cpu_model, describe_machine, machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma sha_ni aes
"""


def test_cpu_model_reads_the_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_falls_back_to_platform(tmp_path: Path) -> None:
    expected = platform.processor() or platform.machine() or "unknown"
    assert cpu_model(tmp_path / "missing") == expected


def test_machine_lists_only_the_relevant_flags_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "cpu_flags", lambda: {"sse4_2", "sha_ni", "avx2", "fma", "aes"})
    monkeypatch.setattr(measure, "cpu_model", lambda: "AMD EPYC 7B13")
    m = machine()
    assert m["cpu_model"] == "AMD EPYC 7B13"
    assert m["cpu_flags"] == ["avx2", "fma", "sha_ni"]
    line = describe_machine(m)
    assert line.startswith(f"AMD EPYC 7B13 (avx2 fma sha_ni), {m['cpu_count']} CPUs, ")
    assert f"torch {m['torch']}" in line
