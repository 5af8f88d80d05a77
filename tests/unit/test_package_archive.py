"""The single-file `.ship` form: round trip, and refusal of hostile archives."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from tests.unit.test_package import linear_package

from shipyard.errors import PackageError
from shipyard.package import (
    generate_signing_key,
    load_package,
    manifest_sha256,
    pack_package,
    sign_package,
    unpack_package,
)


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return linear_package(tmp_path / "pkg", version="v1")


def hostile_tar(path: Path, pkg: Path, extra: list[tarfile.TarInfo]) -> Path:
    """A tar with the real package files plus `extra` members (content: 4 bytes of 'x')."""
    with tarfile.open(path, "w") as tar:
        for file in sorted(pkg.iterdir()):
            tar.add(file, arcname=file.name)
        for info in extra:
            data = b"xxxx" if info.isreg() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_pack_unpack_round_trip_is_deterministic(pkg: Path, tmp_path: Path) -> None:
    private, public = generate_signing_key(tmp_path / "k")
    sign_package(pkg, private)
    ship = pack_package(pkg, tmp_path / "model.ship")
    again = pack_package(pkg, tmp_path / "again.ship")
    assert ship.read_bytes() == again.read_bytes()
    with tarfile.open(ship) as tar:
        assert tar.getnames() == ["manifest.json", "manifest.sig", "model.safetensors"]
    out = unpack_package(ship, tmp_path / "out", public_key=public)
    assert manifest_sha256(out) == manifest_sha256(pkg)
    assert load_package(out, public_key=public).predict([[4.0]]) == [{"value": 9.0}]


def test_gzip_archives_are_accepted(pkg: Path, tmp_path: Path) -> None:
    gz = tmp_path / "model.ship"
    with tarfile.open(gz, "w:gz") as tar:
        for file in sorted(pkg.iterdir()):
            tar.add(file, arcname=file.name)
    assert load_package(unpack_package(gz, tmp_path / "out")).predict([[0.0]]) == [{"value": 1.0}]


def test_unpack_refuses_an_existing_non_empty_directory(pkg: Path, tmp_path: Path) -> None:
    ship = pack_package(pkg, tmp_path / "model.ship")
    with pytest.raises(PackageError, match="not empty"):
        unpack_package(ship, pkg)


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (tarfile.TarInfo("../x"), "not a plain file name"),
        (tarfile.TarInfo("/etc/evil"), "not a plain file name"),
        (tarfile.TarInfo("sub/file"), "not a plain file name"),
        (tarfile.TarInfo(".hidden"), "not an allowed file name"),
    ],
)
def test_unpack_refuses_traversal(
    pkg: Path, tmp_path: Path, member: tarfile.TarInfo, match: str
) -> None:
    ship = hostile_tar(tmp_path / "evil.ship", pkg, [member])
    with pytest.raises(PackageError, match=match):
        unpack_package(ship, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE]
)
def test_unpack_refuses_links_devices_and_directories(
    pkg: Path, tmp_path: Path, kind: bytes
) -> None:
    info = tarfile.TarInfo("tokenizer.json")
    info.type = kind
    info.linkname = "/etc/passwd"
    ship = hostile_tar(tmp_path / "evil.ship", pkg, [info])
    with pytest.raises(PackageError, match="only regular files allowed"):
        unpack_package(ship, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_too_large_and_too_many(pkg: Path, tmp_path: Path) -> None:
    ship = pack_package(pkg, tmp_path / "model.ship")
    with pytest.raises(PackageError, match="more than 100 bytes"):
        unpack_package(ship, tmp_path / "out", max_bytes=100)
    with pytest.raises(PackageError, match="more than 1 members"):
        unpack_package(ship, tmp_path / "out", max_members=1)
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_duplicates_extras_and_garbage(pkg: Path, tmp_path: Path) -> None:
    dup = hostile_tar(tmp_path / "dup.ship", pkg, [tarfile.TarInfo("manifest.json")])
    with pytest.raises(PackageError, match="appears twice"):
        unpack_package(dup, tmp_path / "out")
    extra = hostile_tar(tmp_path / "extra.ship", pkg, [tarfile.TarInfo("payload.py")])
    with pytest.raises(PackageError, match=r"payload\.py: unexpected file"):
        unpack_package(extra, tmp_path / "out")
    junk = tmp_path / "junk.ship"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(PackageError, match="not a package archive"):
        unpack_package(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pack_refuses_a_tampered_package(pkg: Path, tmp_path: Path) -> None:
    (pkg / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(PackageError, match=r"model\.safetensors: size"):
        pack_package(pkg, tmp_path / "model.ship")
    assert not (tmp_path / "model.ship").exists()
