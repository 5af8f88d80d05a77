"""Registry on a real PostgreSQL: a throwaway server in a temp dir on an ephemeral loopback port.

Needs the PostgreSQL server binaries (Debian: `apt-get install postgresql`, which puts initdb and
pg_ctl in /usr/lib/postgresql/*/bin) and psycopg. PostgreSQL refuses to run as root, so as root
the server runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.conftest import ROOT
from tests.registry_support import register_concurrently

from shipyard.errors import RegistryError
from shipyard.package import verify_package
from shipyard.package.registry import SCHEMA_VERSION, Registry
from shipyard.tuning import tune

pytestmark = pytest.mark.integration

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (shipyard[postgres])")


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        bindir = Path(found).resolve().parent
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir

    def major(path: str) -> int:
        part = Path(path).parts[-3]
        return int(part) if part.isdigit() else 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """initdb + pg_ctl start in a fresh temp dir; `stop()` removes everything."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_user: list[str] = []
        uid = gid = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run the server")
            uid, gid = entry.pw_uid, entry.pw_gid
            runuser = shutil.which("runuser")
            self.as_user = [runuser, "-u", "postgres", "--"] if runuser else []
            if not self.as_user:
                pytest.skip("running as root and runuser is not available")
        # as root, a dir directly under /tmp: $TMPDIR may be a private dir postgres cannot enter
        base = "/tmp" if uid is not None and os.path.isdir("/tmp") else None
        self.dir = Path(tempfile.mkdtemp(prefix="shipyard-pg-", dir=base))
        if uid is not None and gid is not None:
            os.chown(self.dir, uid, gid)
        self.data = self.dir / "data"
        self.port = 0
        initdb = ["-D", str(self.data), "-A", "trust", "-U", "shipyard", "-E", "UTF8", "--no-sync"]
        self._run("initdb", *initdb, "--locale=C")
        for _attempt in range(3):
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            log = str(self.dir / "log")
            started = self._run(
                "pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start", check=False
            )
            if started.returncode == 0:
                return
        log = (self.dir / "log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start:\n{log}")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} failed: {out.stderr or out.stdout}")
        return out

    def url(self, database: str) -> str:
        return f"postgresql://shipyard@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[_Server]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql"
        )
    server = _Server(bindir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: _Server) -> str:
    """A fresh, empty database on the shared throwaway server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = f"host=127.0.0.1 port={postgres.port} user=shipyard dbname=postgres"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url(name)


def test_registry_flows_on_postgres(pg_url: str, package_src: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "artifacts")
    with Registry(pg_url, store) as registry:
        assert registry.schema_version() == SCHEMA_VERSION
        assert (
            "postgresql+psycopg" in registry.url and registry._engine.dialect.name == "postgresql"
        )
        for _ in range(3):
            registry.register(package_src, tags={"db": "postgres"})
        registry.register(package_src, name="other")
        assert [(m.name, m.latest_version) for m in registry.list_models()] == [
            ("other", 1),
            ("reg", 3),
        ]
        registry.promote("reg", 1, "production")
        registry.promote("reg", 3, "production")
        assert registry.get("reg@production").version == 3
        assert registry.rollback("reg").version == 1
        with pytest.raises(RegistryError, match=r"--force"):
            registry.delete("reg", 1)
        registry.delete("reg", 2)
        with pytest.raises(RegistryError, match=r"existing versions: 1, 3"):
            registry.get("reg:2")
        with pytest.raises(RegistryError, match=r"did you mean 'reg'"):
            registry.get("rgx")
        out = registry.pull("reg@production", tmp_path / "pulled")
        assert verify_package(out).name == "reg"
        assert registry.get("reg:3").tags == {"db": "postgres"}
        assert isinstance(registry.get("reg:3").metrics, dict)
    with Registry(pg_url, store) as again:  # reopening an up-to-date schema is a no-op
        assert again.register(package_src).version == 4


def test_schema_upgrade_on_postgres(pg_url: str, package_src: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "artifacts")
    with Registry(pg_url, store) as registry:
        registry.register(package_src)
        registry.register(package_src)
    # turn it back into a v1 database by hand
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE models DROP COLUMN last_version")
        conn.execute("ALTER TABLE alias_history DROP COLUMN actor")  # v3's columns
        conn.execute("ALTER TABLE alias_history DROP COLUMN action")
        conn.execute("UPDATE schema_version SET version = 1")
    with Registry(pg_url, store) as registry:
        assert registry.schema_version() == SCHEMA_VERSION
        assert registry.register(package_src).version == 3


def test_two_processes_get_distinct_versions_on_postgres(
    pg_url: str, package_src: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "artifacts")
    versions = register_concurrently(pg_url, store, package_src, "conc", processes=2, n=5)
    assert sorted(versions) == list(range(1, 11))
    with Registry(pg_url, store) as registry:
        assert [v.version for v in registry.list_versions("conc")] == list(range(1, 11))


def test_tune_study_lives_in_the_registry_database_on_postgres(
    pg_url: str, package_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("optuna", reason="optuna is not installed (shipyard[tune])")
    monkeypatch.setenv("SHIPYARD_REGISTRY_URL", pg_url)
    raw = yaml.safe_load((ROOT / "examples" / "digits-tune.yaml").read_text())
    raw["train"]["epochs"] = 1
    raw["tune"] = {"params": {"optim.lr": {"low": 0.0001, "high": 0.03, "log": True}}}
    first = tune(raw, 1, runs_root=tmp_path / "runs")
    assert first.storage.startswith("postgresql+psycopg://")
    again = tune(raw, 1, runs_root=tmp_path / "runs")  # resumes: the same study, one more trial
    assert [t["number"] for t in again.trials] == [0, 1]
    with Registry(pg_url, str(tmp_path / "artifacts")) as registry:  # both share the database
        assert registry.register(package_src).version == 1
    with psycopg.connect(pg_url) as conn:
        names = {row[0] for row in conn.execute("SELECT study_name FROM studies")}
    assert names == {"digits-tune"}
