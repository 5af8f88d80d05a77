"""The package format: `manifest.json` schema, file-name rules, hashing and verification.

A package is a flat directory with fixed file names:

    manifest.json       what the model is (this module's `Manifest`) and the hash + size of
                        every other file (BLAKE3 for new packages; SHA-256 in older ones)
    model.safetensors   the weights (backend "torch", the default)
    model.onnx          instead of the weights: an ONNX graph (backend "onnxruntime")
    tokenizer.json      optional: the tokenizer (token models)
    tokenizer_config.json  optional: an imported Hugging Face tokenizer's special tokens, EOS ids
                        and chat template (`shipyard.data.HFTokenizerConfig`)
    manifest.sig        optional: Ed25519 signature over the exact bytes of manifest.json

`verify_package` refuses anything that does not match the manifest: a changed, missing or extra
file, a symlink, a file name that could escape the directory, an unknown format version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import blake3
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from shipyard.config_base import Task
from shipyard.errors import PackageError

# The file names are files.py's; re-exported here because every reader of a manifest needs them.
from shipyard.package.files import MANIFEST as MANIFEST
from shipyard.package.files import ONNX_MODEL as ONNX_MODEL
from shipyard.package.files import RESERVED as RESERVED
from shipyard.package.files import SIGNATURE as SIGNATURE
from shipyard.package.files import TOKENIZER as TOKENIZER
from shipyard.package.files import TOKENIZER_CONFIG as TOKENIZER_CONFIG
from shipyard.package.files import WEIGHTS as WEIGHTS
from shipyard.package.signing import verify_signature

FORMAT_VERSION = 2  # 2: file entries may be hashed with BLAKE3 (1: SHA-256 only)
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is metadata; anything larger is not one of ours

HashAlgorithm = Literal["blake3", "sha256"]
HASH_ALGORITHMS: tuple[HashAlgorithm, ...] = ("blake3", "sha256")
DEFAULT_HASH: HashAlgorithm = "blake3"
Backend = Literal["torch", "onnxruntime"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Model):
    """One named input or output tensor (KServe V2 datatype; -1 is a dynamic dimension)."""

    name: str
    datatype: Literal["FP32", "FP16", "BF16", "INT64", "INT32", "BYTES", "BOOL"]
    shape: list[int]


class Signature(_Model):
    """The model's inputs and outputs as a server exposes them."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Architecture(_Model):
    """A registered model name (see `shipyard.models`) and its `model:` config section."""

    name: str
    config: dict[str, Any]


class ParentRef(_Model):
    """The package a derived package (quantized, pruned, exported...) was made from."""

    name: str
    version: str
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Lineage(BaseModel):
    """Where the weights came from; extra keys (`lineage_extra`) are kept as given."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    config_sha256: str
    data_fingerprint: str
    git_commit: str | None = None
    parent: ParentRef | None = None
    run_dir: str | None = None
    checkpoint_step: int | None = None
    shipyard_version: str
    torch_version: str


class Derivation(_Model):
    """How a child package was derived from its parent (e.g. method "quantize-int8")."""

    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class BaseRef(_Model):
    """The exact base model an adapter was trained on: its package's digests, or, for a run
    whose `model.path` was a Hugging Face checkpoint directory, that directory's source
    fingerprint (the one `shipyard import-hf` records in its package's lineage)."""

    name: str
    version: str
    manifest_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    weights_hash: str | None = Field(
        None,
        pattern=r"^(blake3|sha256):[0-9a-f]{64}$",
        description="ALGORITHM:HEX hash of the base's weights file, as its manifest lists it",
    )
    source_fingerprint: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="a Hugging Face checkpoint base: sha256 over its config.json and weights",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> BaseRef:
        package = self.manifest_sha256 is not None and self.weights_hash is not None
        partial = (self.manifest_sha256 is None) != (self.weights_hash is None)
        hf = self.source_fingerprint is not None
        if partial or package == hf:
            raise ValueError(
                "lora.base needs manifest_sha256 and weights_hash (a package base) or "
                "source_fingerprint (a Hugging Face checkpoint base), not both"
            )
        return self


class LoRASpec(_Model):
    """LoRA adapters stored unmerged beside their frozen base weights.

    Loading rebuilds the architecture, swaps `layers` (module paths) for LoRA layers of this rank
    and alpha, then loads the tensors (`<path>.lora_A` (rank, in), `<path>.lora_B` (out, rank)).
    An adapter is only valid on `base`: anything else refuses it.
    """

    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    layers: list[str] = Field(min_length=1)
    base: BaseRef


class Quantization(_Model):
    """Which Linear layers of a torch-backend model are stored as int8, and how.

    scheme "dynamic-int8": int8 weights with per-output-channel scales and zero points, run with
    PyTorch's dynamic quantized kernels; "weight-int8": int8 weights with per-output-channel
    scales, dequantized on the fly. Loading rebuilds the architecture by name and swaps these
    layers (module paths, e.g. "body.0") for their int8 versions before loading the tensors.
    """

    scheme: Literal["dynamic-int8", "weight-int8"]
    layers: list[str] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class FileEntry(_Model):
    """Hash and size of a file exactly as stored (the ciphertext when encrypted).

    The hash's key names its algorithm: `blake3` (new packages: tree-hashed, so one file is
    verified on every core at once) or `sha256` (packages written before BLAKE3; they keep
    loading). Large SHA-256 files also list the SHA-256 of each `chunk_size` piece, so loading
    can verify them on every core (one SHA-256 stream runs on one core only); the chunk hashes
    cover every byte, and the whole-file hash stays for tools that check files one by one.
    """

    blake3: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    chunk_size: int | None = Field(None, gt=0)
    chunks: list[str] | None = None

    @property
    def algorithm(self) -> HashAlgorithm:
        """The algorithm of this entry's hash."""
        return "blake3" if self.blake3 is not None else "sha256"

    @property
    def digest(self) -> str:
        """The entry's hex hash (of the algorithm `algorithm`)."""
        digest = self.blake3 if self.blake3 is not None else self.sha256
        assert digest is not None  # the validator guarantees one
        return digest

    @model_validator(mode="after")
    def _one_hash_and_chunks_cover_the_file(self) -> FileEntry:
        if (self.blake3 is None) == (self.sha256 is None):
            raise ValueError("a file entry needs exactly one hash: blake3 or sha256")
        if (self.chunk_size is None) != (self.chunks is None):
            raise ValueError("chunk_size and chunks go together")
        if self.chunks is not None and self.sha256 is None:
            raise ValueError("chunk hashes are SHA-256 only (BLAKE3 needs none)")
        if self.chunk_size is not None and self.chunks is not None:
            expected = -(-self.size // self.chunk_size)
            if len(self.chunks) != expected:
                raise ValueError(
                    f"{len(self.chunks)} chunk hashes for {self.size} bytes in chunks of "
                    f"{self.chunk_size} (expected {expected})"
                )
            if any(len(c) != 64 or c.strip("0123456789abcdef") for c in self.chunks):
                raise ValueError("chunk hashes must be 64 lowercase hex digits")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # only the entry's own hash is written; small SHA-256 files keep their two-field entry
        data: dict[str, Any] = handler(self)
        for key in ("blake3", "sha256", "chunk_size", "chunks"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class EncryptedFile(_Model):
    """Per-file encryption record: nonce prefix and the plaintext's hash (BLAKE3 or SHA-256, as
    its entry had) and size (and the plaintext entry's SHA-256 chunk size, so decrypting restores
    the original manifest exactly)."""

    nonce: str = Field(pattern=r"^[0-9a-f]{16}$")
    blake3: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    hash_chunk_size: int | None = Field(None, gt=0)

    @property
    def algorithm(self) -> HashAlgorithm:
        """The algorithm of the plaintext's hash."""
        return "blake3" if self.blake3 is not None else "sha256"

    @property
    def digest(self) -> str:
        """The plaintext's hex hash."""
        digest = self.blake3 if self.blake3 is not None else self.sha256
        assert digest is not None  # the validator guarantees one
        return digest

    @model_validator(mode="after")
    def _one_hash(self) -> EncryptedFile:
        if (self.blake3 is None) == (self.sha256 is None):
            raise ValueError("an encryption record needs exactly one hash: blake3 or sha256")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("blake3", "sha256", "hash_chunk_size"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Encryption(_Model):
    """Encryption at rest of some of the package's files (see `shipyard.package.security`)."""

    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    chunk_size: int = Field(gt=0)
    files: dict[str, EncryptedFile]


class Manifest(_Model):
    """The contents of manifest.json (format version 1 or 2; see `to_json`)."""

    format_version: Literal[1, 2] = 1
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    task: Task
    created: str
    architecture: Architecture
    signature: Signature
    data: dict[str, Any]
    preprocessing: dict[str, Any] | None = None
    labels: list[str] | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    lineage: Lineage
    config: dict[str, Any]
    derivation: Derivation | None = None
    backend: Backend = "torch"
    quantization: Quantization | None = None
    lora: LoRASpec | None = None
    encryption: Encryption | None = None
    files: dict[str, FileEntry]

    def to_json(self) -> str:
        """The manifest.json text (stable field order, so equal manifests give equal bytes).

        `backend` and `quantization` are written only when set, so plain packages keep the
        manifest they always had. The format version is the lowest that can hold the manifest:
        2 when any hash is BLAKE3 (so an older shipyard asks for an upgrade instead of calling
        it malformed), else 1 (SHA-256 packages stay readable by every version).
        """
        omit = {"backend"} if self.backend == "torch" else set()
        if self.quantization is None:
            omit.add("quantization")
        if self.lora is None:
            omit.add("lora")
        records = self.encryption.files.values() if self.encryption is not None else []
        uses_blake3 = any(e.blake3 is not None for e in self.files.values()) or any(
            r.blake3 is not None for r in records
        )
        version = 2 if uses_blake3 else 1
        manifest = (
            self
            if version == self.format_version
            else self.model_copy(update={"format_version": version})
        )
        return manifest.model_dump_json(indent=2, exclude=omit) + "\n"


# ------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in large chunks (hashlib releases the GIL while hashing)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


HASH_CHUNK = 16 << 20  # SHA-256 files above this get per-chunk hashes (parallel verification)


class Hasher:
    """One incremental hash of `algorithm`; BLAKE3 runs on every core (it drops the GIL).

    threads: BLAKE3's threads for each large update (None: one per core).
    """

    def __init__(self, algorithm: HashAlgorithm, *, threads: int | None = None) -> None:
        self.algorithm = algorithm
        self._hash: Any = (
            blake3.blake3(max_threads=threads or blake3.blake3.AUTO)
            if algorithm == "blake3"
            else hashlib.sha256()
        )

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        digest: str = self._hash.hexdigest()
        return digest


def hash_bytes(data: bytes | bytearray | memoryview, algorithm: HashAlgorithm) -> str:
    """Hex hash of bytes in memory."""
    hasher = Hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def digest_file(path: Path, algorithm: HashAlgorithm) -> str:
    """Hex hash of a whole file: BLAKE3 over a memory map on every core, SHA-256 streamed."""
    if algorithm == "sha256":
        return sha256_file(path)
    if path.stat().st_size == 0:  # an empty file cannot be memory-mapped
        return hash_bytes(b"", algorithm)
    digest: str = blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()
    return digest


def hash_file(
    path: Path,
    *,
    algorithm: HashAlgorithm = DEFAULT_HASH,
    chunk_size: int | Literal["auto"] | None = "auto",
) -> FileEntry:
    """The manifest entry of a file: size and hash (per-chunk too for large SHA-256 files).

    algorithm: "blake3" (the default) or "sha256" (what packages used before BLAKE3).
    chunk_size: SHA-256 only: "auto" = HASH_CHUNK; None = whole-file hash only.
    """
    if algorithm not in HASH_ALGORITHMS:
        raise PackageError(
            f"unknown hash algorithm {algorithm!r}; use one of {', '.join(HASH_ALGORITHMS)}"
        )
    size = path.stat().st_size
    if algorithm == "blake3":
        return FileEntry(blake3=digest_file(path, "blake3"), size=size)
    if chunk_size == "auto":
        chunk_size = HASH_CHUNK
    whole = hashlib.sha256()
    if chunk_size is None or size <= chunk_size:
        with path.open("rb") as fh:
            whole = hashlib.file_digest(fh, "sha256")
        return FileEntry(sha256=whole.hexdigest(), size=size)
    chunks = []
    with path.open("rb") as fh:
        while piece := fh.read(chunk_size):
            whole.update(piece)
            chunks.append(hashlib.sha256(piece).hexdigest())
    return FileEntry(sha256=whole.hexdigest(), size=size, chunk_size=chunk_size, chunks=chunks)


def _chunks_match(path: Path, entry: FileEntry, workers: int | None = None) -> bool:
    """Check every chunk hash, several chunks at a time (hashlib and pread release the GIL)."""
    assert entry.chunk_size is not None and entry.chunks is not None
    size, expected = entry.chunk_size, entry.chunks
    fd = os.open(path, os.O_RDONLY)
    try:

        def check(i: int) -> bool:
            piece = os.pread(fd, size, i * size)
            return hashlib.sha256(piece).hexdigest() == expected[i]

        n = workers or min(len(expected), os.cpu_count() or 1)
        if n <= 1:
            return all(check(i) for i in range(len(expected)))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="verify") as pool:
            return all(pool.map(check, range(len(expected))))
    finally:
        os.close(fd)


def mismatch_error(file: Path | str, algorithm: HashAlgorithm) -> PackageError:
    """The error for a file whose hash is not the manifest's."""
    name = {"blake3": "BLAKE3", "sha256": "SHA-256"}[algorithm]
    return PackageError(
        f"{file}: {name} hash does not match the manifest; the file was changed or corrupted "
        "(re-download or re-create the package)"
    )


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def manifest_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the manifest.json bytes: the package's digest (a package dir or its manifest)."""
    p = Path(path)
    file = p / MANIFEST if p.is_dir() else p
    try:
        return sha256_bytes(file.read_bytes())
    except OSError as exc:
        raise PackageError(f"{file}: cannot read the manifest ({exc.strerror})") from None


# ------------------------------------------------------------------------------------------
# reading and verifying


def check_file_name(name: str) -> None:
    """Refuse a package file name that is not a plain name inside the package directory."""
    bad = (
        not name
        or name.startswith(".")  # ".", "..", hidden files
        or any(c in name for c in "/\\\x00:")
        or os.path.isabs(name)
    )
    if bad:
        raise PackageError(
            f"{MANIFEST}: file name {name!r} is not allowed (package files are plain names, "
            "no '/', '..' or absolute paths)"
        )


def parse_manifest(raw: bytes, where: str = MANIFEST) -> Manifest:
    """Validate manifest.json bytes; PackageError for malformed JSON or an unknown format."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{where}: malformed manifest (not valid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise PackageError(f"{where}: malformed manifest (expected a JSON object)")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PackageError(f"{where}: malformed manifest (format_version missing or not a number)")
    if version > FORMAT_VERSION:
        raise PackageError(
            f"{where}: written by a newer shipyard (format {version}); upgrade shipyard "
            f"(this one reads formats 1 to {FORMAT_VERSION})"
        )
    if version < 1:
        raise PackageError(
            f"{where}: unknown format_version {version}; this shipyard reads 1 to {FORMAT_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PackageError(f"{where}: malformed manifest: {loc}: {first['msg']}{more}") from None
    for name in manifest.files:
        check_file_name(name)
        if name in RESERVED:
            raise PackageError(f"{where}: {name} cannot be listed under files")
    model_file = WEIGHTS if manifest.backend == "torch" else ONNX_MODEL
    if model_file not in manifest.files:
        raise PackageError(
            f"{where}: malformed manifest: files must list {model_file} (backend "
            f"{manifest.backend!r})"
        )
    if manifest.quantization is not None and manifest.backend != "torch":
        raise PackageError(
            f"{where}: malformed manifest: quantization describes torch layers, but the backend "
            f"is {manifest.backend!r}"
        )
    if manifest.encryption is not None:
        for name in manifest.encryption.files:
            if name not in manifest.files:
                raise PackageError(f"{where}: encryption lists {name}, which is not in files")
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> tuple[Manifest, bytes]:
    """The manifest of a package directory and its exact bytes, after the directory checks."""
    root = _check_directory(Path(path))
    file = root / MANIFEST
    try:
        size = file.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise PackageError(f"{file}: {size} bytes is too large for a manifest")
        raw = file.read_bytes()
    except OSError as exc:
        raise PackageError(f"{file}: cannot read ({exc.strerror})") from None
    manifest = parse_manifest(raw, str(file))
    _check_listing(root, manifest)
    return manifest, raw


def check_file(root: Path, name: str, entry: FileEntry, *, digest: str | None = None) -> None:
    """Size and hash of one package file against its manifest entry.

    digest: the file's hash (of the entry's algorithm) when the caller computed it already.
    """
    file = root / name
    size = file.stat().st_size
    if size != entry.size:
        raise PackageError(
            f"{file}: size {size} does not match the manifest ({entry.size}); the file was "
            "changed or truncated"
        )
    if digest is None and entry.chunks is not None:
        ok = _chunks_match(file, entry)
    else:
        ok = (digest or digest_file(file, entry.algorithm)) == entry.digest
    if not ok:
        raise mismatch_error(file, entry.algorithm)


def verify_package(
    path: str | os.PathLike[str], *, public_key: Any = None, skip: frozenset[str] = frozenset()
) -> Manifest:
    """Check a package directory against its manifest and return the manifest.

    Every listed file's size and hash (BLAKE3 or SHA-256, as its entry says) is checked
    (ciphertext for encrypted files, so no key is needed). public_key: an Ed25519 public key
    (PEM file path, PEM bytes or key object); when given, manifest.sig must be a valid signature
    by it. skip: names whose hash the caller checks itself (load_package hashes the weights while
    loading them).
    """
    root = Path(path)
    manifest, raw = read_manifest(root)
    if public_key is not None:
        verify_signature(root, public_key, manifest_bytes=raw)
    for name, entry in manifest.files.items():
        if name not in skip:
            check_file(root, name, entry)
    return manifest


def _check_directory(root: Path) -> Path:
    if root.is_symlink():
        raise PackageError(f"{root}: is a symlink; refusing to read a package through a link")
    if not root.is_dir():
        raise PackageError(f"{root}: not a package directory (no such directory)")
    if not (root / MANIFEST).exists():
        raise PackageError(f"{root}: not a package (no {MANIFEST})")
    return root


def _check_listing(root: Path, manifest: Manifest) -> None:
    """Refuse symlinks, sub-directories, special files, extra and missing files."""
    present: set[str] = set()
    for entry in os.scandir(root):
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise PackageError(f"{root / entry.name}: symlinks are not allowed in a package")
        if not stat.S_ISREG(mode):
            raise PackageError(
                f"{root / entry.name}: unexpected {'directory' if stat.S_ISDIR(mode) else 'entry'}"
                " in the package (only the files listed in the manifest are allowed)"
            )
        present.add(entry.name)
    extra = sorted(present - RESERVED - set(manifest.files))
    if extra:
        raise PackageError(
            f"{root / extra[0]}: unexpected file, not listed in the manifest"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name in manifest.files:
        if name not in present:
            raise PackageError(f"{root / name}: missing (listed in the manifest)")


@contextmanager
def staged_package(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out` to write a package into; on success verify it and rename it
    to `out`. An existing non-empty `out` is an error unless `replace` and it is a package."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PackageError(f"{out}: exists and is not a directory; choose another output")
    if out.is_dir() and any(out.iterdir()) and not (replace and (out / MANIFEST).is_file()):
        raise PackageError(f"{out}: already exists and is not empty; choose another output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        verify_package(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
