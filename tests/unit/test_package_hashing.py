"""File hashes in packages: BLAKE3 for new packages, SHA-256 ones keep loading, and the read-once
weights loader verifies every byte (and refuses damaged files) for both."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.unit.test_package import linear_package

from shipyard.errors import PackageError, RegistryError
from shipyard.package import load_package, sign_package, verify_package
from shipyard.package.manifest import FileEntry, hash_file, parse_manifest
from shipyard.package.signing import generate_signing_key
from shipyard.package.storage import ArtifactStore
from shipyard.package.weights_reader import read_verified_weights

ALGORITHMS = ("blake3", "sha256")


def manifest_json(pkg: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pkg / "manifest.json").read_text())
    return data


def test_new_packages_record_blake3_per_file_with_format_2(tmp_path: Path) -> None:
    pkg = linear_package(tmp_path / "new", version="v1")
    data = manifest_json(pkg)
    assert data["format_version"] == 2
    entry = data["files"]["model.safetensors"]
    raw = (pkg / "model.safetensors").read_bytes()
    assert entry == {"blake3": blake3.blake3(raw).hexdigest(), "size": len(raw)}


def test_sha256_package_written_the_old_way_loads_signs_and_verifies(tmp_path: Path) -> None:
    pkg = linear_package(tmp_path / "old", version="v1", hash_algorithm="sha256")
    data = manifest_json(pkg)
    assert data["format_version"] == 1  # exactly what shipyard wrote before BLAKE3
    raw = (pkg / "model.safetensors").read_bytes()
    assert data["files"]["model.safetensors"] == {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "size": len(raw),
    }
    private, public = generate_signing_key(tmp_path / "me")
    sign_package(pkg, private)
    loaded = load_package(pkg, public_key=public)
    assert loaded.predict([[4.0]]) == [{"value": 9.0}]


def test_signature_covers_the_blake3_hashes(tmp_path: Path) -> None:
    pkg = linear_package(tmp_path / "new", version="v1")
    private, public = generate_signing_key(tmp_path / "me")
    sign_package(pkg, private)
    assert load_package(pkg, public_key=public).predict([[0.0]]) == [{"value": 1.0}]
    data = manifest_json(pkg)
    data["files"]["model.safetensors"]["blake3"] = "0" * 64
    (pkg / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    with pytest.raises(PackageError, match="signature is not valid"):
        load_package(pkg, public_key=public)


def _flip(file: Path, index: int) -> None:
    data = bytearray(file.read_bytes())
    data[index] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("where", ["last byte", "header"])
def test_a_flipped_byte_is_refused(tmp_path: Path, algorithm: str, where: str) -> None:
    pkg = linear_package(tmp_path / "p", version="v1", hash_algorithm=algorithm)
    _flip(pkg / "model.safetensors", -1 if where == "last byte" else 12)
    name = {"blake3": "BLAKE3", "sha256": "SHA-256"}[algorithm]
    with pytest.raises(PackageError, match=rf"model\.safetensors: {name} hash does not match"):
        load_package(pkg)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_truncated_file_is_refused(tmp_path: Path, algorithm: str) -> None:
    pkg = linear_package(tmp_path / "p", version="v1", hash_algorithm=algorithm)
    weights = pkg / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(PackageError, match=r"model\.safetensors: size \d+ does not match"):
        load_package(pkg)
    # the manifest's size edited to match: the hash still refuses it
    data = manifest_json(pkg)
    data["files"]["model.safetensors"]["size"] = weights.stat().st_size
    (pkg / "manifest.json").write_text(json.dumps(data))
    name = {"blake3": "BLAKE3", "sha256": "SHA-256"}[algorithm]
    with pytest.raises(PackageError, match=rf"model\.safetensors: {name} hash does not match"):
        load_package(pkg)


def test_entries_need_exactly_one_known_hash(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one hash"):
        FileEntry(size=1)
    with pytest.raises(ValueError, match="exactly one hash"):
        FileEntry(blake3="0" * 64, sha256="0" * 64, size=1)
    with pytest.raises(ValueError, match="SHA-256 only"):
        FileEntry(blake3="0" * 64, size=10, chunk_size=4, chunks=["0" * 64] * 3)
    pkg = linear_package(tmp_path / "p", version="v1")
    data = manifest_json(pkg)
    data["files"]["model.safetensors"] = {"md5": "0" * 32, "size": 1}
    with pytest.raises(PackageError, match=r"malformed manifest: files\.model\.safetensors"):
        parse_manifest(json.dumps(data).encode())


def test_hash_file_names_the_algorithm(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"abc")
    assert hash_file(tmp_path / "blob").blake3 == blake3.blake3(b"abc").hexdigest()
    assert hash_file(tmp_path / "blob", algorithm="sha256").sha256 == (
        hashlib.sha256(b"abc").hexdigest()
    )
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty").blake3 == blake3.blake3(b"").hexdigest()
    with pytest.raises(PackageError, match="unknown hash algorithm 'md5'; use one of blake3"):
        hash_file(tmp_path / "blob", algorithm="md5")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# the read-once loader


def _weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "c": torch.zeros(0, 5),
        "d": torch.tensor([True, False, True]),
    }
    file = tmp_path / "w.safetensors"
    save_file(tensors, str(file))
    return file, tensors


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_read_once_fills_the_targets_in_place(tmp_path: Path, algorithm: str) -> None:
    file, _ = _weights(tmp_path)
    targets = {"a": torch.empty(3, 4), "b": torch.empty(2, dtype=torch.bfloat16)}
    pointers = {name: t.data_ptr() for name, t in targets.items()}
    entry = hash_file(file, algorithm=algorithm, chunk_size=None)  # type: ignore[arg-type]
    got = read_verified_weights(file, entry, targets, piece=7)  # pieces cut through tensors
    assert got["a"] is targets["a"] and got["b"] is targets["b"]
    assert {n: got[n].data_ptr() for n in pointers} == pointers
    reference = load_file(str(file))
    assert set(got) == set(reference)
    for name, value in reference.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value)


def test_read_once_gives_new_tensors_where_a_target_does_not_fit(tmp_path: Path) -> None:
    file, tensors = _weights(tmp_path)
    wrong = {"a": torch.empty(4, 3), "d": torch.empty(3)}  # wrong shape, wrong dtype
    got = read_verified_weights(file, hash_file(file), wrong)
    assert got["a"] is not wrong["a"] and torch.equal(got["a"], tensors["a"])
    assert got["d"].dtype == torch.bool and torch.equal(got["d"], tensors["d"])


def test_read_once_never_reads_twice_into_one_tensor(tmp_path: Path) -> None:
    """Tied names both stored: the second gets its own tensor (the hash thread may still be
    reading the first one's bytes)."""
    file = tmp_path / "tied.safetensors"
    save_file({"a": torch.ones(3), "b": torch.full((3,), 2.0)}, str(file))
    shared = torch.empty(3)
    got = read_verified_weights(file, hash_file(file), {"a": shared, "b": shared})
    assert got["a"] is shared and got["b"] is not shared
    assert got["a"].tolist() == [1.0] * 3 and got["b"].tolist() == [2.0] * 3


def test_read_once_refuses_a_damaged_file_before_returning(tmp_path: Path) -> None:
    file, _ = _weights(tmp_path)
    entry = hash_file(file)
    target = torch.empty(3, 4)
    _flip(file, -1)
    with pytest.raises(PackageError, match=r"w\.safetensors: BLAKE3 hash does not match"):
        read_verified_weights(file, entry, {"a": target})


def _crafted(tmp_path: Path, header: Any, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    file = tmp_path / "crafted.safetensors"
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return file


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "cover 8"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "starts at 4"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "need 12"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'Q4'"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_read_once_refuses_bad_layouts(
    tmp_path: Path, header: Any, data: bytes, match: str
) -> None:
    file = _crafted(tmp_path, header, data)
    entry = hash_file(file)  # the hash matches: the file was packaged like this
    with pytest.raises(
        PackageError, match=rf"crafted\.safetensors: cannot read weights \(.*{match}"
    ):
        read_verified_weights(file, entry, {})


def test_read_once_refuses_a_header_longer_than_the_file(tmp_path: Path) -> None:
    file = tmp_path / "short.safetensors"
    file.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(PackageError, match=r"cannot read weights .*header length"):
        read_verified_weights(file, hash_file(file), {})


# ------------------------------------------------------------------------------------------
# the registry's artifact store checks either algorithm


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_artifact_store_round_trip_and_corruption(tmp_path: Path, algorithm: str) -> None:
    pkg = linear_package(tmp_path / "p", version="v1", hash_algorithm=algorithm)
    store = ArtifactStore(tmp_path / "store")
    uri = store.upload(pkg, "lin", 1)
    back = store.download(uri, tmp_path / "back")
    assert verify_package(back).files == verify_package(pkg).files
    _flip(tmp_path / "store" / "lin" / "1" / "model.safetensors", -1)
    name = {"blake3": "BLAKE3", "sha256": "SHA-256"}[algorithm]
    with pytest.raises(RegistryError, match=rf"model\.safetensors: stored file has {name}"):
        store.download(uri, tmp_path / "again")
