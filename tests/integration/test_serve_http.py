"""The server for real: uvicorn on an ephemeral loopback port, the official tritonclient,
SIGTERM drain in a subprocess, a version switch under load, and a fuzz run with no 5xx."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import ROOT
from tests.serve_support import digits_inputs, digits_package, loaded_digits, running_server

from shipyard.serve import ServeSettings, create_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return loaded_digits(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_package(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(loaded: Any) -> Any:
    app = create_app(ServeSettings(max_wait_ms=1), preloaded=[loaded])
    with running_server(app) as url:
        yield url


def test_tritonclient_defaults_equal_in_process_predictions(server: str, loaded: Any) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    x = digits_inputs(7)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True by default
    result = client.infer("digits", [inp], request_id="r-9")
    want = loaded.predict_arrays(x)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert [v.decode() for v in result.as_numpy("label")] == want["label"].tolist()
    assert result.get_response()["id"] == "r-9"
    # requested outputs, one binary and one JSON
    outs = [
        httpclient.InferRequestedOutput("label", binary_data=False),
        httpclient.InferRequestedOutput("probabilities"),
    ]
    result = client.infer("digits", [inp], outputs=outs)
    assert result.as_numpy("label").tolist() == want["label"].tolist()
    # the classification extension: top 3 classes as "value:index:label", best first
    outs = [httpclient.InferRequestedOutput("probabilities", class_count=3)]
    top = client.infer("digits", [inp], outputs=outs).as_numpy("probabilities")
    assert top.shape == (7, 3)
    labels = loaded.labels
    for row, probs in zip(top, want["probabilities"], strict=True):
        best = np.argsort(-probs, kind="stable")[:3]
        assert [v.decode() for v in row] == [f"{probs[c]:f}:{c}:{labels[c]}" for c in best]
    client.close()


def test_plain_json_over_http(server: str, loaded: Any) -> None:
    x = digits_inputs(4)
    r = httpx.post(f"{server}/v1/models/digits:predict", json={"instances": x.tolist()})
    assert r.status_code == 200 and r.json()["predictions"] == loaded.predict(x.tolist())
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [4, 64], "data": x.reshape(-1).tolist()}
        ]
    }
    r = httpx.post(f"{server}/v2/models/digits/infer", json=body)
    assert r.status_code == 200
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(4, 10)
    np.testing.assert_array_equal(got, loaded.predict_arrays(x)["probabilities"])


# ------------------------------------------------------------------------------ subprocess


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, (line, proc.stderr.read() if proc.stderr else "")
    url = f"http://127.0.0.1:{match.group(1)}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become ready")


def test_sigterm_drains_in_flight_requests_and_exits_0(package: Path) -> None:
    proc, url = _start(str(package), "--max-wait-ms", "0")
    x = np.random.default_rng(0).random((3000, 64), dtype=np.float32)
    body = json.dumps({"instances": x.tolist()}).encode()
    n = 12
    barrier = threading.Barrier(n + 1)

    def call(_: int) -> int:
        with httpx.Client(timeout=60) as c:
            c.get(f"{url}/v2/health/live")  # connection open before SIGTERM
            barrier.wait()
            r = c.post(
                f"{url}/v1/models/digits:predict",
                content=body,
                headers={"content-type": "application/json"},
            )
            return r.status_code

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call, i) for i in range(n)]
        barrier.wait()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        codes = [f.result() for f in futures]
    assert codes == [200] * n
    assert proc.wait(timeout=60) == 0


def test_startup_fails_fast_with_one_line(package: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shipyard", "serve", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    out = run(str(package), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2 and "refusing to bind '0.0.0.0' without API keys" in out.stderr
    bad = tmp_path / "pkg"
    shutil.copytree(package, bad)
    with (bad / "model.safetensors").open("ab") as fh:
        fh.write(b"x")
    out = run(str(bad), "--port", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3 and "model.safetensors" in out.stderr


# ------------------------------------------------------------------------------ switching


def test_version_switch_under_load_fails_no_request(package: Path, loaded: Any) -> None:
    from shipyard.package.registry import Registry

    with Registry() as reg:
        v1 = reg.register(package, name="digits-live").version
        v2 = reg.register(package, name="digits-live").version
    app = create_app(ServeSettings(max_wait_ms=1, registry_refs=[f"digits-live:{v1}"]))
    x = digits_inputs(2)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8], "data": x.tolist()}]
    }
    stop = threading.Event()
    codes: list[int] = []
    versions: set[str] = set()

    with running_server(app) as url:

        def traffic() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v2/models/digits-live/infer", json=body)
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        versions.add(r.json()["model_version"])

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=60) as admin:
            time.sleep(0.3)
            r = admin.post(
                "/v2/admin/models/load", json={"ref": f"digits-live:{v2}", "make_default": False}
            )
            assert r.status_code == 200, r.text
            time.sleep(0.2)
            r = admin.post(
                "/v2/admin/models/digits-live/default",
                json={"version": str(v2), "unload_previous": True},
            )
            assert r.status_code == 200, r.text
            assert [v["version"] for v in r.json()["versions"]] == [str(v2)]
            time.sleep(0.3)
            assert admin.post("/v2/admin/models/load", json={"ref": "nope:1"}).status_code == 404
            assert admin.post("/v2/admin/models/load", json={"path": "/etc"}).status_code == 400
        stop.set()
        for t in threads:
            t.join()
    assert codes and set(codes) == {200}, {c for c in codes if c != 200}
    assert versions == {str(v1), str(v2)}


# ------------------------------------------------------------------------------ fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "x", ""]) | st.text(max_size=6),
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "UINT8", "BF16"])
        | st.text(max_size=5),
        "shape": st.lists(st.integers(-2, 70), max_size=4) | _json,
    },
    optional={
        "data": st.lists(st.floats(width=32) | st.integers(-(2**70), 2**70), max_size=130) | _json,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 300) | _json}),
    },
)
_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor, max_size=2) | _json},
    optional={"id": _json, "outputs": _json, "parameters": _json},
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=_bodies,
    tail=st.binary(max_size=64),
    header=st.none() | st.integers(-5, 400),
    route=st.sampled_from(["/v2/models/digits/infer", "/v1/models/digits:predict"]),
)
def test_fuzzed_bodies_never_get_5xx(
    server: str, body: dict[str, Any], tail: bytes, header: int | None, route: str
) -> None:
    raw = json.dumps(body, allow_nan=True).encode() + tail
    headers = {} if header is None else {"Inference-Header-Content-Length": str(header)}
    if route.startswith("/v1"):
        raw = json.dumps({"instances": body.get("inputs")}).encode()
    r = httpx.post(f"{server}{route}", content=raw, headers=headers, timeout=30)
    assert r.status_code < 500, (r.status_code, r.text, raw[:300])
    assert "error" in r.json() or r.status_code == 200
