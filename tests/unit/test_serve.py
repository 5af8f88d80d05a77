"""The HTTP server in-process: every route, the wire formats, errors, auth, limits, batching."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tests.serve_support import digits_inputs, loaded_digits

from shipyard.serve import ServeSettings, create_app
from shipyard.serve.auth import add_key
from shipyard.serve.protocols.kserve_v2 import (
    HEADER_LENGTH,
    RequestedOutput,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

INFER = "/v2/models/digits/infer"
_HEAD = (
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],'
    b'"parameters":{"binary_data_size":256}}]}'
)


@pytest.fixture(scope="session")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return loaded_digits(tmp_path_factory.getbasetemp())


@pytest.fixture
def client(loaded: Any) -> Iterator[TestClient]:
    app = create_app(ServeSettings(max_wait_ms=0), preloaded=[loaded])
    with TestClient(app) as c:
        yield c


def v2_json(x: np.ndarray, *, flat: bool = False, **extra: Any) -> dict[str, Any]:
    data = x.reshape(-1).tolist() if flat else x.tolist()
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": data}
    return {"inputs": [tensor], **extra}


# ------------------------------------------------------------------------------ routes


def test_health_and_metadata_routes(client: TestClient, loaded: Any) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "shipyard" and "binary_tensor_data" in meta["extensions"]
    version = str(loaded.manifest.version)
    model = client.get("/v2/models/digits").json()
    assert model == {
        "name": "digits",
        "versions": [version],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert client.get(f"/v2/models/digits/versions/{version}").json() == model
    assert client.get("/v2/models/digits/ready").json()["ready"] is True
    assert client.get(f"/v2/models/digits/versions/{version}/ready").status_code == 200
    for bad in ("/v2/models/nope", "/v2/models/digits/versions/9/ready", "/v2/models/..%2Fx"):
        r = client.get(bad)
        assert r.status_code == 404 and "error" in r.json(), bad
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"].startswith("no route")


@pytest.mark.parametrize("flat", [False, True])
def test_json_infer_equals_predict_arrays(client: TestClient, loaded: Any, flat: bool) -> None:
    x = digits_inputs(5)
    r = client.post(INFER, json=v2_json(x, flat=flat, id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "digits"
    got = decode_response(r.content)
    want = loaded.predict_arrays(x)
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
    assert got["label"].tolist() == want["label"].tolist()


def test_requested_outputs_and_flat_feature_input(client: TestClient, loaded: Any) -> None:
    x = digits_inputs(3).reshape(3, 64)  # flat (N, 64) accepted for a (N, 1, 8, 8) input
    body = v2_json(x, outputs=[{"name": "label"}])
    r = client.post(INFER, json=body)
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert [o["name"] for o in outs] == ["label"]
    assert outs[0]["data"] == loaded.predict_arrays(x)["label"].tolist()


def test_binary_round_trip_own_encoder(client: TestClient, loaded: Any) -> None:
    x = digits_inputs(4)
    payload, head = encode_request({"input": x}, binary=True, request_id="b1")
    assert head is not None
    r = client.post(INFER, content=payload, headers={HEADER_LENGTH: str(head)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    got = decode_response(r.content, int(r.headers[HEADER_LENGTH]))
    want = loaded.predict_arrays(x)
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
    assert [v.decode() for v in got["label"]] == want["label"].tolist()
    # mixed: one output binary, one JSON
    payload, head = encode_request(
        {"input": x}, outputs=[RequestedOutput("probabilities", True), RequestedOutput("label")]
    )
    r = client.post(INFER, content=payload, headers={HEADER_LENGTH: str(head)})
    header = json.loads(r.content[: int(r.headers[HEADER_LENGTH])])
    assert "parameters" in header["outputs"][0] and "data" in header["outputs"][1]


def test_codec_decodes_encoded_bytes_and_ints() -> None:
    x = np.array([[1, -2], [3, 2**40]], dtype=np.int64)
    s = np.array(["é", "", "abc"], dtype=object)
    for binary in (True, False):
        payload, head = encode_request({"a": x, "s": s}, binary=binary)
        req = decode_request(payload, head)
        np.testing.assert_array_equal(req.inputs[0].data, x)
        got = req.inputs[1].data.tolist()
        assert got == ([b"\xc3\xa9", b"", b"abc"] if binary else ["é", "", "abc"])
    body, head = encode_response(
        {"s": s, "x": x}, model_name="m", model_version="1", binary_output=True
    )
    out = decode_response(body, head)
    assert out["s"].tolist() == [b"\xc3\xa9", b"", b"abc"]
    np.testing.assert_array_equal(out["x"], x)


def test_tritonclient_request_and_result_helpers(client: TestClient, loaded: Any) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    x = digits_inputs(6)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_size = _get_inference_request(
        inputs=[inp],
        request_id="t1",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    r = client.post(INFER, content=body, headers={HEADER_LENGTH: str(json_size)})
    assert r.status_code == 200, r.text
    result = httpclient.InferResult.from_response_body(
        r.content, header_length=int(r.headers[HEADER_LENGTH])
    )
    want = loaded.predict_arrays(x)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert [v.decode() for v in result.as_numpy("label")] == want["label"].tolist()
    assert result.get_response()["id"] == "t1"


def test_gzip_request_body(client: TestClient, loaded: Any) -> None:
    x = digits_inputs(2)
    raw = json.dumps(v2_json(x)).encode()
    r = client.post(INFER, content=gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


def test_simple_predict_route_matches_loaded_predict(client: TestClient, loaded: Any) -> None:
    x = digits_inputs(3)
    r = client.post("/v1/models/digits:predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == loaded.predict(x.tolist())
    r = client.post("/v1/models/digits:predict", json={"instances": x.reshape(3, 64).tolist()})
    assert r.json()["predictions"] == loaded.predict(x.tolist())
    assert client.post("/v1/models/nope:predict", json={"instances": [[0]]}).status_code == 404
    r = client.post("/v1/models/digits:predict", json={"instances": [["a"] * 64]})
    assert r.status_code == 400 and "numbers" in r.json()["error"]
    assert client.post("/v1/models/digits:predict", json={"x": 1}).status_code == 400


# ------------------------------------------------------------------------------ bad tensors


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.update(datatype="INT64", data=[0] * 64), "datatype INT64"),
        (lambda t: t.update(shape=[1, 64, 2]), "shape"),
        (lambda t: t.update(shape=[1, 1, 8, 7], data=[0.0] * 56), "shape [1, 1, 8, 7]"),
        (lambda t: t.pop("data"), "missing 'data'"),
        (lambda t: t.update(data=[0.0] * 63), "63 elements"),
        (lambda t: t.update(data=[[0.0] * 64, [1.0]]), "rectangular"),
        (lambda t: t.update(data=["a"] * 64), "numbers"),
        (lambda t: t.update(datatype="FP99"), "FP99"),
        (lambda t: t.update(name="image"), "unknown input 'image'"),
        (lambda t: t.update(shape="64"), "shape"),
        (lambda t: t.update(data=[1e39] * 64), "NaN or infinity"),
    ],
)
def test_malformed_tensors_are_400_naming_the_problem(
    client: TestClient, mutate: Any, needle: str
) -> None:
    tensor: dict[str, Any] = {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 1, 8, 8],
        "data": [0.0] * 64,
    }
    mutate(tensor)
    r = client.post(INFER, json={"inputs": [tensor]})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "JSON object"),
        (b'{"inputs": []}', {}, "non-empty"),
        (_HEAD + b"\0" * 10, {HEADER_LENGTH: str(len(_HEAD))}, "only 10 bytes remain"),
        (b"{}", {HEADER_LENGTH: "999"}, HEADER_LENGTH),
        (b"{}", {HEADER_LENGTH: "x"}, HEADER_LENGTH),
    ],
)
def test_malformed_bodies_are_400(
    client: TestClient, body: bytes, headers: dict[str, str], needle: str
) -> None:
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_binary_size_mismatch_and_unknown_output(client: TestClient) -> None:
    x = digits_inputs(1)
    payload, head = encode_request({"input": x})
    r = client.post(INFER, content=payload + b"\0\0\0\0", headers={HEADER_LENGTH: str(head)})
    assert r.status_code == 400 and "binary tensor data" in r.json()["error"]
    r = client.post(INFER, json=v2_json(x, outputs=[{"name": "logits"}]))
    assert r.status_code == 400 and "unknown output 'logits'" in r.json()["error"]


# ------------------------------------------------------------------------------ security


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "keys.json"
    infer, _ = add_key(path, "infer", "svc")
    admin, _ = add_key(path, "admin")
    return {"path": path, "infer": infer, "admin": admin}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_scopes_and_open_health(loaded: Any, keys: dict[str, Any]) -> None:
    settings = ServeSettings(keys_file=keys["path"], host="0.0.0.0")
    with TestClient(create_app(settings, preloaded=[loaded])) as c:
        body = v2_json(digits_inputs(1))
        assert c.get("/v2/health/ready").status_code == 200  # open: probes carry no key
        r = c.post(INFER, json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post(INFER, json=body, headers=auth(keys["infer"] + "x")).status_code == 401
        bad = "sy_00000000_" + "A" * 43
        assert c.post(INFER, json=body, headers=auth(bad)).status_code == 401
        r = c.post(INFER, json=body, headers=auth(keys["infer"]))
        assert r.status_code == 200
        assert c.post(INFER, json=body, headers=auth(keys["admin"])).status_code == 200
        assert c.get("/v2/admin/models", headers=auth(keys["infer"])).status_code == 403
        assert c.get("/v2/admin/models", headers=auth(keys["admin"])).status_code == 200
        # not loopback: /metrics needs admin
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth(keys["infer"])).status_code == 403
        assert c.get("/metrics", headers=auth(keys["admin"])).status_code == 200


def test_keys_file_stores_only_salted_hashes(keys: dict[str, Any]) -> None:
    path: Path = keys["path"]
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    for key in (keys["infer"], keys["admin"]):
        secret = key.split("_", 2)[2]  # the secret itself may contain "_"
        assert key not in text and secret not in text


def test_revoked_key_is_refused_without_restart(loaded: Any, keys: dict[str, Any]) -> None:
    from shipyard.serve.auth import revoke_key

    settings = ServeSettings(keys_file=keys["path"])
    with TestClient(create_app(settings, preloaded=[loaded])) as c:
        store = c.app.state.server.keys  # type: ignore[attr-defined]
        assert c.get("/v2/models/digits", headers=auth(keys["infer"])).status_code == 200
        revoke_key(keys["path"], "svc")
        store._checked = 0.0  # skip the 1 s re-read throttle
        store._mtime = -2.0
        assert c.get("/v2/models/digits", headers=auth(keys["infer"])).status_code == 401


def test_rate_limit_is_429_with_retry_after(loaded: Any, keys: dict[str, Any]) -> None:
    settings = ServeSettings(keys_file=keys["path"], rate_limit=0.5, rate_burst=2)
    with TestClient(create_app(settings, preloaded=[loaded])) as c:
        codes = [
            c.get("/v2/models/digits", headers=auth(keys["infer"])).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        r = c.get("/v2/models/digits", headers=auth(keys["infer"]))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # buckets are per key
        assert c.get("/v2/models/digits", headers=auth(keys["admin"])).status_code == 200


def test_body_size_limit_is_413(loaded: Any) -> None:
    with TestClient(create_app(ServeSettings(max_body_bytes=4096), preloaded=[loaded])) as c:
        big = v2_json(np.zeros((200, 1, 8, 8), np.float32))
        r = c.post(INFER, json=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is checked
            yield b'{"inputs": ['
            for _ in range(100):
                yield b" " * 100

        r = c.post(INFER, content=chunks())
        assert r.status_code == 413
        r = c.post(
            INFER, content=gzip.compress(b" " * 100_000), headers={"Content-Encoding": "gzip"}
        )
        assert r.status_code == 413


def test_no_keys_refuses_non_loopback_bind() -> None:
    with pytest.raises(ValueError, match=r"refusing to bind '0\.0\.0\.0' without API keys"):
        ServeSettings(host="0.0.0.0")
    assert ServeSettings(host="0.0.0.0", insecure_no_auth=True).auth_enabled is False
    assert ServeSettings(host="::1").host == "::1"


def test_request_ids_metrics_and_access_log(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    r = client.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/v2/health/live", headers={"X-Request-ID": "bad id\t<script>"})
    assert len(r.headers["x-request-id"]) == 32
    client.post(INFER, json=v2_json(digits_inputs(2)))
    text = client.get("/metrics").text  # open on loopback
    assert (
        'shipyard_requests_total{model="digits",route="/v2/models/{model_name}/infer",'
        'status="200"}' in text
    )
    for name in (
        "shipyard_batch_size_rows_bucket",
        "shipyard_queue_time_seconds_bucket",
        "shipyard_inference_duration_seconds",
        "shipyard_requests_in_flight",
        "shipyard_queue_depth",
        "shipyard_model_load_seconds",
    ):
        assert name in text, name


def test_access_log_line_is_json_with_request_id(loaded: Any, capsys: Any) -> None:
    import logging

    logger = logging.getLogger("shipyard.serve.access")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with TestClient(create_app(ServeSettings(), preloaded=[loaded])) as c:
            r = c.get("/v2/models/digits")
    finally:
        logger.removeHandler(handler)
    line = json.loads(records[-1])
    assert line["request_id"] == r.headers["x-request-id"]
    assert line["status"] == 200 and line["route"] == "/v2/models/{model_name}"


def test_model_crash_is_500_json_without_traceback(loaded: Any) -> None:
    with TestClient(create_app(ServeSettings(), preloaded=[loaded])) as c:
        served = c.app.state.server.repo.get("digits")  # type: ignore[attr-defined]

        def boom(x: np.ndarray) -> dict[str, np.ndarray]:
            raise RuntimeError("secret internal detail")

        served.batcher._fn = boom
        r = c.post(INFER, json=v2_json(digits_inputs(1)))
        assert r.status_code == 500
        assert "secret" not in r.text and "Traceback" not in r.text
        assert r.json() == {"error": "model 'digits:" + served.version + "' failed on this input"}


# ------------------------------------------------------------------------------ queueing


def _blocked_app(loaded: Any, **settings: Any) -> tuple[Any, threading.Event]:
    app = create_app(ServeSettings(**settings), preloaded=[loaded])
    gate = threading.Event()
    return app, gate


def _block(app: Any, gate: threading.Event) -> None:
    served = app.state.server.repo.get("digits")
    real = served.batcher._fn

    def slow(x: np.ndarray) -> dict[str, np.ndarray]:
        gate.wait(10)
        return real(x)  # type: ignore[no-any-return]

    served.batcher._fn = slow


async def until(condition: Any, timeout: float = 30.0) -> None:
    """Wait for a state change of the server (no fixed sleeps: load only makes it slower)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def _with_app(app: Any, fn: Any) -> Any:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await fn(c)


def test_full_queue_is_503_with_retry_after(loaded: Any) -> None:
    app, gate = _blocked_app(loaded, max_queue=1, max_wait_ms=0, max_batch_size=1)
    body = v2_json(digits_inputs(1))

    async def run(c: httpx.AsyncClient) -> list[httpx.Response]:
        _block(app, gate)
        batcher = app.state.server.repo.get("digits").batcher
        first = asyncio.create_task(c.post(INFER, json=body))  # runs (blocked)
        await until(lambda: batcher.busy == 1 and batcher.depth == 0)
        second = asyncio.create_task(c.post(INFER, json=body))  # queued
        await until(lambda: batcher.depth == 1)
        third = await c.post(INFER, json=body)  # queue full
        gate.set()
        return [await first, await second, third]

    first, second, third = asyncio.run(_with_app(app, run))
    assert (first.status_code, second.status_code) == (200, 200)
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert "overloaded" in third.json()["error"]


def test_timeout_is_504(loaded: Any) -> None:
    app, gate = _blocked_app(loaded, timeout_s=0.2)

    async def run(c: httpx.AsyncClient) -> httpx.Response:
        _block(app, gate)
        r = await c.post(INFER, json=v2_json(digits_inputs(1)))
        gate.set()
        return r

    r = asyncio.run(_with_app(app, run))
    assert r.status_code == 504 and "0.2s" in r.json()["error"]


def test_batcher_groups_concurrent_requests_exactly(loaded: Any) -> None:
    app = create_app(ServeSettings(max_wait_ms=200, max_batch_size=64), preloaded=[loaded])
    batches: list[tuple[int, int]] = []
    xs = [digits_inputs(1 + i % 3, seed=i) for i in range(12)]

    async def run(c: httpx.AsyncClient) -> list[httpx.Response]:
        served = app.state.server.repo.get("digits")
        served.batcher._on_batch = lambda rows, reqs, s: batches.append((rows, reqs))
        return await asyncio.gather(*(c.post(INFER, json=v2_json(x)) for x in xs))

    responses = asyncio.run(_with_app(app, run))
    assert all(r.status_code == 200 for r in responses)
    assert max(reqs for _, reqs in batches) > 1, batches
    assert sum(rows for rows, _ in batches) == sum(len(x) for x in xs)
    # the batch the server ran, computed in-process, split back by request: identical
    big = np.concatenate(xs)
    want = loaded.predict_arrays(big)
    start = 0
    for x, r in zip(xs, responses, strict=True):
        got = decode_response(r.content)
        np.testing.assert_allclose(
            got["probabilities"], want["probabilities"][start : start + len(x)], rtol=1e-6
        )
        assert got["label"].tolist() == want["label"][start : start + len(x)].tolist()
        start += len(x)


def test_classification_extension_top_classes(client: TestClient, loaded: Any) -> None:
    x = digits_inputs(4)
    want = loaded.predict_arrays(x)["probabilities"]
    body = v2_json(x, outputs=[{"name": "probabilities", "parameters": {"classification": 2}}])
    r = client.post(INFER, json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [4, 2]
    got = np.asarray(out["data"]).reshape(4, 2)
    for row, probs in zip(got, want, strict=True):
        first, second = np.argsort(-probs, kind="stable")[:2]
        assert row.tolist() == [
            f"{probs[first]:f}:{first}:{loaded.labels[first]}",
            f"{probs[second]:f}:{second}:{loaded.labels[second]}",
        ]
    # more classes than there are: all of them; 0 means no classification (the tensor itself)
    body = v2_json(x, outputs=[{"name": "probabilities", "parameters": {"classification": 99}}])
    assert client.post(INFER, json=body).json()["outputs"][0]["shape"] == [4, 10]
    body = v2_json(x, outputs=[{"name": "probabilities", "parameters": {"classification": 0}}])
    assert client.post(INFER, json=body).json()["outputs"][0]["datatype"] == "FP32"
    # bad uses name the problem
    body = v2_json(x, outputs=[{"name": "label", "parameters": {"classification": 2}}])
    r = client.post(INFER, json=body)
    assert r.status_code == 400 and "numeric (batch, classes)" in r.json()["error"]
    body = v2_json(x, outputs=[{"name": "probabilities", "parameters": {"classification": "2"}}])
    r = client.post(INFER, json=body)
    assert r.status_code == 400 and "classification must be an integer" in r.json()["error"]


def test_access_log_timestamps_and_request_ids() -> None:
    from shipyard.serve.accesslog import REQUEST_ID, iso_timestamp, new_request_id

    # seconds and milliseconds come from one clock reading (they used to come from two)
    assert iso_timestamp(1764370128.9996) == "2025-11-28T22:48:48.999Z"
    assert iso_timestamp(1764370129.0004) == "2025-11-28T22:48:49.000Z"
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and REQUEST_ID.match(i) for i in ids)
