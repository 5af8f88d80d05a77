"""Two real processes registering the same name at the same time get distinct versions."""

from __future__ import annotations

from pathlib import Path

from tests.registry_support import register_concurrently

from shipyard.package import verify_package
from shipyard.package.registry import Registry


def test_two_processes_get_distinct_versions_on_sqlite(package_src: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = str(tmp_path / "artifacts")
    versions = register_concurrently(url, store, package_src, "conc", processes=2, n=5)
    assert sorted(versions) == list(range(1, 11))
    with Registry(url, store) as registry:
        rows = registry.list_versions("conc")
        assert [v.version for v in rows] == list(range(1, 11))
        for v in (1, 10):
            assert verify_package(tmp_path / "artifacts" / "conc" / str(v)).name == "reg"
