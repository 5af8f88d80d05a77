"""Registry with artifacts on S3: a real moto server on loopback, reached through s3fs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import RegistryError
from shipyard.package import manifest_sha256, verify_package
from shipyard.package.registry import Registry
from shipyard.package.storage import ArtifactStore

pytestmark = pytest.mark.integration

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'shipyard[registry-s3]')")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")

BUCKET = "shipyard-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SHIPYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHIPYARD_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def keys(client: Any, prefix: str = "") -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(obj["Key"] for obj in found)


def test_register_pull_verify_round_trip_through_s3(
    s3: Any, package_src: Path, tmp_path: Path
) -> None:
    store = ArtifactStore(f"s3://{BUCKET}/models")
    assert not store.is_local
    with Registry(f"sqlite:///{tmp_path / 'registry.db'}", store) as registry:
        mv = registry.register(package_src)
        registry.register(package_src)
        assert mv.artifact_uri == f"s3://{BUCKET}/models/reg/1"
        names = {p.name for p in package_src.iterdir()}
        assert keys(s3, "models/reg/1/") == sorted(f"models/reg/1/{n}" for n in names)

        registry.promote("reg", 1, "production")
        out = registry.pull("reg@production", tmp_path / "pulled")
        assert verify_package(out).name == "reg"
        assert manifest_sha256(out) == mv.manifest_sha256

        # the server's view: a verified local cache, reused on the next call
        cached = registry.resolve_local("reg@production")
        assert cached.is_relative_to(tmp_path / "home" / "cache")
        assert verify_package(cached).name == "reg"
        assert registry.resolve_local("reg:1") == cached

        # an object changed behind the registry's back is refused, leaving no directory
        s3.put_object(Bucket=BUCKET, Key="models/reg/2/model.safetensors", Body=b"garbage")
        with pytest.raises(RegistryError, match=r"model.safetensors"):
            registry.pull("reg:2", tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad")] == []

        with pytest.raises(RegistryError, match=r"--force"):
            registry.delete("reg", 1)
        registry.delete("reg", 1, force=True)
        assert keys(s3, "models/reg/1/") == []
        assert [v.version for v in registry.list_versions("reg")] == [2]


def test_s3_store_without_bucket_fails_cleanly(s3: Any, package_src: Path, tmp_path: Path) -> None:
    store = ArtifactStore("s3://no-such-bucket/x")
    with (
        Registry(f"sqlite:///{tmp_path / 'registry.db'}", store) as registry,
        pytest.raises(RegistryError, match=r"upload to s3://no-such-bucket/x/reg/1 failed"),
    ):
        registry.register(package_src)
    with Registry(f"sqlite:///{tmp_path / 'registry.db'}", store) as registry:
        assert registry.list_models() == []
