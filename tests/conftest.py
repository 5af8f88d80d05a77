"""Shared test set-up: keep every cache and registry inside a temporary SHIPYARD_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _shipyard_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPYARD_HOME", str(tmp_path_factory.getbasetemp() / "shipyard-home"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
