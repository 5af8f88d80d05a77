"""The package format: `manifest.json` schema, file-name rules, hashing and verification.

A package is a flat directory with fixed file names:

    manifest.json       what the model is (this module's `Manifest`) and the SHA-256 + size of
                        every other file
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

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is metadata; anything larger is not one of ours

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
    """The exact base model an adapter was trained on (its package's digests)."""

    name: str
    version: str
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str = Field(
        description="hash of the base's weights file, as its manifest lists"
    )


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
    """SHA-256 and size of a file exactly as stored (the ciphertext when encrypted).

    Files larger than one chunk also list the SHA-256 of each `chunk_size` piece, so loading can
    verify them on every core at once (one SHA-256 stream runs on one core only); the chunk
    hashes cover every byte, and the whole-file hash stays for tools that check files one by one.
    """

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    chunk_size: int | None = Field(None, gt=0)
    chunks: list[str] | None = None

    @model_validator(mode="after")
    def _chunks_cover_the_file(self) -> FileEntry:
        if (self.chunk_size is None) != (self.chunks is None):
            raise ValueError("chunk_size and chunks go together")
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
    def _omit_unchunked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # small files keep the two-field entry they always had
        data: dict[str, Any] = handler(self)
        if self.chunks is None:
            data.pop("chunk_size", None)
            data.pop("chunks", None)
        return data


class EncryptedFile(_Model):
    """Per-file encryption record: nonce prefix and the plaintext's SHA-256 and size (and the
    plaintext entry's hash chunk size, so decrypting restores the original manifest exactly)."""

    nonce: str = Field(pattern=r"^[0-9a-f]{16}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    hash_chunk_size: int | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _omit_unchunked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.hash_chunk_size is None:
            data.pop("hash_chunk_size", None)
        return data


class Encryption(_Model):
    """Encryption at rest of some of the package's files (see `shipyard.package.security`)."""

    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    chunk_size: int = Field(gt=0)
    files: dict[str, EncryptedFile]


class Manifest(_Model):
    """The contents of manifest.json (format version 1)."""

    format_version: Literal[1] = 1
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
        manifest they always had.
        """
        omit = {"backend"} if self.backend == "torch" else set()
        if self.quantization is None:
            omit.add("quantization")
        if self.lora is None:
            omit.add("lora")
        return self.model_dump_json(indent=2, exclude=omit) + "\n"


# ------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in large chunks (hashlib releases the GIL while hashing)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


HASH_CHUNK = 16 << 20  # files above this get per-chunk hashes (parallel verification)


def hash_file(path: Path, *, chunk_size: int | Literal["auto"] | None = "auto") -> FileEntry:
    """The manifest entry of a file: size, SHA-256, and per-chunk SHA-256 for large files.

    chunk_size: "auto" = HASH_CHUNK; None = whole-file hash only.
    """
    if chunk_size == "auto":
        chunk_size = HASH_CHUNK
    size = path.stat().st_size
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
            f"(this one reads format {FORMAT_VERSION})"
        )
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{where}: unknown format_version {version}; this shipyard reads {FORMAT_VERSION}"
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
    """Size and SHA-256 of one package file against its manifest entry."""
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
        ok = (digest or sha256_file(file)) == entry.sha256
    if not ok:
        raise PackageError(
            f"{file}: SHA-256 does not match the manifest; the file was changed or corrupted"
        )


def verify_package(
    path: str | os.PathLike[str], *, public_key: Any = None, skip: frozenset[str] = frozenset()
) -> Manifest:
    """Check a package directory against its manifest and return the manifest.

    Every listed file's size and SHA-256 is checked (ciphertext for encrypted files, so no key is
    needed). public_key: an Ed25519 public key (PEM file path, PEM bytes or key object); when
    given, manifest.sig must be a valid signature by it. skip: names whose hash the caller
    checks itself (load_package hashes the weights while loading them).
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
