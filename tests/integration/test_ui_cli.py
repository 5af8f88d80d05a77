"""`shipyard ui` and `shipyard serve --ui` as real processes on ephemeral loopback ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from tests.ui_support import ROOT, digits_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_runs(tmp_path_factory.getbasetemp())


@contextmanager
def started(*args: str) -> Iterator[tuple[str, str]]:
    """Run `python -m shipyard ARGS --port 0`; yield (base URL, the lines it printed first)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        match = re.search(r"http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+)", first)
        assert match, (first, proc.stderr.read() if proc.stderr else "")
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url, first + second
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_shipyard_ui_serves_the_runs(runs: Path) -> None:
    with started("ui", "--runs", str(runs)) as (url, printed):
        assert f"dashboard: {url}/ui/" in printed
        page = httpx.get(f"{url}/", follow_redirects=True)
        assert (
            page.status_code == 200
            and "default-src 'none'" in page.headers["content-security-policy"]
        )
        ids = sorted(r["id"] for r in httpx.get(f"{url}/ui/api/runs").json()["runs"])
        assert ids == ["digits-mlp/lr-1e-2", "digits-mlp/lr-3e-3"]


def test_off_loopback_nothing_answers_without_a_key_over_http(runs: Path, tmp_path: Path) -> None:
    from shipyard.serve.auth import add_key

    keys = tmp_path / "keys.json"
    key, _ = add_key(keys, "infer", "bob")
    args = ("ui", "--runs", str(runs), "--host", "0.0.0.0", "--keys-file", str(keys))
    with started(*args) as (url, printed), httpx.Client(base_url=url) as anonymous:
        assert "http://0.0.0.0:" in printed  # bound off loopback (reached here via 127.0.0.1)
        for path in ("/ui/", "/ui/runs/digits-mlp/lr-3e-3", "/ui/compare", "/ui/server"):
            r = anonymous.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
        for path in ("/ui/static/ui.js", "/ui/static/chart.js", "/ui/static/ui.css"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.get("/ui/api/runs").status_code == 401
        assert anonymous.get("/ui/login").status_code == 200
        with httpx.Client(base_url=url) as browser:  # keeps cookies, as a browser does
            r = browser.post("/ui/login", data={"key": key, "next": "/ui/compare"})
            assert r.status_code == 303 and r.headers["location"] == "/ui/compare"
            assert "HttpOnly" in r.headers["set-cookie"]
            assert browser.get("/ui/static/ui.js").status_code == 200
            page = browser.get("/ui/compare")
            assert page.status_code == 200 and "/ui/static/ui.js" in page.text
            ids = sorted(r["id"] for r in browser.get("/ui/api/runs").json()["runs"])
            assert ids == ["digits-mlp/lr-1e-2", "digits-mlp/lr-3e-3"]
            browser.post("/ui/logout")
            assert browser.get("/ui/api/runs").status_code == 401


def test_serve_with_ui_mounts_the_dashboard_beside_the_model(runs: Path) -> None:
    package = runs / "digits-mlp" / "lr-3e-3" / "package"
    with started("serve", str(package), "--ui", "--runs", str(runs)) as (url, _):
        models = httpx.get(f"{url}/ui/api/server").json()["models"]
        assert [m["name"] for m in models] == ["digits-mlp"]
        meta = httpx.get(f"{url}/ui/api/server/models/digits-mlp").json()
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and len(meta["labels"]) == 10
        # the inference routes are untouched by the dashboard's headers
        assert "content-security-policy" not in httpx.get(f"{url}/v2/models/digits-mlp").headers


def test_the_server_page_with_two_workers_counts_every_workers_requests(runs: Path) -> None:
    package = runs / "digits-mlp" / "lr-3e-3" / "package"
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]
    }
    args = ("serve", str(package), "--ui", "--runs", str(runs), "--workers", "2")
    with started(*args) as (url, printed):
        assert "2 worker(s)" in printed
        name = httpx.get(f"{url}/ui/api/server/models/digits-mlp").json()["inputs"][0]["name"]
        tensor = {"name": name, "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}
        body = {"inputs": [tensor]}
        answered: dict[int, int] = {}  # worker pid -> rows it inferred
        for _ in range(200):  # a new connection each time, until both workers have answered
            with httpx.Client(base_url=url) as client:
                info = client.get("/ui/api/server").json()
                assert (info["workers"], info["metrics_scope"]) == (2, "all-workers")
                assert [m["name"] for m in info["models"]] == ["digits-mlp"]  # in every worker
                r = client.post("/v2/models/digits-mlp/infer", json=body)  # same connection,
                assert r.status_code == 200, r.text  # so the same worker
                answered[info["pid"]] = answered.get(info["pid"], 0) + 1
            if len(answered) == 2 and sum(answered.values()) >= 8:
                break
        assert len(answered) == 2, f"one worker answered all {sum(answered.values())} requests"
        sent = sum(answered.values())
        for _ in range(4):
            with httpx.Client(base_url=url) as client:
                snap = client.get("/ui/api/server/metrics").json()
            # whichever worker answers, the rows counted are every worker's (each worker alone
            # inferred fewer than `sent`)
            assert snap["scope"] == "all-workers"
            assert snap["histograms"]["shipyard_batch_size_rows"]["sum"] == sent, answered


def test_ui_refuses_bad_arguments_with_one_line(runs: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shipyard", "ui", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SHIPYARD_HOME": str(tmp_path / "home")},
        )

    out = run("--runs", str(runs), "--host", "0.0.0.0", "--port", "0")
    assert out.returncode == 2 and "refusing to bind '0.0.0.0' without API keys" in out.stderr
    out = run("--runs", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such folder of runs; pass --runs DIR" in out.stderr
    assert "Traceback" not in out.stderr
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_ui_refuses_a_keys_file_without_active_keys(tmp_path: Path) -> None:
    from shipyard.serve.auth import add_key, revoke_key

    keys = tmp_path / "keys.json"
    add_key(keys, "admin", "alice")
    revoke_key(keys, "alice")
    (tmp_path / "runs").mkdir()
    args = ["--runs", str(tmp_path / "runs"), "--keys-file", str(keys), "--port", "0"]
    out = subprocess.run(
        [sys.executable, "-m", "shipyard", "ui", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no active keys (add one: shipyard api-keys add)" in out.stderr
