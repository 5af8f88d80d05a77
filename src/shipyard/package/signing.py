"""Ed25519 signatures over a package's manifest.json (`manifest.sig`).

The manifest holds the hash of every other file, so one signature covers the whole package.
This module knows keys and signature bytes only; `verify_package` (manifest.py) calls
`verify_signature`, and `sign_package` (security.py) verifies a package before signing it.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shipyard.errors import PackageError
from shipyard.package.files import MANIFEST, SIGNATURE


def generate_signing_key(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: PREFIX.key (private, PEM, mode 0600) and PREFIX.pub."""
    base = Path(prefix)
    private_path = base.with_name(base.name + ".key")
    public_path = base.with_name(base.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise PackageError(f"{path}: already exists; choose another name or remove it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    os.chmod(private_path, 0o600)  # in case the umask widened nothing but the file pre-existed
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(source: Any) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file path, PEM bytes or a key object."""
    if isinstance(source, Ed25519PrivateKey):
        return source
    pem, where = _pem(source, "private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"{where}: not an Ed25519 key; create one with `shipyard keys generate`")
    return key


def load_public_key(source: Any) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM bytes or a key object."""
    if isinstance(source, Ed25519PublicKey):
        return source
    pem, where = _pem(source, "public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise PackageError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{where}: not an Ed25519 public key")
    return key


def verify_signature(
    path: str | os.PathLike[str], public_key: Any, *, manifest_bytes: bytes | None = None
) -> None:
    """Check manifest.sig against manifest.json with `public_key`; PackageError if absent/bad."""
    root = Path(path)
    key = load_public_key(public_key)
    sig_file = root / SIGNATURE
    if not sig_file.is_file():
        raise PackageError(
            f"{sig_file}: package is not signed, but a public key was given to check it; "
            "sign it with `shipyard package sign DIR --key KEY`"
        )
    raw = manifest_bytes if manifest_bytes is not None else (root / MANIFEST).read_bytes()
    try:
        signature = base64.b64decode(sig_file.read_bytes().strip(), validate=True)
        key.verify(signature, raw)
    except (binascii.Error, ValueError, InvalidSignature):
        raise PackageError(
            f"{sig_file}: signature is not valid for this public key (the manifest was changed "
            "after signing, or it was signed with another key)"
        ) from None


def _pem(source: Any, what: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, what
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise PackageError(f"{path}: cannot read the {what} ({exc.strerror})") from None
