"""Shared test set-up: keep every cache and registry inside a temporary SHIPYARD_HOME."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def package_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained package per session, for registry tests (copy it before changing it)."""
    from tests.registry_support import tiny_package

    return tiny_package(tmp_path_factory.getbasetemp())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SHIPYARD_HOME with no registry or artifact overrides from the environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("SHIPYARD_HOME", str(home))
    monkeypatch.delenv("SHIPYARD_REGISTRY_URL", raising=False)
    monkeypatch.delenv("SHIPYARD_ARTIFACT_ROOT", raising=False)
    return home


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (tiny tensors: more threads only add overhead, and
    contention on a busy CI box). Use as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
