"""The batcher on its own, the management API in-process, and the `keys` verbs."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tests.serve_support import digits_inputs, loaded_digits
from typer.testing import CliRunner

from shipyard.cli import app as cli_app
from shipyard.serve import Batcher, ServeSettings, create_app
from shipyard.serve.batching import ForwardFn
from shipyard.serve.errors import BadRequest, DeadlineExceeded, Unavailable


def double(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x * 2.0, "n": np.full(len(x), len(x))}


def test_batcher_groups_splits_and_checks_rows() -> None:
    calls: list[int] = []

    def fn(x: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(x))
        return double(x)

    async def run() -> list[dict[str, np.ndarray]]:
        b = Batcher("m", fn, max_batch_size=8, max_wait_ms=50)
        b.start()
        xs = [np.full((n, 2), float(n)) for n in (1, 2, 3, 4)]
        futures = [b.submit(x) for x in xs]
        out = await asyncio.gather(*futures)
        await b.close()
        return out

    out = asyncio.run(run())
    assert calls == [6, 4]  # 1+2+3 fit in 8 rows, 4 would not
    for n, o in zip((1, 2, 3, 4), out, strict=True):
        np.testing.assert_array_equal(o["y"], np.full((n, 2), 2.0 * n))


def test_batcher_keeps_different_shapes_apart_and_isolates_failures() -> None:
    def fn(x: np.ndarray) -> dict[str, np.ndarray]:
        if (x < 0).any():
            raise ValueError("negative input")
        return double(x)

    async def run() -> list[Any]:
        b = Batcher("m", fn, max_batch_size=64, max_wait_ms=20, client_errors=(ValueError,))
        b.start()
        futures = [
            b.submit(np.ones((1, 2))),
            b.submit(np.ones((1, 3))),
            b.submit(-np.ones((1, 2))),
            b.submit(np.ones((2, 2))),
        ]
        out = await asyncio.gather(*futures, return_exceptions=True)
        await b.close()
        return out

    ok2, ok3, bad, ok22 = asyncio.run(run())
    assert ok2["y"].shape == (1, 2) and ok3["y"].shape == (1, 3) and ok22["y"].shape == (2, 2)
    assert isinstance(bad, BadRequest) and "negative input" in str(bad)


def gated_double() -> tuple[threading.Event, list[float], ForwardFn]:
    """A forward that blocks until the gate is set and records the rows it ran (first column)."""
    gate = threading.Event()
    seen: list[float] = []

    def fn(x: np.ndarray) -> dict[str, np.ndarray]:
        gate.wait(5)
        seen.extend(x[:, 0].tolist())
        return double(x)

    return gate, seen, fn


def test_batcher_drops_cancelled_work_and_bounds_the_queue() -> None:
    gate, seen, fn = gated_double()

    async def run() -> None:
        b = Batcher("m", fn, max_batch_size=1, max_wait_ms=0, max_queue=2)
        b.start()
        first = b.submit(np.array([[1.0]]))
        while not (b.busy == 1 and b.depth == 0):  # wait until first is in the forward
            await asyncio.sleep(0.001)
        doomed = b.submit(np.array([[2.0]]))
        kept = b.submit(np.array([[3.0]]))
        with pytest.raises(Unavailable):
            b.submit(np.array([[4.0]]))
        doomed.cancel()  # the client went away
        await asyncio.sleep(0)  # done-callbacks run on the next loop turn
        assert b.depth == 1
        gate.set()
        await asyncio.gather(first, kept)
        await b.close()
        with pytest.raises(Unavailable):
            b.submit(np.array([[5.0]]))

    asyncio.run(run())
    assert seen == [1.0, 3.0]


def test_batcher_rejects_outputs_with_wrong_row_count() -> None:
    async def run() -> Any:
        b = Batcher("m", lambda x: {"y": np.zeros(len(x) + 1)}, max_wait_ms=0)
        b.start()
        out = await asyncio.gather(b.submit(np.ones((2, 1))), return_exceptions=True)
        await b.close()
        return out[0]

    err = asyncio.run(run())
    assert getattr(err, "status", None) == 500


# ------------------------------------------------------------------------------ management


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return loaded_digits(tmp_path_factory.getbasetemp())


def test_management_api(loaded: Any, tmp_path: Path) -> None:
    from shipyard.package.registry import Registry

    with Registry() as reg:
        mv = reg.register(loaded.path, name="digits-mgmt")
    with TestClient(create_app(ServeSettings(), preloaded=[loaded])) as c:
        models = c.get("/v2/admin/models").json()["models"]
        assert [m["name"] for m in models] == ["digits"]
        r = c.post("/v2/admin/models/load", json={"ref": f"digits-mgmt:{mv.version}"})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["default_version"] == str(mv.version)
        assert c.get("/v2/models/digits-mgmt").json()["versions"] == [str(mv.version)]
        r = c.post("/v2/admin/models/load", json={"ref": f"digits-mgmt:{mv.version}"})
        assert r.status_code == 409 and "already loaded" in r.json()["error"]
        assert c.post("/v2/admin/models/load", json={"ref": "../etc"}).status_code == 404
        assert c.post("/v2/admin/models/load", json={"ref": 3}).status_code == 400
        r = c.post("/v2/admin/models/digits/default", json={"version": "nope"})
        assert r.status_code == 404
        r = c.post(f"/v2/admin/models/digits-mgmt/versions/{mv.version}/unload")
        assert r.status_code == 200
        assert c.get("/v2/models/digits-mgmt").status_code == 404
    with TestClient(create_app(ServeSettings(workers=2), preloaded=[loaded])) as c:
        r = c.post("/v2/admin/models/load", json={"ref": "digits-mgmt:1"})
        assert r.status_code == 409 and "worker processes" in r.json()["error"]


# ------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("group", ["api-keys", "keys"])
def test_api_keys_add_list_revoke(tmp_path: Path, group: str) -> None:
    """`shipyard api-keys ...`, and the deprecated `shipyard keys ...` with its note."""
    runner = CliRunner()
    path = tmp_path / "keys.json"
    r = runner.invoke(
        cli_app, [group, "add", "--scope", "infer", "--name", "svc", "--keys-file", str(path)]
    )
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[0]
    assert key.startswith("sy_") and key not in path.read_text()
    deprecated = "`shipyard keys add` is deprecated; use `shipyard api-keys add`"
    assert (deprecated in r.stderr) is (group == "keys")
    r = runner.invoke(cli_app, [group, "list", "--keys-file", str(path), "--json"])
    listed = json.loads(r.stdout)
    assert listed[0]["name"] == "svc" and "sha256" not in listed[0]
    r = runner.invoke(cli_app, [group, "revoke", "svc", "--keys-file", str(path)])
    assert r.exit_code == 0
    assert json.loads(path.read_text())["keys"][0]["revoked"] is True
    r = runner.invoke(cli_app, [group, "add", "--scope", "root", "--keys-file", str(path)])
    assert r.exit_code != 0


def test_api_keys_table_fits_80_columns(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    runner = CliRunner()
    for name in ("billing-service", "a-rather-long-name-for-the-nightly-batch-scoring-job"):
        runner.invoke(cli_app, ["api-keys", "add", "--scope", "infer", "--name", name,
                                "--keys-file", str(path)])  # fmt: skip
    r = runner.invoke(
        cli_app, ["api-keys", "list", "--keys-file", str(path)], env={"COLUMNS": "80"}
    )
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout and max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "a-rather-long-name-for-the-nightly-batch-scoring-job" in r.stdout.replace("\n", "")


def test_served_model_withdraws_work_of_a_client_that_went_away() -> None:
    from shipyard.serve.core import WATCH_AFTER_S, ServedModel

    gate, seen, fn = gated_double()

    async def run() -> None:
        b = Batcher("m", fn, max_batch_size=1, max_wait_ms=0)
        b.start()
        served = ServedModel("m", "1", loaded=None, batcher=b, load_seconds=0.0, source="-")  # type: ignore[arg-type]
        first = asyncio.ensure_future(served.infer(np.array([[1.0]]), timeout_s=5))
        while not (b.busy == 1 and b.depth == 0):  # first is in the (blocked) forward
            await asyncio.sleep(0.001)
        gone = asyncio.Event()
        watched: list[float] = []

        async def disconnected() -> None:
            watched.append(asyncio.get_running_loop().time())
            await gone.wait()

        start = asyncio.get_running_loop().time()
        doomed = asyncio.ensure_future(
            served.infer(np.array([[2.0]]), timeout_s=5, disconnected=disconnected)
        )
        while not watched:  # the watcher starts only after WATCH_AFTER_S
            await asyncio.sleep(0.005)
        assert watched[0] - start >= WATCH_AFTER_S * 0.9
        assert b.depth == 1
        gone.set()  # the client goes away while its request is queued
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert b.depth == 0
        with pytest.raises(DeadlineExceeded, match=r"0\.05s"):
            await served.infer(np.array([[3.0]]), timeout_s=0.05)  # queued behind `first`
        gate.set()
        assert (await first)["y"].tolist() == [[2.0]]
        await b.close()

    asyncio.run(run())
    assert seen == [1.0]  # neither the withdrawn nor the expired request ever ran


def test_fast_lane_serves_inference_routes_and_leaves_the_rest_to_fastapi(
    tmp_path: Path,
) -> None:
    loaded = loaded_digits(tmp_path)
    x = digits_inputs(1).reshape(1, 64)
    with TestClient(create_app(ServeSettings(), preloaded=[loaded])) as client:
        body = {"instances": x.tolist()}
        want = loaded.predict(x.tolist())
        r = client.post("/v1/models/digits:predict", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == want
        version = r.json()["model_version"]
        r = client.post(f"/v1/models/digits/versions/{version}:predict", json=body)
        assert r.status_code == 200 and r.json()["predictions"] == want
        spec = loaded.signature.inputs[0]
        v2 = {
            "inputs": [
                {
                    "name": spec.name,
                    "shape": [1, *spec.shape[1:]],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        r = client.post(f"/v2/models/digits/versions/{version}/infer", json=v2)
        assert r.status_code == 200 and r.json()["model_version"] == version
        # errors from the lane have the app's JSON body
        r = client.post("/v1/models/nope:predict", json=body)
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
        r = client.post("/v1/models/digits/versions/9:predict", json=body)
        assert r.status_code == 404 and "error" in r.json()
        # other methods and paths still go through FastAPI
        assert client.get("/v2/models/digits/infer").status_code == 405
        assert client.post("/v1/models/a/b:predict", json=body).status_code == 404
        # and FastAPI still documents the lane's routes
        paths = client.get("/openapi.json").json()["paths"]
        for path in (
            "/v1/models/{model_name}:predict",
            "/v1/models/{model_name}/versions/{version}:predict",
            "/v2/models/{model_name}/infer",
            "/v2/models/{model_name}/versions/{version}/infer",
        ):
            assert "post" in paths[path]
        metrics = client.get("/metrics").text
        assert 'route="/v1/models/{model_name}/versions/{version}:predict",status="200"' in metrics
