"""The model registry: packages recorded by name and version, with aliases such as `production`.

Records live in a SQL database through SQLAlchemy: a SQLite file `$SHIPYARD_HOME/registry.db` by
default (zero set-up), or any URL in `SHIPYARD_REGISTRY_URL` (PostgreSQL for teams). Package files
live in an `ArtifactStore` (local folder or `s3://`). References are `NAME` (latest version),
`NAME:VERSION` or `NAME@ALIAS`.

Concurrency: a version number is reserved in its own short write transaction (SQLite `BEGIN
IMMEDIATE`, PostgreSQL `SELECT ... FOR UPDATE` on the model row) from a per-model counter, so two
processes registering the same name at once get distinct, increasing versions; a unique constraint
on (model, version) backs this up and conflicting transactions are retried. The artifact is uploaded
outside any transaction, then the version row is written; if the upload fails the reservation is
released and nothing is recorded.
"""

from __future__ import annotations

import difflib
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from shipyard.errors import PackageError, RegistryError
from shipyard.package.files import MANIFEST
from shipyard.package.manifest import manifest_sha256, verify_package
from shipyard.package.storage import (
    ArtifactStore,
    check_model_name,
    shipyard_home,
)

SCHEMA_VERSION = 3
STAGES = ("staging", "production", "archived")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
LATEST = "latest"  # virtual alias: always the newest version; cannot be assigned
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PG_LOCK_KEY = 0x5348_4950  # advisory lock serialising schema creation/upgrade on PostgreSQL
_RETRIES = 20


# ------------------------------------------------------------------------------------- schema


class _UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC (portable), returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: _UTCDateTime, dict[str, Any]: JSON}  # noqa: RUF012


class SchemaVersionRow(Base):
    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime]
    # v2: the highest version ever handed out, so numbers are never reused after a delete
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_versions_model_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    artifact_uri: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    task: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None]
    lineage: Mapped[dict[str, Any] | None]
    tags: Mapped[dict[str, Any] | None]
    description: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime]
    source_name: Mapped[str | None] = mapped_column(Text)
    source_version: Mapped[str | None] = mapped_column(Text)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias", name="uq_aliases_model_alias"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    updated: Mapped[datetime]


class AliasHistoryRow(Base):
    """Every assignment of an alias; the promotions not yet undone form the stack rollback pops."""

    __tablename__ = "alias_history"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime]
    undone: Mapped[bool] = mapped_column(Boolean, default=False)
    # v3: who made the change (an API key's name, a user) and what it was ('promote' or
    # 'rollback'; the v3 migration marks older rows 'promote')
    actor: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str | None] = mapped_column(String(16))


def _migrate_v1_to_v2(conn: Connection) -> None:
    """v2 adds models.last_version (a per-model counter) and fills it from existing versions."""
    conn.execute(text("ALTER TABLE models ADD COLUMN last_version INTEGER NOT NULL DEFAULT 0"))
    conn.execute(
        text(
            "UPDATE models SET last_version = COALESCE("
            "(SELECT MAX(v.version) FROM versions v WHERE v.model_id = models.id), 0)"
        )
    )


def _migrate_v2_to_v3(conn: Connection) -> None:
    """v3 records who changed an alias and how (older rows: actor unknown, action promote)."""
    conn.execute(text("ALTER TABLE alias_history ADD COLUMN actor VARCHAR(128)"))
    conn.execute(text("ALTER TABLE alias_history ADD COLUMN action VARCHAR(16)"))
    conn.execute(text("UPDATE alias_history SET action = 'promote'"))


# MIGRATIONS[n] upgrades a database at schema version n to n + 1, inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _migrate_v1_to_v2,
    2: _migrate_v2_to_v3,
}


# -------------------------------------------------------------------------------- public data


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model (a plain snapshot, safe to keep after the call)."""

    name: str
    version: int
    artifact_uri: str
    manifest_sha256: str
    task: str | None
    created: datetime
    metrics: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    source_name: str | None = None
    source_version: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """`NAME:VERSION`, the exact reference of this version."""
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (timestamps as ISO 8601)."""
        out = asdict(self)
        out["created"] = self.created.isoformat()
        out["aliases"] = list(self.aliases)
        return out


@dataclass(frozen=True)
class ModelInfo:
    """A registered model name and a summary of its versions."""

    name: str
    description: str | None
    created: datetime
    latest_version: int | None
    versions: int
    aliases: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (timestamps as ISO 8601)."""
        out = asdict(self)
        out["created"] = self.created.isoformat()
        return out


@dataclass(frozen=True)
class AliasEvent:
    """One change of an alias: a promotion or a rollback, when and by whom."""

    name: str
    alias: str
    version: int
    action: str  # "promote" or "rollback"
    actor: str | None
    created: datetime
    undone: bool = False  # a promotion later rolled back

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (timestamps as ISO 8601)."""
        out = asdict(self)
        out["created"] = self.created.isoformat()
        return out


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split `NAME`, `NAME:VERSION` or `NAME@ALIAS` into (name, version or None, alias or None)."""
    if not isinstance(ref, str) or not ref:
        raise RegistryError("empty model reference: use NAME, NAME:VERSION or NAME@ALIAS")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        check_model_name(name)
        if alias != LATEST:
            _check_alias(alias)
        return name, None, alias
    if ":" in ref:
        name, raw = ref.split(":", 1)
        check_model_name(name)
        return name, _parse_version(raw, ref), None
    return check_model_name(ref), None, None


def _parse_version(raw: str, ref: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise RegistryError(
            f"bad version in {ref!r}: a version is a whole number >= 1 (e.g. {ref.split(':')[0]}:3)"
        )
    return int(raw)


def _check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: use {', '.join(STAGES)} or a lower-case name matching "
            f"{ALIAS_RE.pattern} (e.g. 'canary')"
        )
    return alias


def default_registry_url() -> str:
    """`$SHIPYARD_REGISTRY_URL`, or the SQLite file `$SHIPYARD_HOME/registry.db`."""
    return os.environ.get("SHIPYARD_REGISTRY_URL") or f"sqlite:///{shipyard_home() / 'registry.db'}"


def registry_database_url(url: str | None = None) -> str:
    """The SQLAlchemy URL the registry uses for `url` (default: `default_registry_url()`), with
    `postgresql://` mapped to the psycopg (v3) driver; other tools (tuning studies) share it."""
    return _normalise_url(url or default_registry_url())


# ----------------------------------------------------------------------------------- registry


class Registry:
    """Named, versioned packages in a SQL database, their files in an `ArtifactStore`.

    url: SQLAlchemy URL (default `$SHIPYARD_REGISTRY_URL`, else SQLite in `$SHIPYARD_HOME`);
    `postgresql://` URLs use the psycopg (v3) driver. store: an ArtifactStore or its root
    (default `$SHIPYARD_ARTIFACT_ROOT`, else `$SHIPYARD_HOME/artifacts`).
    """

    def __init__(
        self, url: str | None = None, store: ArtifactStore | str | os.PathLike[str] | None = None
    ) -> None:
        self.url = _normalise_url(url or default_registry_url())
        self.store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        self._engine = _make_engine(self.url)
        self._is_postgres = self._engine.dialect.name == "postgresql"
        try:
            self._open_schema()
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        shown = make_url(self.url).render_as_string(hide_password=True)
        return f"Registry({shown!r}, store={self.store.root!r})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()

    # ------------------------------------------------------------------------------ schema

    def _open_schema(self) -> None:
        """Create a fresh schema, or upgrade an older one step by step, in one transaction."""
        for attempt in range(_RETRIES):
            try:
                with self._engine.begin() as conn:
                    if self._is_postgres:
                        conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
                    self._create_or_upgrade(conn)
                return
            except OperationalError as exc:
                if not _is_busy(exc) or attempt == _RETRIES - 1:
                    raise RegistryError(f"cannot open registry {self!r}: {_one_line(exc)}") from exc
                _backoff(attempt)

    def _create_or_upgrade(self, conn: Connection) -> None:
        tables = set(inspect(conn).get_table_names())
        if "schema_version" not in tables:
            if "models" in tables:
                raise RegistryError(
                    f"{self!r}: the database has a 'models' table but no 'schema_version'; it "
                    "is not a shipyard registry. Point SHIPYARD_REGISTRY_URL at another database"
                )
            Base.metadata.create_all(conn)
            conn.execute(insert(SchemaVersionRow).values(id=1, version=SCHEMA_VERSION))
            return
        found = conn.execute(select(func.max(SchemaVersionRow.version))).scalar()
        current = int(found or 0)
        if current > SCHEMA_VERSION:
            raise RegistryError(
                f"{self!r}: schema version {current} was written by a newer shipyard (this one "
                f"reads up to {SCHEMA_VERSION}); upgrade shipyard"
            )
        if current < 1:
            raise RegistryError(f"{self!r}: schema_version table is empty; the database is damaged")
        if current == SCHEMA_VERSION:
            return
        while current < SCHEMA_VERSION:
            MIGRATIONS[current](conn)
            current += 1
        Base.metadata.create_all(conn)  # tables introduced by newer versions
        conn.execute(delete(SchemaVersionRow))
        conn.execute(insert(SchemaVersionRow).values(id=1, version=current))

    def schema_version(self) -> int:
        """The schema version of the open database (always SCHEMA_VERSION after opening)."""
        with self._session() as s:
            return int(s.scalar(select(func.max(SchemaVersionRow.version))) or 0)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as s, s.begin():
            yield s

    # ---------------------------------------------------------------------------- register

    def register(
        self,
        package_dir: str | os.PathLike[str],
        *,
        name: str | None = None,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        public_key: Any = None,
    ) -> ModelVersion:
        """Verify a package, upload it as the next version of `name` (default: its manifest name).

        public_key: when given, manifest.sig must be a valid signature by it (see
        `verify_package`). If verification or the upload fails, nothing is recorded.
        """
        src = Path(package_dir)
        if not src.is_dir():
            raise RegistryError(
                f"{src}: not a package directory (run `shipyard package RUN_DIR` first)"
            )
        manifest = verify_package(src, public_key=public_key)
        digest = manifest_sha256(src)
        model_name = check_model_name(name if name is not None else str(manifest.name))
        clean_tags = _check_tags(tags or {})
        version, created_model = self._reserve_version(model_name, description)
        try:
            uri = self.store.upload(src, model_name, version)
        except BaseException:
            self._release_version(model_name, version, created_model)
            raise
        try:
            with self._session() as s:
                model = self._model(s, model_name)
                s.add(
                    VersionRow(
                        model_id=model.id,
                        version=version,
                        artifact_uri=uri,
                        manifest_sha256=digest,
                        task=_str_or_none(getattr(manifest, "task", None)),
                        metrics=_json_field(getattr(manifest, "metrics", None)),
                        lineage=_json_field(getattr(manifest, "lineage", None)),
                        tags=clean_tags,
                        description=description,
                        created=_now(),
                        source_name=_str_or_none(getattr(manifest, "name", None)),
                        source_version=_str_or_none(getattr(manifest, "version", None)),
                    )
                )
        except BaseException:
            with suppress(Exception):
                self.store.delete(uri)
            self._release_version(model_name, version, created_model)
            raise
        return self.get(f"{model_name}:{version}")

    def _reserve_version(self, name: str, description: str | None) -> tuple[int, bool]:
        """Hand out the next version number of `name` (creating the model); retried on conflict."""
        for attempt in range(_RETRIES):
            try:
                with self._session() as s:
                    model = s.scalar(
                        select(ModelRow).where(ModelRow.name == name).with_for_update()
                    )
                    created = model is None
                    if model is None:
                        model = ModelRow(
                            name=name, description=description, created=_now(), last_version=0
                        )
                        s.add(model)
                        s.flush()
                    top = s.scalar(
                        select(func.max(VersionRow.version)).where(VersionRow.model_id == model.id)
                    )
                    version = max(model.last_version or 0, top or 0) + 1
                    model.last_version = version
                return version, created
            except (IntegrityError, OperationalError) as exc:
                if isinstance(exc, OperationalError) and not _is_busy(exc):
                    raise RegistryError(f"registry {self!r}: {_one_line(exc)}") from exc
                _backoff(attempt)
        raise RegistryError(
            f"could not reserve a version of {name!r} after {_RETRIES} attempts: the registry "
            "is too busy; try again"
        )

    def _release_version(self, name: str, version: int, created_model: bool) -> None:
        """Undo a reservation after a failed upload (only if nobody reserved a later one)."""
        with suppress(Exception), self._session() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
            if model is None or model.last_version != version:
                return
            model.last_version = version - 1
            if created_model and version == 1:
                has_rows = s.scalar(
                    select(func.count(VersionRow.id)).where(VersionRow.model_id == model.id)
                )
                if not has_rows:
                    s.delete(model)

    # ------------------------------------------------------------------------------ queries

    def list_models(self) -> list[ModelInfo]:
        """Every model name with its latest version, version count and aliases, sorted by name."""
        with self._session() as s:
            models = s.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            stats = {
                mid: (top, n)
                for mid, top, n in s.execute(
                    select(
                        VersionRow.model_id, func.max(VersionRow.version), func.count(VersionRow.id)
                    ).group_by(VersionRow.model_id)
                ).all()
            }
            aliases: dict[int, dict[str, int]] = {}
            for row in s.scalars(select(AliasRow).order_by(AliasRow.alias)):
                aliases.setdefault(row.model_id, {})[row.alias] = row.version
            return [
                ModelInfo(
                    name=m.name,
                    description=m.description,
                    created=m.created,
                    latest_version=stats.get(m.id, (None, 0))[0],
                    versions=stats.get(m.id, (None, 0))[1],
                    aliases=aliases.get(m.id, {}),
                )
                for m in models
            ]

    def list_versions(self, name: str) -> list[ModelVersion]:
        """All versions of `name`, oldest first."""
        with self._session() as s:
            model = self._model(s, check_model_name(name))
            rows = s.scalars(
                select(VersionRow)
                .where(VersionRow.model_id == model.id)
                .order_by(VersionRow.version)
            ).all()
            aliases = self._aliases_by_version(s, model.id)
            return [_snapshot(model.name, r, aliases.get(r.version, ())) for r in rows]

    def get(self, ref: str) -> ModelVersion:
        """Look up `NAME` (latest), `NAME:VERSION` or `NAME@ALIAS`."""
        name, version, alias = parse_ref(ref)
        with self._session() as s:
            model = self._model(s, name)
            row = self._version_row(s, model, version, alias)
            aliases = self._aliases_by_version(s, model.id)
            return _snapshot(model.name, row, aliases.get(row.version, ()))

    def aliases(self, name: str) -> dict[str, int]:
        """Current aliases of `name` as {alias: version}."""
        with self._session() as s:
            model = self._model(s, check_model_name(name))
            rows = s.scalars(select(AliasRow).where(AliasRow.model_id == model.id)).all()
            return {r.alias: r.version for r in sorted(rows, key=lambda r: r.alias)}

    # ------------------------------------------------------------------------------ aliases

    def promote(
        self, name: str, version: int, alias: str, *, actor: str | None = None
    ) -> ModelVersion:
        """Point `alias` (e.g. `production`) of `name` at `version`; the old target is kept.

        actor: who asked (an API key's name, a user name); recorded in the alias history.
        """
        _check_alias(alias)
        if alias == LATEST:
            raise RegistryError(
                f"alias '{LATEST}' is reserved (it always means the newest version); choose another"
            )
        with self._session() as s:
            model = self._model(s, check_model_name(name), lock=True)
            self._version_row(s, model, int(version), None)
            row = s.scalar(
                select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.alias == alias)
            )
            if row is None or row.version != version:
                if row is None:
                    s.add(AliasRow(model_id=model.id, alias=alias, version=version, updated=_now()))
                else:
                    row.version, row.updated = version, _now()
                s.add(
                    AliasHistoryRow(
                        model_id=model.id,
                        alias=alias,
                        version=version,
                        created=_now(),
                        actor=_actor(actor),
                        action="promote",
                    )
                )
        return self.get(f"{name}:{version}")

    def rollback(
        self, name: str, alias: str = "production", *, actor: str | None = None
    ) -> ModelVersion:
        """Point `alias` back at the version it pointed to before its latest promotion.

        actor: who asked; recorded in the alias history.
        """
        _check_alias(alias)
        with self._session() as s:
            model = self._model(s, check_model_name(name), lock=True)
            current = s.scalar(
                select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.alias == alias)
            )
            stack = list(
                s.scalars(
                    select(AliasHistoryRow)
                    .where(
                        AliasHistoryRow.model_id == model.id,
                        AliasHistoryRow.alias == alias,
                        AliasHistoryRow.action == "promote",
                        AliasHistoryRow.undone.is_(False),
                    )
                    .order_by(AliasHistoryRow.id)
                )
            )
            if current is not None and stack and stack[-1].version == current.version:
                stack.pop().undone = True
            if not stack:
                if current is None:
                    raise RegistryError(
                        f"model {name!r} has no alias {alias!r} and no history for it; promote a "
                        f"version first: shipyard models promote {name}:VERSION --to {alias}"
                    )
                raise RegistryError(
                    f"alias {alias!r} of {name!r} has no earlier target to roll back to (it points "
                    f"to version {current.version}); use promote to choose a version"
                )
            target = stack[-1].version
            if current is None:
                s.add(AliasRow(model_id=model.id, alias=alias, version=target, updated=_now()))
            else:
                current.version, current.updated = target, _now()
            s.add(
                AliasHistoryRow(
                    model_id=model.id,
                    alias=alias,
                    version=target,
                    created=_now(),
                    actor=_actor(actor),
                    action="rollback",
                )
            )
        return self.get(f"{name}:{target}")

    def history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every promotion and rollback of `name`'s aliases (or of one alias), newest first."""
        if alias is not None:
            _check_alias(alias)
        with self._session() as s:
            model = self._model(s, check_model_name(name))
            query = select(AliasHistoryRow).where(AliasHistoryRow.model_id == model.id)
            if alias is not None:
                query = query.where(AliasHistoryRow.alias == alias)
            rows = s.scalars(query.order_by(AliasHistoryRow.id.desc())).all()
            return [
                AliasEvent(
                    name=model.name,
                    alias=r.alias,
                    version=r.version,
                    action=r.action or "promote",  # None only in a hand-edited database
                    actor=r.actor,
                    created=r.created,
                    undone=bool(r.undone),
                )
                for r in rows
            ]

    # ------------------------------------------------------------------------------- delete

    def delete(self, name: str, version: int, force: bool = False) -> ModelVersion:
        """Delete one version and its artifact; refused while an alias points to it, unless `force`.

        With `force`, aliases pointing to it are removed (and it leaves their rollback history).
        Version numbers are never reused.
        """
        with self._session() as s:
            model = self._model(s, check_model_name(name), lock=True)
            row = self._version_row(s, model, int(version), None)
            pointing = sorted(
                s.scalars(
                    select(AliasRow.alias).where(
                        AliasRow.model_id == model.id, AliasRow.version == row.version
                    )
                )
            )
            if pointing and not force:
                shown = ", ".join(pointing)
                raise RegistryError(
                    f"{name}:{version} is the target of alias {shown}; promote another version "
                    f"to {pointing[0]} first (shipyard models promote {name}:N --to {pointing[0]}) "
                    "or delete with --force"
                )
            self.store.exists(row.artifact_uri)  # refuses a URI outside this store before deleting
            snapshot = _snapshot(model.name, row, tuple(pointing))
            for stmt in (
                delete(AliasRow).where(
                    AliasRow.model_id == model.id, AliasRow.version == row.version
                ),
                delete(AliasHistoryRow).where(
                    AliasHistoryRow.model_id == model.id, AliasHistoryRow.version == row.version
                ),
            ):
                s.execute(stmt)
            s.delete(row)
        try:
            self.store.delete(snapshot.artifact_uri)
        except Exception as exc:
            raise RegistryError(
                f"{snapshot.ref} was removed from the registry but its artifact "
                f"{snapshot.artifact_uri} could not be deleted ({exc}); remove it by hand"
            ) from exc
        return snapshot

    # -------------------------------------------------------------------------- pull/resolve

    def pull(self, ref: str, dest_dir: str | os.PathLike[str], *, public_key: Any = None) -> Path:
        """Download `ref` into the new directory `dest_dir`, verified; returns the package path.

        Files land in a temporary directory and are renamed into place only after every hash
        matches, so a failed pull leaves nothing behind.
        """
        mv = self.get(ref)
        dest = self.store.download(mv.artifact_uri, dest_dir, manifest_sha256=mv.manifest_sha256)
        try:
            _verify_package(dest, mv, public_key)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return dest

    def resolve_local(self, ref: str, *, public_key: Any = None) -> Path:
        """A verified local package directory for `ref`, for the server to load.

        A local store's own directory is verified in place; a remote artifact is downloaded once
        into `$SHIPYARD_HOME/cache/registry/NAME/VERSION-DIGEST` and re-verified on later calls.
        """
        mv = self.get(ref)
        local = self.store.local_path(mv.artifact_uri)
        if local is not None:
            if not local.is_dir():
                raise RegistryError(
                    f"{mv.ref}: artifact {mv.artifact_uri} is missing from the store; pull it from "
                    "a backup or delete the version"
                )
            _verify_package(local, mv, public_key)
            return local
        cached = (
            shipyard_home()
            / "cache"
            / "registry"
            / mv.name
            / f"{mv.version}-{mv.manifest_sha256[:16]}"
        )
        if cached.is_dir():
            try:
                _verify_package(cached, mv, public_key)
                return cached
            except (RegistryError, PackageError):
                shutil.rmtree(cached, ignore_errors=True)
        try:
            return self.pull(mv.ref, cached, public_key=public_key)
        except RegistryError:
            # another process may have filled the cache first
            if cached.is_dir() and any(cached.iterdir()):
                _verify_package(cached, mv, public_key)
                return cached
            raise

    # ------------------------------------------------------------------------------ helpers

    def _model(self, s: Session, name: str, *, lock: bool = False) -> ModelRow:
        query = select(ModelRow).where(ModelRow.name == name)
        model = s.scalar(query.with_for_update() if lock else query)
        if model is None:
            names = list(s.scalars(select(ModelRow.name).order_by(ModelRow.name)))
            raise RegistryError(_unknown_name_message(name, names))
        return model

    def _version_row(
        self, s: Session, model: ModelRow, version: int | None, alias: str | None
    ) -> VersionRow:
        if alias is not None and alias != LATEST:
            arow = s.scalar(
                select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.alias == alias)
            )
            if arow is None:
                known = sorted(
                    s.scalars(select(AliasRow.alias).where(AliasRow.model_id == model.id))
                )
                hint = f"its aliases: {', '.join(known)}" if known else "it has no aliases yet"
                raise RegistryError(
                    f"model {model.name!r} has no alias {alias!r} ({hint}); set one with "
                    f"shipyard models promote {model.name}:VERSION --to {alias}"
                )
            version = arow.version
        query = select(VersionRow).where(VersionRow.model_id == model.id)
        if version is None:
            row = s.scalar(query.order_by(VersionRow.version.desc()).limit(1))
        else:
            row = s.scalar(query.where(VersionRow.version == version))
        if row is None:
            existing = list(
                s.scalars(
                    select(VersionRow.version)
                    .where(VersionRow.model_id == model.id)
                    .order_by(VersionRow.version)
                )
            )
            if version is None:
                raise RegistryError(f"model {model.name!r} has no versions; register a package")
            shown = ", ".join(map(str, existing)) if existing else "none"
            raise RegistryError(
                f"model {model.name!r} has no version {version}; existing versions: {shown}"
            )
        return row

    def _aliases_by_version(self, s: Session, model_id: int) -> dict[int, tuple[str, ...]]:
        out: dict[int, list[str]] = {}
        for row in s.scalars(
            select(AliasRow).where(AliasRow.model_id == model_id).order_by(AliasRow.alias)
        ):
            out.setdefault(row.version, []).append(row.alias)
        return {v: tuple(a) for v, a in out.items()}


# ---------------------------------------------------------------------------- module helpers


def _normalise_url(url: str) -> str:
    # Our extra installs psycopg (v3); SQLAlchemy's bare `postgresql://` means psycopg2.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise RegistryError(
            f"invalid registry URL {url!r}: {exc}; e.g. sqlite:////path/registry.db or "
            "postgresql://user:pass@host:5432/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # take the write lock up front: read-then-write transactions cannot deadlock
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        raise RegistryError(
            f"registry URL {parsed.render_as_string(hide_password=True)!r} needs a database "
            f"driver ({exc}); pip install 'shipyard[postgres]'"
        ) from None


def _is_busy(exc: OperationalError) -> bool:
    message = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return any(word in message for word in ("locked", "busy", "deadlock", "could not serialize"))


def _backoff(attempt: int) -> None:
    time.sleep(min(0.5, 0.01 * 2**attempt) * (0.5 + random.random()))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _unknown_name_message(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    close += [n for n in names if n.lower() == name.lower() and n not in close]
    message = f"no model named {name!r} in the registry"
    if close:
        message += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    elif names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        message += f"; registered models: {shown}"
    else:
        message += "; it is empty (register one: shipyard models register PACKAGE_DIR)"
    return message


def _check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not _TAG_KEY_RE.fullmatch(key):
            raise RegistryError(
                f"invalid tag key {key!r}: use 1-64 letters, digits, '_', '.' or '-' "
                "(e.g. team=vision)"
            )
        out[key] = str(value)
        if len(out[key]) > 512:
            raise RegistryError(f"tag {key!r} is longer than 512 characters")
    return out


def _actor(actor: str | None) -> str | None:
    if actor is None:
        return None
    clean = " ".join(str(actor).split())[:128]
    return clean or None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_field(value: Any) -> dict[str, Any] | None:
    """A manifest section as plain JSON data (pydantic models dumped, NaN/inf become null)."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    clean = _finite(value)
    return clean if isinstance(clean, dict) else {"value": clean}


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    if hasattr(value, "model_dump"):
        return _finite(value.model_dump(mode="json"))
    return str(value)


def _snapshot(name: str, row: VersionRow, aliases: tuple[str, ...]) -> ModelVersion:
    return ModelVersion(
        name=name,
        version=row.version,
        artifact_uri=row.artifact_uri,
        manifest_sha256=row.manifest_sha256,
        task=row.task,
        created=row.created,
        metrics=row.metrics,
        lineage=row.lineage,
        tags=dict(row.tags or {}),
        description=row.description,
        source_name=row.source_name,
        source_version=row.source_version,
        aliases=aliases,
    )


def _verify_package(path: Path, mv: ModelVersion, public_key: Any = None) -> None:
    """Check a local copy: manifest digest as registered, then every file against the manifest."""
    if not (path / MANIFEST).is_file():
        raise RegistryError(f"{mv.ref}: {path} has no {MANIFEST}; the artifact is incomplete")
    got = manifest_sha256(path)
    if got != mv.manifest_sha256:
        raise RegistryError(
            f"{mv.ref}: manifest.json at {path} has SHA-256 {got[:16]}..., the registry recorded "
            f"{mv.manifest_sha256[:16]}...; the artifact was modified"
        )
    verify_package(path, public_key=public_key)
