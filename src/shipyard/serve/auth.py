"""API keys, scopes and per-key rate limits.

Keys look like `sy_<id>_<secret>`: `id` (8 hex characters) names the key in logs and in the keys
file; `secret` is 32 random bytes (urlsafe base64). The keys file (JSON, mode 0600) stores only
the id, name, scope, a random per-key salt and SHA-256(salt ‖ secret). A fast salted hash is
enough here because the secret has 256 bits of entropy: there is nothing to brute-force, unlike a
human password, and a slow KDF (scrypt) would add tens of milliseconds of CPU to every request.
Comparison is constant-time (`hmac.compare_digest`).

Scopes: `infer` (inference and model metadata) and `admin` (management API and /metrics; admin
implies infer). The server re-reads the keys file when it changes, so `shipyard api-keys revoke`
takes effect within a second without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from shipyard.fileio import atomic_write
from shipyard.serve.errors import Forbidden, RateLimited, Unauthorized
from shipyard.serve.settings import ServeError

log = logging.getLogger("shipyard.serve")

Scope = Literal["infer", "admin"]
SCOPES: tuple[str, ...] = ("infer", "admin")
_KEY = re.compile(r"^sy_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_FORMAT = 1


def default_keys_file() -> Path:
    """`$SHIPYARD_HOME/serve/keys.json` (SHIPYARD_HOME defaults to ~/.shipyard)."""
    home = os.environ.get("SHIPYARD_HOME") or str(Path.home() / ".shipyard")
    return Path(home) / "serve" / "keys.json"


@dataclass(frozen=True)
class ApiKey:
    """One stored key (never the secret itself)."""

    id: str
    name: str
    scope: str
    salt: str
    sha256: str
    created: str
    revoked: bool = False

    def allows(self, scope: str) -> bool:
        """True if this key may use routes that need `scope` (admin implies infer)."""
        return self.scope == "admin" or self.scope == scope

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: no salt, no hash."""
        return {
            "id": self.id,
            "name": self.name,
            "scope": self.scope,
            "created": self.created,
            "revoked": self.revoked,
        }


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


# ------------------------------------------------------------------------------ keys file


def read_keys(path: Path) -> list[ApiKey]:
    """The keys in a keys file; ServeError (one line) when it is missing or malformed."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise ServeError(
            f"{path}: keys file not found (create one with `shipyard api-keys add --scope infer`)"
        ) from None
    except OSError as exc:
        raise ServeError(f"{path}: cannot read the keys file ({exc.strerror})") from None
    try:
        data = json.loads(raw)
        if data.get("format") != _FORMAT or not isinstance(data.get("keys"), list):
            raise ValueError("expected {'format': 1, 'keys': [...]}")
        keys = [ApiKey(**k) for k in data["keys"]]
        for k in keys:
            if k.scope not in SCOPES or not re.fullmatch(r"[0-9a-f]{8}", k.id):
                raise ValueError(f"bad key record {k.id!r}")
    except (ValueError, TypeError, AttributeError) as exc:
        raise ServeError(f"{path}: malformed keys file ({exc})") from None
    return keys


def write_keys(path: Path, keys: list[ApiKey]) -> None:
    """Write the keys file atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": _FORMAT, "keys": [k.__dict__ for k in keys]}
    atomic_write(path, json.dumps(data, indent=2) + "\n", mode=0o600)


def add_key(path: Path, scope: str, name: str | None = None) -> tuple[str, ApiKey]:
    """Create a key with `scope`; returns (the key, shown once; its stored record)."""
    if scope not in SCOPES:
        raise ServeError(f"unknown scope {scope!r}; use one of: {', '.join(SCOPES)}")
    keys = read_keys(path) if path.exists() else []
    used = {k.id for k in keys}
    key_id = secrets.token_hex(4)
    while key_id in used:
        key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = ApiKey(
        id=key_id,
        name=name or f"{scope}-{key_id}",
        scope=scope,
        salt=salt,
        sha256=_digest(salt, secret),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_keys(path, [*keys, record])
    return f"sy_{key_id}_{secret}", record


def revoke_key(path: Path, key_id_or_name: str) -> ApiKey:
    """Mark a key revoked (by id or name); ServeError when no key matches."""
    keys = read_keys(path)
    matches = [k for k in keys if key_id_or_name in (k.id, k.name)]
    if len(matches) != 1:
        found = "no key" if not matches else f"{len(matches)} keys"
        raise ServeError(
            f"{found} with id or name {key_id_or_name!r} in {path}; see `shipyard api-keys list`"
        )
    target = matches[0]
    updated = [ApiKey(**{**k.__dict__, "revoked": True}) if k is target else k for k in keys]
    write_keys(path, updated)
    return ApiKey(**{**target.__dict__, "revoked": True})


# ------------------------------------------------------------------------------ checking


class KeyStore:
    """Checks bearer keys against a keys file, re-reading it (at most once a second) on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[str, ApiKey] = {}
        self._mtime = -1.0
        self._checked = 0.0
        self._reload(force=True)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users; chmod 600 it", path)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            if force:
                raise ServeError(f"{self.path}: keys file not found") from None
            return  # keep the last good keys
        if mtime == self._mtime and not force:
            return
        try:
            keys = read_keys(self.path)
        except ServeError:
            if force:
                raise
            log.error("keys file %s became unreadable; keeping the previous keys", self.path)
            return
        self._keys = {k.id: k for k in keys if not k.revoked}
        self._mtime = mtime

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key behind an `Authorization: Bearer ...` header; Unauthorized otherwise."""
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        match = _KEY.match(token.strip()) if scheme.lower() == "bearer" else None
        with self._lock:
            self._reload()
            record = self._keys.get(match.group(1)) if match else None
        if match is None or record is None:
            raise Unauthorized("invalid API key")
        if not hmac.compare_digest(_digest(record.salt, match.group(2)), record.sha256):
            raise Unauthorized("invalid API key")
        return record


def require_scope(key: ApiKey | None, scope: str) -> None:
    """Forbidden unless `key` (None: auth disabled) has `scope`."""
    if key is not None and not key.allows(scope):
        raise Forbidden(f"this API key has scope {key.scope!r}; the route needs {scope!r}")


class RateLimiter:
    """Token buckets per client (API key id): `rate` requests/s, up to `burst` at once."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate * 2)))
        self._buckets: dict[str, tuple[float, float]] = {}  # id → (tokens, last time)
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        """Take one token for `client`, or raise RateLimited with Retry-After (seconds)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > 100_000:  # forget idle clients rather than grow forever
                self._buckets.clear()
        wait = max(1, math.ceil((1.0 - tokens) / self.rate))
        raise RateLimited(
            f"rate limit of {self.rate:g} requests/s exceeded; retry in {wait}s",
            headers={"Retry-After": str(wait)},
        )
