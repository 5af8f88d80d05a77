"""Signing (Ed25519) and encryption at rest (AES-256-GCM) of packages."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from tests.unit.test_package import linear_package

from shipyard.errors import PackageError
from shipyard.package import (
    decrypt_package,
    encrypt_package,
    generate_package_key,
    generate_signing_key,
    load_package,
    manifest_sha256,
    sign_package,
    verify_package,
)
from shipyard.package.security import CHUNK_SIZE, KEY_ENV, parse_key


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return linear_package(tmp_path / "pkg", version="v1")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_signing_key(tmp_path / "keys" / "release")


# ------------------------------------------------------------------------------------------
# signing


def test_generated_keys_are_pem_and_private_one_is_0600(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert private.name == "release.key" and public.name == "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(PackageError, match="already exists"):
        generate_signing_key(private.with_suffix(""))


def test_signed_package_verifies_and_loads(pkg: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    before = manifest_sha256(pkg)
    sign_package(pkg, private)
    assert manifest_sha256(pkg) == before  # the signature sits beside the manifest
    verify_package(pkg, public_key=public)
    verify_package(pkg, public_key=public.read_bytes())
    assert load_package(pkg, public_key=public).predict([[1.0]]) == [{"value": 3.0}]
    verify_package(pkg)  # a signature does not hurt key-less verification


def test_unsigned_package_refused_when_a_key_is_required(
    pkg: Path, keys: tuple[Path, Path]
) -> None:
    with pytest.raises(PackageError, match="package is not signed"):
        load_package(pkg, public_key=keys[1])


def test_wrongly_signed_package_refused(pkg: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    other_private, _ = generate_signing_key(tmp_path / "other")
    sign_package(pkg, other_private)
    with pytest.raises(PackageError, match="signature is not valid for this public key"):
        load_package(pkg, public_key=keys[1])


def test_manifest_changed_after_signing_is_refused(pkg: Path, keys: tuple[Path, Path]) -> None:
    sign_package(pkg, keys[0])
    text = (pkg / "manifest.json").read_text().replace('"version": "v1"', '"version": "v2"')
    (pkg / "manifest.json").write_text(text)
    verify_package(pkg)  # still self-consistent...
    with pytest.raises(PackageError, match="signature is not valid"):
        verify_package(pkg, public_key=keys[1])  # ...but not what was signed


def test_garbage_signature_file(pkg: Path, keys: tuple[Path, Path]) -> None:
    (pkg / "manifest.sig").write_text("not base64!!")
    with pytest.raises(PackageError, match="signature is not valid"):
        verify_package(pkg, public_key=keys[1])


def test_sign_refuses_a_tampered_package_and_a_bad_key(pkg: Path, keys: tuple[Path, Path]) -> None:
    (pkg / "extra.bin").write_bytes(b"x")
    with pytest.raises(PackageError, match="unexpected file"):
        sign_package(pkg, keys[0])
    with pytest.raises(PackageError, match="not an unencrypted PEM private key"):
        sign_package(pkg, keys[1])  # the public key is not a private key


# ------------------------------------------------------------------------------------------
# encryption


@pytest.fixture
def key_hex() -> str:
    return generate_package_key()


def test_encrypted_package_verifies_without_key_and_loads_with_it(
    pkg: Path, tmp_path: Path, key_hex: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = encrypt_package(pkg, tmp_path / "enc", key_hex)
    manifest = verify_package(enc)  # ciphertext hashes: no key needed
    assert manifest.encryption is not None
    record = manifest.encryption.files["model.safetensors"]
    assert record.blake3 == verify_package(pkg).files["model.safetensors"].blake3
    assert record.blake3 is not None and record.sha256 is None
    assert manifest.files["model.safetensors"].blake3 != record.blake3
    assert b"head.weight" not in (enc / "model.safetensors").read_bytes()
    assert load_package(enc, key=key_hex).predict([[4.0]]) == [{"value": 9.0}]
    monkeypatch.setenv(KEY_ENV, key_hex)
    assert load_package(enc).predict([[4.0]]) == [{"value": 9.0}]


def test_encrypted_package_without_key(
    pkg: Path, tmp_path: Path, key_hex: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    enc = encrypt_package(pkg, tmp_path / "enc", key_hex)
    with pytest.raises(PackageError, match="package is encrypted; set SHIPYARD_PACKAGE_KEY"):
        load_package(enc)


def test_encrypted_package_with_wrong_key(pkg: Path, tmp_path: Path, key_hex: str) -> None:
    enc = encrypt_package(pkg, tmp_path / "enc", key_hex)
    with pytest.raises(PackageError, match=r"model\.safetensors: wrong key \(authentication"):
        load_package(enc, key=generate_package_key())


def test_tampered_ciphertext_is_caught_by_the_hash(pkg: Path, tmp_path: Path, key_hex: str) -> None:
    enc = encrypt_package(pkg, tmp_path / "enc", key_hex)
    data = bytearray((enc / "model.safetensors").read_bytes())
    data[40] ^= 0xFF
    (enc / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="BLAKE3 hash does not match"):
        load_package(enc, key=key_hex)


def test_decrypt_restores_the_original_manifest_bytes(
    pkg: Path, tmp_path: Path, key_hex: str
) -> None:
    key_file = tmp_path / "package.key"
    key_file.write_text(key_hex + "\n")
    enc = encrypt_package(pkg, tmp_path / "enc", key_file)
    plain = decrypt_package(enc, tmp_path / "plain", key_file)
    assert manifest_sha256(plain) == manifest_sha256(pkg)
    assert (plain / "model.safetensors").read_bytes() == (pkg / "model.safetensors").read_bytes()
    with pytest.raises(PackageError, match="wrong key"):
        decrypt_package(enc, tmp_path / "plain2", generate_package_key())
    assert not (tmp_path / "plain2").exists()


def test_signing_an_encrypted_package(
    pkg: Path, tmp_path: Path, key_hex: str, keys: tuple[Path, Path]
) -> None:
    enc = encrypt_package(pkg, tmp_path / "enc", key_hex)
    sign_package(enc, keys[0])
    loaded = load_package(enc, public_key=keys[1], key=key_hex)
    assert loaded.predict([[0.0]]) == [{"value": 1.0}]


def test_multi_chunk_files_round_trip_and_resist_truncation(
    pkg: Path, tmp_path: Path, key_hex: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropped final chunk fails authentication even when the manifest is updated to match."""
    import json

    import shipyard.package.security as security
    from shipyard.package.manifest import sha256_file

    monkeypatch.setattr(security, "CHUNK_SIZE", 64)
    enc = encrypt_package(pkg, tmp_path / "enc", key_hex)
    assert load_package(enc, key=key_hex).predict([[4.0]]) == [{"value": 9.0}]
    weights = enc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: security.HEADER_SIZE + 2 * (64 + 16)])
    manifest = json.loads((enc / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {
        "sha256": sha256_file(weights),
        "size": weights.stat().st_size,
    }
    (enc / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="authentication failed"):
        load_package(enc, key=key_hex)
    monkeypatch.setattr(security, "CHUNK_SIZE", CHUNK_SIZE)


def test_key_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    raw = os.urandom(32)
    assert parse_key(raw.hex()) == raw
    assert parse_key(base64.b64encode(raw).decode()) == raw
    assert parse_key(raw) == raw
    with pytest.raises(PackageError, match="not a 256-bit key"):
        parse_key("abcd")
    with pytest.raises(PackageError, match="no encryption key"):
        encrypt_package(Path("unused"), Path("unused-out"), None)
