"""Signing packages (keys and signatures: signing.py) and encryption at rest (AES-256-GCM).

Signing: `manifest.sig` holds a base64 Ed25519 signature over the exact bytes of manifest.json.
The manifest holds the hash of every other file, so one signature covers the whole package.

Encryption: model.safetensors (and tokenizer.json) are replaced by ciphertext under the same name:

    b"SHIPAES1" | chunk_size (4 bytes, big-endian) | nonce prefix (8 bytes) | chunks...

Each chunk is AES-256-GCM over `chunk_size` plaintext bytes (the last one shorter, possibly empty)
with nonce = prefix | chunk index (4 bytes) and associated data binding the file name, the index
and a last-chunk flag, so chunks cannot be reordered, truncated or swapped between files. The
manifest keeps the ciphertext's hash under `files` (verification needs no key) and the
plaintext's under `encryption.files` (checked after decryption).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shipyard.errors import PackageError
from shipyard.fileio import atomic_write
from shipyard.package.manifest import (
    MANIFEST,
    ONNX_MODEL,
    SIGNATURE,
    TOKENIZER,
    WEIGHTS,
    EncryptedFile,
    Encryption,
    hash_bytes,
    hash_file,
    read_manifest,
    staged_package,
    verify_package,
)
from shipyard.package.signing import load_private_key

KEY_ENV = "SHIPYARD_PACKAGE_KEY"
MAGIC = b"SHIPAES1"
HEADER_SIZE = len(MAGIC) + 4 + 8
TAG_SIZE = 16
CHUNK_SIZE = 64 << 20  # AES-GCM in `cryptography` takes < 2 GiB per call; chunks bound memory too
ENCRYPTED_FILES = (WEIGHTS, ONNX_MODEL, TOKENIZER)
_NO_KEY = f"package is encrypted; set {KEY_ENV} or pass --key-file"

# ------------------------------------------------------------------------------------------
# signing


def sign_package(path: str | os.PathLike[str], private_key: Any) -> Path:
    """Verify the package, then write manifest.sig (Ed25519 over manifest.json); return its path.

    private_key: a PEM file path (as written by `shipyard keys generate`), PEM bytes or a key.
    """
    root = Path(path)
    key = load_private_key(private_key)
    verify_package(root)
    raw = (root / MANIFEST).read_bytes()
    signature = base64.b64encode(key.sign(raw)) + b"\n"
    return atomic_write(root / SIGNATURE, signature)


# ------------------------------------------------------------------------------------------
# keys for encryption


def generate_package_key() -> str:
    """A new random 256-bit key as hex (for SHIPYARD_PACKAGE_KEY or a key file)."""
    return secrets.token_hex(32)


def parse_key(text: str | bytes, where: str = "key") -> bytes:
    """32 key bytes from hex (64 digits) or base64 text; raw 32 bytes are taken as they are."""
    if isinstance(text, bytes) and len(text) == 32:
        return text
    s = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    s = s.strip()
    candidates = []
    if len(s) == 64:
        with contextlib.suppress(ValueError):
            candidates.append(bytes.fromhex(s))
    with contextlib.suppress(binascii.Error, ValueError):
        candidates.append(base64.b64decode(s, validate=True))
    for key in candidates:
        if len(key) == 32:
            return key
    raise PackageError(
        f"{where}: not a 256-bit key; give 32 bytes as 64 hex digits or base64 "
        "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
    )


def resolve_key(key: Any = None, *, key_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The encryption key: `key` (bytes/hex/base64 text, or a key-file path), else `key_file`,
    else $SHIPYARD_PACKAGE_KEY; None when there is none."""
    if isinstance(key, bytes | str) and not isinstance(key, os.PathLike):
        return parse_key(key)
    if key is not None:
        key_file = key
    if key_file is not None:
        path = Path(key_file)
        try:
            return parse_key(path.read_bytes(), str(path))
        except OSError as exc:
            raise PackageError(f"{path}: cannot read the key file ({exc.strerror})") from None
    env = os.environ.get(KEY_ENV)
    if env:
        return parse_key(env, KEY_ENV)
    return None


# ------------------------------------------------------------------------------------------
# encryption


def encrypt_package(
    src: str | os.PathLike[str], out: str | os.PathLike[str], key: Any = None
) -> Path:
    """Write an encrypted copy of package `src` to `out` (weights and tokenizer encrypted).

    key: 32 bytes, hex/base64 text, or a key-file path; default $SHIPYARD_PACKAGE_KEY. The copy is
    unsigned (its manifest differs): sign it again with `sign_package`.
    """
    raw_key = resolve_key(key)
    if raw_key is None:
        raise PackageError(f"no encryption key; set {KEY_ENV} or pass --key-file")
    src_dir = Path(src)
    manifest = verify_package(src_dir)
    if manifest.encryption is not None:
        raise PackageError(f"{src_dir}: package is already encrypted")
    aead = AESGCM(raw_key)
    with staged_package(Path(out)) as tmp:
        files = dict(manifest.files)
        records: dict[str, EncryptedFile] = {}
        for name, entry in manifest.files.items():
            if name not in ENCRYPTED_FILES:
                shutil.copyfile(src_dir / name, tmp / name)
                continue
            prefix = secrets.token_bytes(8)
            with (src_dir / name).open("rb") as fin, (tmp / name).open("wb") as fout:
                _encrypt_stream(aead, name, prefix, fin, fout)
            records[name] = EncryptedFile(
                nonce=prefix.hex(),
                blake3=entry.blake3,
                sha256=entry.sha256,
                size=entry.size,
                hash_chunk_size=entry.chunk_size,
            )
            files[name] = hash_file(tmp / name, algorithm=entry.algorithm)
        encrypted = manifest.model_copy(
            update={
                "files": files,
                "encryption": Encryption(chunk_size=CHUNK_SIZE, files=records),
            }
        )
        (tmp / MANIFEST).write_text(encrypted.to_json(), encoding="utf-8")
    return Path(out)


def decrypt_package(
    src: str | os.PathLike[str], out: str | os.PathLike[str], key: Any = None
) -> Path:
    """Write a decrypted copy of encrypted package `src` to `out` (its original manifest bytes)."""
    src_dir = Path(src)
    manifest = verify_package(src_dir)
    if manifest.encryption is None:
        raise PackageError(f"{src_dir}: package is not encrypted")
    raw_key = resolve_key(key)
    if raw_key is None:
        raise PackageError(_NO_KEY)
    with staged_package(Path(out)) as tmp:
        files = dict(manifest.files)
        for name in manifest.files:
            if name in manifest.encryption.files:
                data = decrypt_file(src_dir, name, manifest.encryption, raw_key)
                (tmp / name).write_bytes(data)
                record = manifest.encryption.files[name]
                files[name] = hash_file(
                    tmp / name, algorithm=record.algorithm, chunk_size=record.hash_chunk_size
                )
            else:
                shutil.copyfile(src_dir / name, tmp / name)
        plain = manifest.model_copy(update={"files": files, "encryption": None})
        (tmp / MANIFEST).write_text(plain.to_json(), encoding="utf-8")
    return Path(out)


def decrypt_file(root: Path, name: str, encryption: Encryption, key: bytes | None) -> bytes:
    """Decrypt one package file in memory and check its plaintext hash and size."""
    if key is None:
        raise PackageError(f"{root / name}: {_NO_KEY}")
    record = encryption.files[name]
    aead = AESGCM(key)
    with (root / name).open("rb") as fh:
        data = _decrypt_stream(aead, name, bytes.fromhex(record.nonce), fh, root / name)
    if len(data) != record.size or hash_bytes(data, record.algorithm) != record.digest:
        raise PackageError(f"{root / name}: decrypted content does not match the manifest")
    return data


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Whether a package directory's manifest has an encryption section."""
    manifest, _ = read_manifest(path)
    return manifest.encryption is not None


def _aad(name: str, index: int, last: bool) -> bytes:
    return b"shipyard-package:" + name.encode() + index.to_bytes(8, "big") + bytes([last])


def _encrypt_stream(
    aead: AESGCM, name: str, prefix: bytes, fin: IO[bytes], fout: IO[bytes]
) -> None:
    fout.write(MAGIC + CHUNK_SIZE.to_bytes(4, "big") + prefix)
    chunk = fin.read(CHUNK_SIZE)
    index = 0
    while True:
        following = fin.read(CHUNK_SIZE)
        last = not following
        nonce = prefix + index.to_bytes(4, "big")
        fout.write(aead.encrypt(nonce, chunk, _aad(name, index, last)))
        if last:
            return
        chunk, index = following, index + 1


def _decrypt_stream(aead: AESGCM, name: str, prefix: bytes, fh: IO[bytes], where: Path) -> bytes:
    header = fh.read(HEADER_SIZE)
    if len(header) != HEADER_SIZE or not header.startswith(MAGIC):
        raise PackageError(f"{where}: not an encrypted package file (bad header)")
    chunk_size = int.from_bytes(header[8:12], "big")
    if header[12:] != prefix or chunk_size <= 0:
        raise PackageError(f"{where}: encryption header does not match the manifest")
    parts: list[bytes] = []
    for index, (chunk, last) in enumerate(_chunks(fh, chunk_size + TAG_SIZE)):
        nonce = prefix + index.to_bytes(4, "big")
        try:
            parts.append(aead.decrypt(nonce, chunk, _aad(name, index, last)))
        except InvalidTag:
            raise PackageError(f"{where}: wrong key (authentication failed)") from None
    return b"".join(parts)


def _chunks(fh: IO[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    chunk = fh.read(size)
    while True:
        following = fh.read(size)
        yield chunk, not following
        if not following:
            return
        chunk = following


__all__ = [
    "KEY_ENV",
    "decrypt_file",
    "decrypt_package",
    "encrypt_package",
    "generate_package_key",
    "is_encrypted",
    "parse_key",
    "resolve_key",
    "sign_package",
]
