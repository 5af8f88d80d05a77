"""The server for real: uvicorn on an ephemeral loopback port, the official tritonclient,
SIGTERM drain in a subprocess, a version switch under load, and a fuzz run with no 5xx."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import ROOT
from tests.serve_support import digits_inputs, digits_package, loaded_digits, running_server

from shipyard.package import load_package
from shipyard.serve import ServeSettings, create_app
from shipyard.serve.launch import serve_command, start_server

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
    return start_server(serve_command(*args), env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)


def _in_flight(url: str) -> float:
    """The server's `shipyard_requests_in_flight` gauge (this /metrics request included)."""
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r"^shipyard_requests_in_flight (\S+)$", text, re.M)
    assert match, text[:500]
    return float(match.group(1))


def test_sigterm_drains_in_flight_requests_and_exits_0(package: Path) -> None:
    """Requests that are in flight when SIGTERM arrives still get their answers.

    Each client sends its headers and half its body, so the server holds n requests that cannot
    finish yet; SIGTERM comes once /metrics counts them in flight, the rest of each body only once
    the server has stopped accepting connections (it is draining). No timing is involved.
    """
    proc, url = _start(str(package), "--max-wait-ms", "0")
    host, port = url.removeprefix("http://").split(":")
    x = digits_inputs(3).reshape(3, -1)
    body = json.dumps({"instances": x.tolist()}).encode()
    half = len(body) // 2
    n = 4
    connections = []
    for _ in range(n):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.putrequest("POST", "/v1/models/digits:predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:half])
        connections.append(conn)
    while _in_flight(url) < n + 1:  # every request has reached the app and waits for its body
        pass
    proc.send_signal(signal.SIGTERM)
    while True:  # the listening socket closes when the drain starts
        try:
            httpx.get(f"{url}/v2/health/live", timeout=5)
        except httpx.HTTPError:
            break
    answers = []
    for conn in connections:
        conn.send(body[half:])
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read())))
        conn.close()
    assert [status for status, _ in answers] == [200] * n
    want = [p["label"] for p in load_package(package).predict(x.tolist())]
    assert all([p["label"] for p in a["predictions"]] == want for _, a in answers)
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
    versions: list[str] = []
    answered = threading.Condition()

    def after(count: int, *, version: str | None = None) -> None:
        """Wait until `count` more answers came back (from `version`, when given)."""
        with answered:
            seen = [v for v in versions if version is None or v == version]
            start = len(seen)
            ok = answered.wait_for(
                lambda: (
                    len([v for v in versions if version is None or v == version]) >= start + count
                    or set(codes) - {200}
                ),
                timeout=120,
            )
        assert ok and set(codes) <= {200}, (codes[-5:], versions[-5:])

    with running_server(app) as url:

        def traffic() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v2/models/digits-live/infer", json=body)
                    with answered:
                        codes.append(r.status_code)
                        if r.status_code == 200:
                            versions.append(r.json()["model_version"])
                        answered.notify_all()

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=60) as admin:
            after(20, version=str(v1))  # traffic flows on v1
            r = admin.post(
                "/v2/admin/models/load", json={"ref": f"digits-live:{v2}", "make_default": False}
            )
            assert r.status_code == 200, r.text
            after(20, version=str(v1))  # still v1: loading v2 did not make it the default
            r = admin.post(
                "/v2/admin/models/digits-live/default",
                json={"version": str(v2), "unload_previous": True},
            )
            assert r.status_code == 200, r.text
            assert [v["version"] for v in r.json()["versions"]] == [str(v2)]
            after(20, version=str(v2))  # traffic flows on v2 after the switch
            assert admin.post("/v2/admin/models/load", json={"ref": "nope:1"}).status_code == 404
            assert admin.post("/v2/admin/models/load", json={"path": "/etc"}).status_code == 400
        stop.set()
        for t in threads:
            t.join()
    assert codes and set(codes) == {200}, {c for c in codes if c != 200}
    assert set(versions) == {str(v1), str(v2)}


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
