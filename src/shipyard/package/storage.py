"""Artifact storage for the registry: package directories under `ROOT/NAME/VERSION/`, via fsspec.

The root is a local folder (default `$SHIPYARD_HOME/artifacts`) or an object-store URL such as
`s3://bucket/prefix` (needs the `registry-s3` extra). Every byte that goes up or comes down is
checked against the package manifest: each file's hash (BLAKE3 or SHA-256, as its entry names)
and size, hashed while it is copied and hashed again where it landed, so a corrupt or tampered
artifact is refused, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from shipyard.errors import RegistryError
from shipyard.package.files import MANIFEST, SIGNATURE
from shipyard.package.manifest import HASH_ALGORITHMS, HashAlgorithm, Hasher

# Names and versions become path segments in the store: this pattern admits no separator and no
# leading dot, so `..`, `a/b` or an absolute path can never reach the filesystem.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


def shipyard_home() -> Path:
    """`$SHIPYARD_HOME`, or `~/.shipyard` when unset."""
    return Path(os.environ.get("SHIPYARD_HOME") or Path.home() / ".shipyard").expanduser()


def default_artifact_root() -> str:
    """`$SHIPYARD_ARTIFACT_ROOT`, or the local folder `$SHIPYARD_HOME/artifacts`."""
    return os.environ.get("SHIPYARD_ARTIFACT_ROOT") or str(shipyard_home() / "artifacts")


def check_model_name(name: str) -> str:
    """Return `name` if it is a valid model name, else raise RegistryError with the rules."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise RegistryError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (no '/', no '..'); e.g. 'digits-mlp'"
        )
    return name


@dataclass(frozen=True)
class _Expected:
    digest: str
    size: int
    algorithm: HashAlgorithm = "sha256"


class ArtifactStore:
    """Package directories stored under `root/NAME/VERSION/`; `root` is a local path or fsspec URL.

    For `s3://` roots the endpoint comes from `SHIPYARD_S3_ENDPOINT_URL` (else botocore's usual
    `AWS_ENDPOINT_URL`), credentials and region from the standard AWS environment variables.
    `storage_options` are passed to the fsspec filesystem and override those defaults.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        raw = str(root) if root is not None else default_artifact_root()
        self._options = dict(storage_options or {})
        self.fs, path = _filesystem(raw, self._options)
        self._root_path = path.rstrip("/") or "/"
        self.root = self.fs.unstrip_protocol(self._root_path) if not self.is_local else path
        if self.is_local:
            Path(self._root_path).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    @property
    def is_local(self) -> bool:
        """True when artifacts live on this machine's filesystem."""
        return _is_local(self.fs)

    # ----------------------------------------------------------------------------------- naming

    def uri_for(self, name: str, version: int) -> str:
        """The URI that `upload(..., name, version)` writes to."""
        check_model_name(name)
        if not isinstance(version, int) or version < 1:
            raise RegistryError(f"invalid version {version!r}: versions are integers >= 1")
        return self.fs.unstrip_protocol(f"{self._root_path}/{name}/{version}")

    def local_path(self, uri: str) -> Path | None:
        """The directory behind `uri` when this store is local, else None."""
        if not self.is_local:
            return None
        return Path(self._path_of(uri))

    def _path_of(self, uri: str) -> str:
        """Map a URI of this store to a filesystem path; refuse URIs outside the store root."""
        path = self.fs._strip_protocol(uri).rstrip("/")
        root = self._root_path.rstrip("/")
        parts = PurePosixPath(path).parts
        if not path.startswith(root + "/") or ".." in parts:
            raise RegistryError(
                f"artifact URI {uri!r} is not inside this store ({self.root}); set "
                "SHIPYARD_ARTIFACT_ROOT to the store the registry was written with"
            )
        return str(path)

    # ---------------------------------------------------------------------------------- queries

    def exists(self, uri: str) -> bool:
        """True when an artifact (its manifest.json) is present at `uri`."""
        path = self._path_of(uri)
        self._invalidate(path)
        try:
            return bool(self.fs.exists(f"{path}/{MANIFEST}"))
        except OSError as exc:
            raise RegistryError(f"cannot reach {uri}: {_describe(exc)}") from exc

    # ---------------------------------------------------------------------------------- upload

    def upload(self, package_dir: str | os.PathLike[str], name: str, version: int) -> str:
        """Copy a package directory to `root/NAME/VERSION/` and return its URI.

        Each file is hashed as it is read and again after it is written; any mismatch with the
        manifest removes what was written and raises RegistryError. Stale leftovers of an
        earlier interrupted upload at the same place are cleared first.
        """
        src = Path(package_dir)
        manifest_bytes = _read_manifest_bytes(src)
        expected = _expected_files(manifest_bytes, where=str(src / MANIFEST))
        uri = self.uri_for(name, version)
        dest = self._path_of(uri)
        try:
            self._remove(dest)
            for rel, want in expected.items():
                self._put_checked(src / rel, f"{dest}/{rel}", want, rel)
            if (src / SIGNATURE).is_file():
                sig = (src / SIGNATURE).read_bytes()
                self._put_bytes_checked(sig, f"{dest}/{SIGNATURE}", SIGNATURE)
            # manifest last: an artifact without manifest.json is an unfinished upload
            self._put_bytes_checked(manifest_bytes, f"{dest}/{MANIFEST}", MANIFEST)
        except BaseException as exc:
            with suppress(Exception):
                self._remove(dest)
            if isinstance(exc, OSError):
                raise RegistryError(f"upload to {uri} failed: {_describe(exc)}") from exc
            raise
        return uri

    def _put_checked(self, src: Path, dest: str, want: _Expected, rel: str) -> None:
        if not src.is_file():
            raise RegistryError(f"{src}: listed in the manifest but missing; re-create the package")
        digest = Hasher(want.algorithm)
        size = 0
        with src.open("rb") as fin, self.fs.open(dest, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                fout.write(chunk)
        got = _Expected(digest.hexdigest(), size, want.algorithm)
        _compare(rel, got, want, "local package file")
        _compare(rel, self._hash_remote(dest, want.algorithm), want, "uploaded copy")

    def _put_bytes_checked(self, data: bytes, dest: str, rel: str) -> None:
        want = _Expected(hashlib.sha256(data).hexdigest(), len(data))
        with self.fs.open(dest, "wb") as fout:
            fout.write(data)
        _compare(rel, self._hash_remote(dest), want, "uploaded copy")

    def _hash_remote(self, path: str, algorithm: HashAlgorithm = "sha256") -> _Expected:
        self._invalidate(path)
        digest = Hasher(algorithm)
        size = 0
        with self.fs.open(path, "rb") as fin:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return _Expected(digest.hexdigest(), size, algorithm)

    # -------------------------------------------------------------------------------- download

    def download(
        self,
        uri: str,
        dest: str | os.PathLike[str],
        *,
        manifest_sha256: str | None = None,
    ) -> Path:
        """Download the artifact at `uri` into the new directory `dest` and return it.

        `dest` must not exist (or be an empty directory). Files land in a temporary sibling
        directory, are checked against the manifest (and the manifest against `manifest_sha256`
        when given), and only then is the directory renamed into place: a failed download
        leaves nothing behind.
        """
        src = self._path_of(uri)
        target = Path(dest)
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise RegistryError(
                f"{target}: already exists and is not empty; choose a new directory"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        )
        try:
            self._invalidate(src)
            if not self.fs.exists(f"{src}/{MANIFEST}"):
                raise RegistryError(
                    f"artifact {uri} is missing from the store (no {MANIFEST}); it was deleted or "
                    "the upload never finished"
                )
            manifest_bytes = self._get_bytes(f"{src}/{MANIFEST}")
            got = hashlib.sha256(manifest_bytes).hexdigest()
            if manifest_sha256 is not None and got != manifest_sha256:
                raise RegistryError(
                    f"artifact {uri}: {MANIFEST} has SHA-256 {got[:16]}..., the registry recorded "
                    f"{manifest_sha256[:16]}...; the stored artifact was modified"
                )
            expected = _expected_files(manifest_bytes, where=f"{uri}/{MANIFEST}")
            for rel, want in expected.items():
                self._get_checked(f"{src}/{rel}", tmp / rel, want, f"{uri}/{rel}")
            if self.fs.exists(f"{src}/{SIGNATURE}"):
                (tmp / SIGNATURE).write_bytes(self._get_bytes(f"{src}/{SIGNATURE}"))
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            _verify_written(tmp, expected)
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise RegistryError(f"download of {uri} failed: {_describe(exc)}") from exc
            raise
        return target

    def _get_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as fin:
            data: bytes = fin.read()
        return data

    def _get_checked(self, src: str, dest: Path, want: _Expected, label: str) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = Hasher(want.algorithm)
        size = 0
        try:
            with self.fs.open(src, "rb") as fin, dest.open("wb") as fout:
                while chunk := fin.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    fout.write(chunk)
        except FileNotFoundError:
            raise RegistryError(
                f"{label}: listed in the manifest but missing from the store"
            ) from None
        _compare(label, _Expected(digest.hexdigest(), size, want.algorithm), want, "stored file")

    # ---------------------------------------------------------------------------------- delete

    def delete(self, uri: str) -> None:
        """Remove the artifact at `uri` (no error if it is already gone)."""
        path = self._path_of(uri)
        try:
            self._remove(path)
        except OSError as exc:
            raise RegistryError(f"cannot delete {uri}: {_describe(exc)}") from exc

    def _remove(self, path: str) -> None:
        self._invalidate(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self._invalidate(path)
        if self.is_local:
            # drop the now-empty NAME/ folder; harmless if other versions remain
            with suppress(OSError):
                Path(path).parent.rmdir()

    def _invalidate(self, path: str) -> None:
        with suppress(Exception):
            self.fs.invalidate_cache(path)


# ---------------------------------------------------------------------------------- helpers


def _describe(exc: OSError) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _filesystem(root: str, options: dict[str, Any]) -> tuple[Any, str]:
    """An fsspec filesystem and a path for `root`, with S3 settings taken from the environment."""
    import fsspec

    protocol = root.split("://", 1)[0] if "://" in root else "file"
    opts = dict(options)
    if protocol in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise RegistryError(
                f"artifact root {root!r} needs s3fs: pip install 'shipyard[registry-s3]'"
            ) from None
        endpoint = os.environ.get("SHIPYARD_S3_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts:
            opts["endpoint_url"] = endpoint
        # a fresh instance: s3fs caches instances and listings across the whole process
        opts.setdefault("skip_instance_cache", True)
    elif protocol in ("file", "local"):
        root = str(Path(root.split("://", 1)[-1]).expanduser().resolve())
        opts.setdefault("auto_mkdir", True)
    try:
        fs, path = fsspec.core.url_to_fs(root, **opts)
    except (ImportError, ValueError) as exc:
        raise RegistryError(f"cannot open artifact store {root!r}: {exc}") from exc
    return fs, str(path)


def _read_manifest_bytes(package_dir: Path) -> bytes:
    path = package_dir / MANIFEST
    if not path.is_file():
        raise RegistryError(f"{package_dir}: not a package directory (no {MANIFEST})")
    return path.read_bytes()


def _expected_files(manifest_bytes: bytes, *, where: str) -> dict[str, _Expected]:
    """The `files` table of a manifest as {relative path: expected hash and size}, paths checked."""
    try:
        files = json.loads(manifest_bytes)["files"]
        out = {_safe_relpath(str(rel), where): _entry_hash(entry) for rel, entry in files.items()}
    except RegistryError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"{where}: not a valid package manifest ({exc})") from None
    if not out:
        raise RegistryError(f"{where}: the manifest lists no files")
    return out


def _entry_hash(entry: dict[str, Any]) -> _Expected:
    """The hash a manifest entry names (its key is the algorithm) and the file's size."""
    for algorithm in HASH_ALGORITHMS:
        if algorithm in entry:
            return _Expected(str(entry[algorithm]).lower(), int(entry["size"]), algorithm)
    raise KeyError(f"no hash ({' or '.join(HASH_ALGORITHMS)}) in a file entry")


def _safe_relpath(rel: str, where: str) -> str:
    parts = PurePosixPath(rel).parts
    if (
        not parts
        or rel.startswith("/")
        or "\\" in rel
        or any(p in ("", ".", "..") for p in parts)
        or rel in (MANIFEST, SIGNATURE)
    ):
        raise RegistryError(f"{where}: unsafe file name {rel!r} in the manifest")
    return "/".join(parts)


def _compare(label: str, got: _Expected, want: _Expected, what: str) -> None:
    if got.size != want.size:
        raise RegistryError(
            f"{label}: {what} is {got.size} bytes, the manifest says {want.size}; the artifact is "
            "corrupt or was modified"
        )
    if got.digest != want.digest:
        name = {"blake3": "BLAKE3", "sha256": "SHA-256"}[want.algorithm]
        raise RegistryError(
            f"{label}: {what} has {name} {got.digest[:16]}..., the manifest says "
            f"{want.digest[:16]}...; the artifact is corrupt or was modified"
        )


def _verify_written(root: Path, expected: dict[str, _Expected]) -> None:
    """Re-hash what was written locally (guards against a short or failed write)."""
    for rel, want in expected.items():
        _compare(rel, _hash_file(root / rel, want.algorithm), want, "downloaded copy")


def _hash_file(path: Path, algorithm: HashAlgorithm) -> _Expected:
    digest = Hasher(algorithm)
    size = 0
    with path.open("rb") as fin:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return _Expected(digest.hexdigest(), size, algorithm)
