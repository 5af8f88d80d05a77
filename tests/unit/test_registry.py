"""The registry library on SQLite + a local artifact folder: versions, aliases, rollback, delete,
pull with verification, bad names and refs, failure atomicity and schema upgrades."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.registry_support import copy_package

from shipyard.errors import PackageError, RegistryError
from shipyard.package import manifest_sha256, verify_package
from shipyard.package.registry import SCHEMA_VERSION, Registry, parse_ref
from shipyard.package.storage import ArtifactStore


@pytest.fixture
def registry(home: Path) -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.fixture
def pkg(package_src: Path, tmp_path: Path) -> Path:
    return copy_package(package_src, tmp_path / "pkg")


def test_register_records_versions_in_sqlite_under_shipyard_home(
    registry: Registry, pkg: Path, home: Path
) -> None:
    v1 = registry.register(pkg, description="first", tags={"team": "vision"})
    v2 = registry.register(pkg, name="reg-copy")
    v3 = registry.register(pkg)
    assert (home / "registry.db").is_file()
    assert (v1.name, v1.version, v3.version, v2.version) == ("reg", 1, 2, 1)
    assert v1.manifest_sha256 == manifest_sha256(pkg)
    assert v1.task == "regression" and v1.tags == {"team": "vision"}
    assert v1.description == "first" and v1.source_name == "reg"
    assert isinstance(v1.metrics, dict)
    assert isinstance(v1.lineage, dict) and "data_fingerprint" in v1.lineage
    # the artifact is a verified package copy under artifacts/NAME/VERSION
    stored = home / "artifacts" / "reg" / "2"
    assert v3.artifact_uri.endswith("/artifacts/reg/2")
    assert verify_package(stored).name == "reg"
    assert registry.get("reg").version == 2  # NAME alone = latest
    assert registry.get("reg:1") == registry.list_versions("reg")[0]
    models = {m.name: m for m in registry.list_models()}
    assert set(models) == {"reg", "reg-copy"}
    assert (models["reg"].latest_version, models["reg"].versions) == (2, 2)


def test_registry_persists_across_instances(home: Path, pkg: Path) -> None:
    with Registry() as first:
        first.register(pkg)
        first.promote("reg", 1, "staging")
    with Registry() as second:
        assert second.get("reg@staging").version == 1
        assert second.schema_version() == SCHEMA_VERSION


def test_promote_rollback_and_aliases(registry: Registry, pkg: Path) -> None:
    for _ in range(3):
        registry.register(pkg)
    with pytest.raises(RegistryError, match=r"no alias 'production'.*no history"):
        registry.rollback("reg")
    registry.promote("reg", 1, "production")
    with pytest.raises(RegistryError, match=r"no earlier target"):
        registry.rollback("reg")
    registry.promote("reg", 2, "production")
    registry.promote("reg", 3, "production")
    registry.promote("reg", 3, "staging")
    registry.promote("reg", 1, "canary-eu")
    assert registry.get("reg@production").version == 3
    assert registry.get("reg@latest").version == 3
    assert registry.get("reg:3").aliases == ("production", "staging")
    assert registry.aliases("reg") == {"canary-eu": 1, "production": 3, "staging": 3}
    assert registry.rollback("reg").version == 2
    assert registry.rollback("reg", "production").version == 1
    with pytest.raises(RegistryError, match=r"no earlier target"):
        registry.rollback("reg")
    assert registry.get("reg@staging").version == 3  # other aliases untouched
    # promoting again after a rollback starts a new history entry
    registry.promote("reg", 3, "production")
    assert registry.rollback("reg").version == 1


@pytest.mark.parametrize("alias", ["Production", "1st", "a/b", "../x", "", "x" * 65, "latest"])
def test_bad_aliases_are_refused(registry: Registry, pkg: Path, alias: str) -> None:
    registry.register(pkg)
    with pytest.raises(RegistryError, match=r"alias"):
        registry.promote("reg", 1, alias)


def test_delete_refuses_aliased_version_unless_forced(
    registry: Registry, pkg: Path, home: Path
) -> None:
    for _ in range(3):
        registry.register(pkg)
    registry.promote("reg", 1, "production")
    registry.promote("reg", 2, "production")
    with pytest.raises(RegistryError, match=r"reg:2 is the target of alias production.*--force"):
        registry.delete("reg", 2)
    assert (home / "artifacts" / "reg" / "2").is_dir()
    deleted = registry.delete("reg", 2, force=True)
    assert deleted.version == 2 and deleted.aliases == ("production",)
    assert not (home / "artifacts" / "reg" / "2").exists()
    assert [v.version for v in registry.list_versions("reg")] == [1, 3]
    assert "production" not in registry.aliases("reg")
    # the alias's history skips the deleted version: rollback restores the earlier target
    assert registry.rollback("reg").version == 1
    registry.delete("reg", 3)
    with pytest.raises(RegistryError, match=r"no version 3; existing versions: 1"):
        registry.get("reg:3")
    # numbers are never reused after a delete
    assert registry.register(pkg).version == 4


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "/abs", ".hidden", "", "a b", "x" * 129, "a\\b"]
)
def test_bad_names_never_touch_the_filesystem(
    registry: Registry, pkg: Path, home: Path, tmp_path: Path, name: str
) -> None:
    with pytest.raises(RegistryError, match=r"invalid model name"):
        registry.register(pkg, name=name)
    with pytest.raises(RegistryError, match=r"invalid model name|empty model reference"):
        registry.get(name)
    assert registry.list_models() == []
    assert not any((home / "artifacts").iterdir())
    assert not (tmp_path / "evil").exists() and not (home / "evil").exists()


def test_unknown_refs_suggest_close_names_and_list_versions(registry: Registry, pkg: Path) -> None:
    registry.register(pkg, name="digits-mlp")
    registry.register(pkg, name="digits-mlp")
    registry.register(pkg, name="gpt-tiny")
    with pytest.raises(
        RegistryError, match=r"no model named 'digits-mpl'.*did you mean 'digits-mlp'"
    ):
        registry.get("digits-mpl")
    with pytest.raises(RegistryError, match=r"registered models: digits-mlp, gpt-tiny"):
        registry.get("zzz")
    with pytest.raises(RegistryError, match=r"no version 7; existing versions: 1, 2"):
        registry.get("digits-mlp:7")
    with pytest.raises(RegistryError, match=r"no alias 'production'.*no aliases yet"):
        registry.get("digits-mlp@production")
    with pytest.raises(RegistryError, match=r"whole number"):
        registry.get("digits-mlp:two")
    with pytest.raises(RegistryError, match=r"no version 9"):
        registry.promote("digits-mlp", 9, "staging")


def test_parse_ref() -> None:
    assert parse_ref("m") == ("m", None, None)
    assert parse_ref("m:12") == ("m", 12, None)
    assert parse_ref("m@production") == ("m", None, "production")
    for bad in ("m:0", "m:-1", "m@", ":1", "@prod", "m@Prod"):
        with pytest.raises(RegistryError):
            parse_ref(bad)


def test_pull_round_trip(registry: Registry, pkg: Path, tmp_path: Path) -> None:
    mv = registry.register(pkg)
    registry.promote("reg", 1, "production")
    out = registry.pull("reg@production", tmp_path / "pulled")
    assert verify_package(out).name == "reg"
    assert manifest_sha256(out) == mv.manifest_sha256
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in pkg.iterdir())
    with pytest.raises(RegistryError, match=r"not empty"):
        registry.pull("reg", out)
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    assert registry.pull("reg:1", tmp_path / "empty") == tmp_path / "empty"


def test_corrupted_artifact_is_detected_on_pull_and_leaves_nothing(
    registry: Registry, pkg: Path, home: Path, tmp_path: Path
) -> None:
    registry.register(pkg)
    weights = home / "artifacts" / "reg" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    dest_parent = tmp_path / "pulls"
    dest_parent.mkdir()
    with pytest.raises(RegistryError, match=r"model.safetensors.*BLAKE3.*corrupt or was modified"):
        registry.pull("reg", dest_parent / "out")
    assert list(dest_parent.iterdir()) == []  # no half directory, no temp left behind
    with pytest.raises((RegistryError, PackageError), match=r"BLAKE3"):
        registry.resolve_local("reg")
    # truncation is caught by size
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(RegistryError, match=r"bytes, the manifest says"):
        registry.pull("reg", dest_parent / "out")
    assert list(dest_parent.iterdir()) == []


def test_tampered_manifest_in_store_is_detected(
    registry: Registry, pkg: Path, home: Path, tmp_path: Path
) -> None:
    registry.register(pkg)
    manifest = home / "artifacts" / "reg" / "1" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["task"] = "classification"
    manifest.write_text(json.dumps(raw, indent=2))
    with pytest.raises(RegistryError, match=r"registry recorded"):
        registry.pull("reg", tmp_path / "out")
    with pytest.raises(RegistryError, match=r"registry recorded"):
        registry.resolve_local("reg")
    assert not (tmp_path / "out").exists()


def test_resolve_local_is_the_verified_store_path(
    registry: Registry, pkg: Path, home: Path
) -> None:
    registry.register(pkg)
    registry.promote("reg", 1, "production")
    path = registry.resolve_local("reg@production")
    assert path == home / "artifacts" / "reg" / "1"
    assert verify_package(path).name == "reg"


def test_tampered_package_is_refused_and_nothing_is_recorded(
    registry: Registry, pkg: Path, home: Path
) -> None:
    weights = pkg / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(PackageError):
        registry.register(pkg)
    assert registry.list_models() == []
    with pytest.raises(RegistryError, match=r"not a package directory"):
        registry.register(pkg / "nope")


def test_failed_upload_records_nothing(
    registry: Registry, pkg: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: ArtifactStore, package_dir: Path, name: str, version: int) -> str:
        raise RegistryError("upload failed: disk full")

    monkeypatch.setattr(ArtifactStore, "upload", broken)
    with pytest.raises(RegistryError, match=r"disk full"):
        registry.register(pkg)
    assert registry.list_models() == []
    monkeypatch.undo()
    registry.register(pkg)
    with monkeypatch.context() as m:
        m.setattr(ArtifactStore, "upload", broken)
        with pytest.raises(RegistryError):
            registry.register(pkg)
    assert [v.version for v in registry.list_versions("reg")] == [1]
    assert registry.register(pkg).version == 2  # the failed reservation was released


def test_upload_checks_what_was_written(pkg: Path, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    uri = store.upload(pkg, "reg", 1)
    assert store.exists(uri) and store.local_path(uri) == tmp_path / "store" / "reg" / "1"
    # a file that does not match its manifest is refused mid-upload and the partial copy removed
    (pkg / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(RegistryError, match=r"local package file"):
        store.upload(pkg, "reg", 2)
    assert not (tmp_path / "store" / "reg" / "2").exists()
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # idempotent
    with pytest.raises(RegistryError, match=r"not inside this store"):
        store.exists("file:///etc/passwd")
    with pytest.raises(RegistryError, match=r"not inside this store"):
        store.delete(store.uri_for("reg", 1) + "/../../..")
    with pytest.raises(RegistryError, match=r"invalid model name"):
        store.uri_for("../x", 1)


# ------------------------------------------------------------------------------- schema


V1_SCHEMA = """
CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1, 1);
CREATE TABLE models (
    id INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL UNIQUE, description TEXT,
    created DATETIME NOT NULL);
CREATE TABLE versions (
    id INTEGER PRIMARY KEY, model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    version INTEGER NOT NULL, artifact_uri TEXT NOT NULL, manifest_sha256 VARCHAR(64) NOT NULL,
    task VARCHAR(64), metrics JSON, lineage JSON, tags JSON, description TEXT,
    created DATETIME NOT NULL, source_name TEXT, source_version TEXT,
    CONSTRAINT uq_versions_model_version UNIQUE (model_id, version));
CREATE TABLE aliases (
    id INTEGER PRIMARY KEY, model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    alias VARCHAR(64) NOT NULL, version INTEGER NOT NULL, updated DATETIME NOT NULL,
    CONSTRAINT uq_aliases_model_alias UNIQUE (model_id, alias));
CREATE TABLE alias_history (
    id INTEGER PRIMARY KEY, model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    alias VARCHAR(64) NOT NULL, version INTEGER NOT NULL, created DATETIME NOT NULL,
    undone BOOLEAN NOT NULL DEFAULT 0);
INSERT INTO models VALUES (1, 'old', 'from v1', '2024-01-01 00:00:00.000000');
INSERT INTO versions VALUES (1, 1, 1, 'file:///gone/old/1', '{sha}', 'regression', '{{}}', NULL,
    '{{}}', NULL, '2024-01-01 00:00:00.000000', 'old', '0.1');
INSERT INTO versions VALUES (2, 1, 5, 'file:///gone/old/5', '{sha}', 'regression', '{{}}', NULL,
    '{{}}', NULL, '2024-01-02 00:00:00.000000', 'old', '0.1');
"""


def test_v1_database_is_upgraded_on_open(home: Path, pkg: Path) -> None:
    db = home / "registry.db"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.executescript(V1_SCHEMA.format(sha="0" * 64))
    columns = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(models)")}
    assert "last_version" not in columns

    with Registry() as registry:
        assert registry.schema_version() == SCHEMA_VERSION == 3
        assert [v.version for v in registry.list_versions("old")] == [1, 5]
        assert registry.get("old").created.year == 2024
        # the new counter column was filled from existing rows: the next version follows 5
        assert registry.register(pkg, name="old").version == 6

    conn = sqlite3.connect(db)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
    assert "last_version" in columns
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
    conn.close()


def test_newer_schema_is_refused(home: Path) -> None:
    with Registry():
        pass
    with sqlite3.connect(home / "registry.db") as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError, match=r"newer shipyard"):
        Registry()


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE models (id INTEGER PRIMARY KEY)")
    with pytest.raises(RegistryError, match=r"not a shipyard registry"):
        Registry(f"sqlite:///{db}", tmp_path / "store")


def test_bad_tags_and_urls(registry: Registry, pkg: Path, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"invalid tag key"):
        registry.register(pkg, tags={"bad key": "x"})
    with pytest.raises(RegistryError, match=r"invalid registry URL"):
        Registry("not a url", tmp_path / "s")
