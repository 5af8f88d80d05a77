"""The dashboard's JSON endpoints on real run directories (a real digits training run from
examples/digits-mlp.yaml) and a real SQLite registry, through FastAPI's TestClient."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tests.ui_support import append_records, digits_runs, read_records, start_live_run

from shipyard.compress import BenchParams, compress
from shipyard.compress.measure import report_rows
from shipyard.package.registry import Registry
from shipyard.serve.auth import add_key
from shipyard.serve.settings import ServeSettings
from shipyard.ui import UISettings, config_diff, create_ui_app, downsample
from shipyard.ui.api import metrics_snapshot
from shipyard.ui.runs import RunStore, watched_metric

# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_runs(tmp_path_factory.getbasetemp())


@pytest.fixture
def runs(runs_root: Path, tmp_path: Path) -> Path:
    """A private copy of the runs folder (tests append to and add runs)."""
    return Path(shutil.copytree(runs_root, tmp_path / "runs"))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "keys.json"
    admin, _ = add_key(path, "admin", "alice")
    infer, _ = add_key(path, "infer", "bob")
    return {"path": str(path), "admin": admin, "infer": infer}


@pytest.fixture
def registry_url(tmp_path: Path, runs: Path) -> str:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url, tmp_path / "store") as reg:
        package = runs / "digits-mlp" / "lr-3e-3" / "package"
        reg.register(package, name="digits")
        reg.register(package, name="digits")
    return url


@pytest.fixture
def client(
    runs: Path, keys: dict[str, str], registry_url: str, tmp_path: Path
) -> Iterator[TestClient]:
    settings = ServeSettings(keys_file=Path(keys["path"]), access_log=False)
    ui = UISettings(runs_dir=runs, registry_url=registry_url, artifact_root=str(tmp_path / "store"))
    with TestClient(create_ui_app(settings, ui)) as c:
        c.headers["Authorization"] = f"Bearer {keys['infer']}"
        yield c


def admin(keys: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys['admin']}"}


# ----------------------------------------------------------------------------------- runs


def test_runs_table_lists_real_runs_with_their_best_and_final_values(
    client: TestClient, runs: Path
) -> None:
    body = client.get("/ui/api/runs").json()
    rows = {r["id"]: r for r in body["runs"]}
    assert set(rows) == {"digits-mlp/lr-3e-3", "digits-mlp/lr-1e-2"}
    for run_id, row in rows.items():
        records = read_records(runs / run_id)
        vals = [r["accuracy"] for r in records if r["kind"] == "val"]
        losses = [r["loss"] for r in records if r["kind"] == "train"]
        assert row["name"] == "digits-mlp" and row["status"] == "finished"
        # examples/digits-mlp.yaml stops early on val accuracy (mode max): that is the metric
        assert row["best"]["metric"] == "accuracy"
        assert row["best"]["value"] == max(vals)
        assert row["final_loss"] == losses[-1]
        assert row["spark"] == [float(f"{v:.4g}") for v in losses]  # not downsampled: short
        assert row["has_package"] is True
        assert row["duration_s"] is not None and row["duration_s"] >= 0


def test_run_detail_has_config_report_checkpoints_and_package(
    client: TestClient, runs: Path
) -> None:
    body = client.get("/ui/api/runs/digits-mlp/lr-1e-2").json()
    assert body["config"]["optim"]["lr"] == 0.01
    report = json.loads((runs / "digits-mlp" / "lr-1e-2" / "report.json").read_text())
    assert body["report"]["test"]["accuracy"] == report["test"]["accuracy"]
    assert "per_class" not in body["report"]["test"]  # bulky tables stay out
    assert body["checkpoints"] and all(c.startswith("step-") for c in body["checkpoints"])
    assert body["package"]["name"] == "digits-mlp"
    assert "loss.png" in body["plots"]
    png = client.get("/ui/api/runs/digits-mlp/lr-1e-2/files/loss.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_series_by_step_epoch_and_time_with_the_best_point(client: TestClient, runs: Path) -> None:
    records = read_records(runs / "digits-mlp" / "lr-3e-3")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    body = client.get("/ui/api/runs/digits-mlp/lr-3e-3/series").json()
    assert set(body["series"]) >= {"loss", "val_loss", "val_accuracy"}
    loss = body["series"]["loss"]
    assert loss["x"] == [r["step"] for r in train] and loss["y"] == [r["loss"] for r in train]
    acc = body["series"]["val_accuracy"]
    best = max(val, key=lambda r: r["accuracy"])
    assert acc["best"] == {"x": best["step"], "y": best["accuracy"], "mode": "max"}
    assert body["series"]["val_loss"]["best"]["mode"] == "min"

    by_epoch = client.get("/ui/api/runs/digits-mlp/lr-3e-3/series?keys=loss&x=epoch").json()
    assert by_epoch["series"]["loss"]["x"] == [r["epoch"] for r in train]
    by_time = client.get("/ui/api/runs/digits-mlp/lr-3e-3/series?keys=loss&x=time").json()
    xs = by_time["series"]["loss"]["x"]
    assert xs[0] == 0.0 and xs == sorted(xs)
    assert xs[-1] == pytest.approx(train[-1]["time"] - train[0]["time"])


def test_series_errors_name_the_bad_value(client: TestClient) -> None:
    r = client.get("/ui/api/runs/digits-mlp/lr-3e-3/series?keys=nope")
    assert r.status_code == 400 and "unknown series 'nope'" in r.json()["error"]
    assert "val_accuracy" in r.json()["error"]  # the allowed values are listed
    r = client.get("/ui/api/runs/digits-mlp/lr-3e-3/series?x=wallclock")
    assert r.status_code == 400 and "step, epoch, time" in r.json()["error"]
    r = client.get("/ui/api/runs/digits-mlp/lr-3e-3/series?max_points=1")
    assert r.status_code == 400 and "2..100000" in r.json()["error"]
    r = client.get("/ui/api/runs/digits-mlp/nope")
    assert r.status_code == 404 and "no run 'digits-mlp/nope'" in r.json()["error"]
    r = client.get("/ui/api/runs/digits-mlp/nope/series")
    assert r.status_code == 404 and "no run 'digits-mlp/nope'" in r.json()["error"]


def test_run_ids_cannot_leave_the_runs_folder(client: TestClient, runs: Path) -> None:
    outside = runs.parent / "outside"
    shutil.copytree(runs / "digits-mlp" / "lr-3e-3", outside)
    for bad in ("..%2Foutside", "digits-mlp/..%2F..%2Foutside", "%2Fetc"):
        r = client.get(f"/ui/api/runs/{bad}")
        assert r.status_code == 404, bad
    r = client.get("/ui/api/runs/digits-mlp/lr-3e-3/files/config.yaml")
    assert r.status_code == 404 and "loss.png" in r.json()["error"]


def test_tail_returns_exactly_the_appended_records(client: TestClient, runs: Path) -> None:
    live = start_live_run(runs, runs / "digits-mlp" / "lr-3e-3")
    first = client.get("/ui/api/runs/digits-mlp/live/tail?offset=0").json()
    assert len(first["records"]) == 2 and first["finished"] is False
    rows = client.get("/ui/api/runs").json()["runs"]
    assert {r["id"]: r["status"] for r in rows}["digits-mlp/live"] == "running"

    new = [{"kind": "train", "step": 40, "epoch": 1, "loss": 0.5, "time": 1.0e9}]
    append_records(live, new)
    with open(live / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 50')  # a line still being written
    second = client.get(f"/ui/api/runs/digits-mlp/live/tail?offset={first['offset']}").json()
    assert second["records"] == new
    with open(live / "metrics.jsonl", "a") as fh:
        fh.write(', "loss": 0.25}\n')
    third = client.get(f"/ui/api/runs/digits-mlp/live/tail?offset={second['offset']}").json()
    assert third["records"] == [{"kind": "train", "step": 50, "loss": 0.25}]
    # the series endpoint sees the growth too (the parse cache continues where it stopped)
    series = client.get("/ui/api/runs/digits-mlp/live/series?keys=loss").json()
    assert series["series"]["loss"]["y"][-2:] == [0.5, 0.25]
    r = client.get("/ui/api/runs/digits-mlp/live/tail?offset=-1")
    assert r.status_code == 400


def test_compare_shows_only_the_differing_settings(client: TestClient, runs: Path) -> None:
    q = "run=digits-mlp/lr-3e-3&run=digits-mlp/lr-1e-2"
    body = client.get(f"/ui/api/compare?{q}").json()
    assert body["differences"] == {"optim.lr": [0.003, 0.01]}
    assert [r["id"] for r in body["runs"]] == ["digits-mlp/lr-3e-3", "digits-mlp/lr-1e-2"]
    assert all("loss" in c and "val_accuracy" in c for c in body["curves"])
    for run_id, at_best, summary in zip(
        ("digits-mlp/lr-3e-3", "digits-mlp/lr-1e-2"), body["at_best"], body["runs"], strict=True
    ):
        (record,) = [
            r
            for r in read_records(runs / run_id)
            if r["kind"] == "val" and r["step"] == summary["best"]["step"]
        ]
        assert at_best == {k: v for k, v in record.items() if k not in ("kind", "step", "epoch")}
        assert at_best["accuracy"] == summary["best"]["value"]
    full = client.get(f"/ui/api/compare?{q}&full=1").json()["differences"]
    assert full["optim.lr"] == [0.003, 0.01] and full["model.name"] == ["mlp", "mlp"]
    r = client.get("/ui/api/compare?run=digits-mlp/lr-3e-3")
    assert r.status_code == 400 and "2 to 12 runs" in r.json()["error"]
    r = client.get("/ui/api/compare?run=digits-mlp/lr-3e-3&run=digits-mlp/nope")
    assert r.status_code == 404 and "no run 'digits-mlp/nope'" in r.json()["error"]
    r = client.get(f"/ui/api/compare?{q}&max_points=1")
    assert r.status_code == 400 and "max_points=1" in r.json()["error"]
    r = client.get(f"/ui/api/compare?{q}&x=wallclock")
    assert r.status_code == 400 and "step, epoch, time" in r.json()["error"]


# ------------------------------------------------------------------------------- registry


def test_registry_lists_models_versions_and_lineage(client: TestClient) -> None:
    models = client.get("/ui/api/registry/models").json()["models"]
    assert [(m["name"], m["versions"]) for m in models] == [("digits", 2)]
    body = client.get("/ui/api/registry/models/digits").json()
    assert [v["version"] for v in body["versions"]] == [2, 1]  # newest first
    assert body["versions"][0]["lineage"] and body["history"] == []
    r = client.get("/ui/api/registry/models/digitz")
    assert r.status_code == 404 and "did you mean 'digits'" in r.json()["error"]


def test_promote_and_rollback_record_the_key_name(client: TestClient, keys: dict[str, str]) -> None:
    url = "/ui/api/registry/models/digits"
    r = client.post(
        f"{url}/promote", json={"version": 1, "alias": "production"}, headers=admin(keys)
    )
    assert r.status_code == 200 and r.json()["actor"] == "alice"
    client.post(f"{url}/promote", json={"version": 2, "alias": "production"}, headers=admin(keys))
    assert client.get(url).json()["aliases"] == {"production": 2}
    r = client.post(f"{url}/rollback", json={"alias": "production"}, headers=admin(keys))
    assert r.status_code == 200 and r.json()["current"]["version"] == 1
    body = client.get(url).json()
    assert body["aliases"] == {"production": 1}
    events = [(e["action"], e["version"], e["actor"], e["undone"]) for e in body["history"]]
    assert events == [
        ("rollback", 1, "alice", False),
        ("promote", 2, "alice", True),
        ("promote", 1, "alice", False),
    ]


QUICK_BENCH = BenchParams(latency_calls=2, throughput_calls=1, warmup=1, rounds=1)


def test_a_compressed_version_links_its_parent_and_its_report(
    client: TestClient, runs: Path, registry_url: str, tmp_path: Path
) -> None:
    parent = runs / "digits-mlp" / "lr-3e-3" / "package"  # registered as digits v1 and v2
    result = compress(parent, tmp_path / "int8", quantize="int8", bench=QUICK_BENCH)
    with Registry(registry_url, tmp_path / "store") as reg:
        reg.register(result.package, name="digits-int8")
    (version,) = client.get("/ui/api/registry/models/digits-int8").json()["versions"]
    # the child's lineage names its report; the registry kept it
    assert version["lineage"]["compression_report"] == str(result.report_path.resolve())
    assert version["parent_version"] == {"name": "digits", "version": 1}  # the first with it
    report = json.loads(result.report_path.read_text())
    shown = version["compression"]
    assert shown["report"] == report and shown["rows"] == report_rows(report)
    assert shown["method"] == "quantize" and shown["rows"][2][0].startswith("child: ")
    assert shown["parent"]["manifest_sha256"] == report["parent"]["manifest_sha256"]
    # a plain version has neither
    plain = client.get("/ui/api/registry/models/digits").json()["versions"][0]
    assert (plain["parent_version"], plain["compression"]) == (None, None)

    # a report of another package at that path (the output compressed again) is not shown
    report["child"]["manifest_sha256"] = "0" * 64
    result.report_path.write_text(json.dumps(report))
    (version,) = client.get("/ui/api/registry/models/digits-int8").json()["versions"]
    assert set(version["compression"]) == {"path", "error"}
    assert "describes another package" in version["compression"]["error"]
    result.report_path.write_text("not json")
    (version,) = client.get("/ui/api/registry/models/digits-int8").json()["versions"]
    assert version["compression"]["error"].endswith("is not a compression report")
    result.report_path.unlink()
    (version,) = client.get("/ui/api/registry/models/digits-int8").json()["versions"]
    assert version["compression"]["error"].startswith("the report is not at ")


def test_registry_writes_need_an_admin_key(client: TestClient, keys: dict[str, str]) -> None:
    url = "/ui/api/registry/models/digits/promote"
    r = client.post(url, json={"version": 1, "alias": "production"})  # the infer key
    assert r.status_code == 403 and "'admin'" in r.json()["error"]
    r = client.post(url, json={"version": 1}, headers={"Authorization": ""})
    assert r.status_code == 401
    r = client.get("/ui/api/runs", headers={"Authorization": ""})
    assert r.status_code == 401  # reads need a key too when the server has keys
    r = client.post("/ui/api/runs/digits-mlp/lr-3e-3/register", json={})
    assert r.status_code == 403
    assert client.get("/ui/api/registry/models/digits").json()["history"] == []


def test_registry_write_errors_are_4xx_json(client: TestClient, keys: dict[str, str]) -> None:
    url = "/ui/api/registry/models/digits"
    r = client.post(
        f"{url}/promote", json={"version": 9, "alias": "production"}, headers=admin(keys)
    )
    assert r.status_code == 404 and "existing versions: 1, 2" in r.json()["error"]
    r = client.post(f"{url}/promote", json={"version": 1, "alias": "Prod!"}, headers=admin(keys))
    assert r.status_code == 400 and "invalid alias 'Prod!'" in r.json()["error"]
    r = client.post(f"{url}/promote", json={"version": 0}, headers=admin(keys))
    assert r.status_code == 400 and r.json()["error"].startswith("version:")
    # strict, as /v2/admin: a string is not a version number
    r = client.post(f"{url}/promote", json={"version": "1"}, headers=admin(keys))
    assert r.status_code == 400 and r.json()["error"] == "version: Input should be a valid integer"
    r = client.post(f"{url}/promote", json={"version": 1, "extra": 1}, headers=admin(keys))
    assert r.status_code == 400 and r.json()["error"].startswith("extra:")
    r = client.post(f"{url}/promote", content=b"x" * (17 << 10), headers=admin(keys))
    assert r.status_code == 413
    r = client.post(f"{url}/rollback", json={"alias": "production"}, headers=admin(keys))
    assert r.status_code == 400 and "promote a version first" in r.json()["error"]
    r = client.post(f"{url}/promote", content=b"{not json", headers=admin(keys))
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_register_a_runs_package_from_the_dashboard(
    client: TestClient, keys: dict[str, str]
) -> None:
    r = client.post("/ui/api/runs/digits-mlp/lr-1e-2/register", json={}, headers=admin(keys))
    assert r.status_code == 200
    registered = r.json()["registered"]
    assert (registered["name"], registered["version"]) == ("digits-mlp", 1)
    assert registered["tags"] == {"registered_by": "alice"}


def test_v2_registry_database_gains_the_actor_columns(tmp_path: Path, runs: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with Registry(url, tmp_path / "store") as reg:
        reg.register(runs / "digits-mlp" / "lr-3e-3" / "package", name="m")
        reg.promote("m", 1, "production")
    with sqlite3.connect(tmp_path / "old.db") as conn:  # make it a v2 database again
        conn.execute("ALTER TABLE alias_history DROP COLUMN actor")
        conn.execute("ALTER TABLE alias_history DROP COLUMN action")
        conn.execute("UPDATE schema_version SET version = 2")
    with Registry(url, tmp_path / "store") as reg:
        assert reg.schema_version() == 3
        (old,) = reg.history("m")
        assert (old.action, old.actor, old.version) == ("promote", None, 1)
        reg.promote("m", 1, "staging", actor="carol")
        assert [(e.alias, e.actor) for e in reg.history("m")] == [
            ("staging", "carol"),
            ("production", None),
        ]


# --------------------------------------------------------------------- pages and security


def test_pages_render_with_a_strict_csp_and_local_assets(client: TestClient) -> None:
    for path in (
        "/ui/",
        "/ui/runs/digits-mlp/lr-3e-3",
        "/ui/compare",
        "/ui/registry",
        "/ui/server",
        "/ui/playground",
    ):
        r = client.get(path)  # the client's key
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in r.text and "style=" not in r.text and "http" not in r.text
    page = client.get("/ui/runs/%3Cscript%3Ex").text
    assert "<script>x" not in page and "&lt;script&gt;x" in page  # autoescaped
    for asset in ("ui.js", "chart.js", "ui.css", "favicon.svg"):
        r = client.get(f"/ui/static/{asset}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in client.get("/v2/health/live").headers


def test_with_keys_nothing_under_ui_answers_without_one(
    client: TestClient, keys: dict[str, str]
) -> None:
    anonymous = {"Authorization": ""}
    for path in ("/ui/", "/ui/runs/digits-mlp/lr-3e-3", "/ui/compare?run=a", "/ui/registry"):
        r = client.get(path, headers=anonymous, follow_redirects=False)
        assert r.status_code == 303 and r.text == "", path  # to the login form, no data
        assert r.headers["location"].startswith("/ui/login?next=%2Fui%2F")
        assert "default-src 'none'" in r.headers["content-security-policy"]
    for path in ("/ui/static/ui.js", "/ui/static/ui.css", "/ui/static/favicon.svg", "/ui/api/runs"):
        r = client.get(path, headers=anonymous)
        assert r.status_code == 401 and "ui.js" not in r.text, path
    bad = {"Authorization": "Bearer sy_00000000_" + "A" * 43}
    assert client.get("/ui/static/ui.js", headers=bad).status_code == 401
    assert client.get("/ui/", headers=bad, follow_redirects=False).status_code == 303
    # the login form itself is open, and self-contained: nothing else loads before a key
    form = client.get("/ui/login", headers=anonymous)
    assert form.status_code == 200 and 'action="/ui/login"' in form.text
    assert "/ui/static" not in form.text and "src=" not in form.text
    csp = form.headers["content-security-policy"]
    assert "style-src 'sha256-" in csp and "script-src 'sha256-" in csp and "unsafe" not in csp


def test_login_sets_a_strict_session_cookie_that_opens_the_dashboard(
    client: TestClient, keys: dict[str, str]
) -> None:
    client.headers.pop("Authorization")
    r = client.post(
        "/ui/login",
        data={"key": "sy_00000000_" + "A" * 43, "next": "/ui/registry"},
        follow_redirects=False,
    )
    assert r.status_code == 401 and "invalid API key" in r.text and "set-cookie" not in r.headers
    r = client.post(
        "/ui/login",
        data={"key": keys["admin"], "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/"  # only dashboard paths
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"shipyard_ui={keys['admin']};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http (the test client); set over https
    assert client.get("/ui/static/ui.js").status_code == 200
    assert client.get("/ui/registry").status_code == 200
    assert client.get("/ui/api/runs").status_code == 200
    # a write with the cookie: the key's name is recorded, as with the header
    url = "/ui/api/registry/models/digits/promote"
    r = client.post(url, json={"version": 1, "alias": "production"})
    assert r.status_code == 200 and r.json()["actor"] == "alice"
    # ...but not from another site's page (SameSite=Strict already keeps browsers from it)
    r = client.post(url, json={"version": 2}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert client.get("/ui/api/registry/models/digits").json()["aliases"] == {"production": 1}
    # the inference routes never take the cookie
    assert client.get("/v1/models").status_code == 401
    client.post("/ui/logout")
    assert client.get("/ui/static/ui.js").status_code == 401


def test_csp_reports_are_collected(client: TestClient) -> None:
    assert client.get("/ui/api/csp-report").json() == {"violations": []}
    report = {"csp-report": {"violated-directive": "script-src", "blocked-uri": "inline"}}
    assert client.post("/ui/api/csp-report", json=report).status_code == 204
    assert client.get("/ui/api/csp-report").json() == {"violations": [report]}
    # the body is read up to 16 KiB, never whole: a stream without a length stops there
    chunks = (b"x" * 4096 for _ in range(1000))
    assert client.post("/ui/api/csp-report", content=chunks).status_code == 413
    assert client.get("/ui/api/csp-report").json() == {"violations": [report]}


def test_server_endpoints_without_models(client: TestClient) -> None:
    body = client.get("/ui/api/server").json()
    assert body["ready"] is True and body["models"] == [] and body["auth"] is True
    # one process (no Prometheus multiprocess directory): the numbers are this process's
    assert (body["workers"], body["pid"], body["metrics_scope"]) == (1, os.getpid(), "this-process")
    snap = client.get("/ui/api/server/metrics").json()
    assert (snap["scope"], snap["pid"]) == ("this-process", os.getpid())
    assert snap["counters"]["shipyard_requests"] >= 1  # this client's own requests
    r = client.get("/ui/api/server/models/nope")
    assert r.status_code == 404


# ------------------------------------------------------------------------------- helpers


def test_downsample_keeps_ends_and_extremes() -> None:
    xs = np.arange(10, dtype=float)
    ys = np.array([5, 1, 2, 9, 3, 4, 0, 6, 7, 8], dtype=float)
    dx, dy = downsample(xs, ys, 6)  # 2 buckets of the 8 inner points: min and max of each
    assert dx == [0, 1, 3, 6, 8, 9] and dy == [5, 1, 9, 0, 7, 8]
    assert downsample(xs, ys, 100) == (xs.tolist(), ys.tolist())
    big = np.arange(100_000, dtype=float)
    dx, dy = downsample(big, np.sin(big / 1000), 1000)
    assert len(dx) <= 1000 and dx[0] == 0 and dx[-1] == 99_999
    assert max(dy) == pytest.approx(1.0, abs=1e-6) and min(dy) == pytest.approx(-1.0, abs=1e-6)


def test_config_diff_by_hand() -> None:
    a = {"optim": {"lr": 0.1, "name": "sgd"}, "train": {"epochs": 3}}
    b = {"optim": {"lr": 0.2, "name": "sgd"}, "train": {"epochs": 3, "seed": 1}}
    assert config_diff([a, b]) == {"optim.lr": [0.1, 0.2], "train.seed": [None, 1]}
    assert config_diff([a, b], full=True)["optim.name"] == ["sgd", "sgd"]


def test_metrics_snapshot_sums_counters_and_histograms() -> None:
    text = (
        "# TYPE shipyard_requests_total counter\n"
        'shipyard_requests_total{model="m",route="r",status="200"} 3\n'
        'shipyard_requests_total{model="m",route="r",status="503"} 2\n'
        "# TYPE lat histogram\n"
        'lat_bucket{le="0.1"} 1\nlat_bucket{le="+Inf"} 4\nlat_count 4\nlat_sum 1.5\n'
    )
    snap = metrics_snapshot(text)
    assert snap["counters"]["shipyard_requests"] == 5
    assert snap["counters"]["shipyard_request_errors"] == 2
    assert snap["histograms"]["lat"] == {"buckets": [[0.1, 1], [None, 4]], "count": 4, "sum": 1.5}


def test_run_store_survives_a_resumed_run_truncating_metrics(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    append_records(run, [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    store = RunStore(tmp_path)
    assert len(store.records(run)) == 3
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1}) + "\n")
    assert [r["step"] for r in store.records(run)] == [1]
    summary: dict[str, Any] = store.summary(run)
    assert summary["best"] is None and summary["final_loss"] == 1 and summary["status"] == "running"
    assert math.isclose(summary["spark"][0], 1.0)


def test_versions_link_back_to_their_run(
    client: TestClient, runs: Path, registry_url: str, tmp_path: Path
) -> None:
    from shipyard.train import package_run

    run = runs / "digits-mlp" / "lr-1e-2"
    package = package_run(run, tmp_path / "pkg")  # lineage.run_dir: this copy, under the root
    with Registry(registry_url, tmp_path / "store") as reg:
        reg.register(package, name="digits")
    versions = client.get("/ui/api/registry/models/digits").json()["versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [
        (3, "digits-mlp/lr-1e-2"),
        (2, None),  # packaged from a run directory outside the runs folder
        (1, None),
    ]


def test_the_watched_metric_is_the_trainers_choice(tmp_path: Path) -> None:
    # without early stopping the trainer keeps the checkpoint with the task's primary metric
    assert watched_metric({"task": "classification", "train": {"early_stopping": None}}) == (
        "accuracy",
        "max",
    )
    assert watched_metric({"task": "regression", "train": {}}) == ("mse", "min")
    assert watched_metric({"task": "language-modeling"}) == ("loss", "min")
    assert watched_metric(
        {"task": "classification", "train": {"early_stopping": {"metric": "loss", "mode": "min"}}}
    ) == ("loss", "min")
    assert watched_metric({"name": "hand-written"}) == ("loss", "min")

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\ntask: classification\n")
    append_records(
        run,
        [
            {"kind": "val", "step": 1, "loss": 0.5, "accuracy": 0.8},
            {"kind": "val", "step": 2, "loss": 0.4, "accuracy": 0.7},
        ],
    )
    best = RunStore(tmp_path).summary(run)["best"]
    assert best == {"metric": "accuracy", "value": 0.8, "step": 1}


def test_run_store_rereads_a_metrics_file_replaced_by_a_longer_one(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    append_records(run, [{"kind": "train", "step": s, "loss": 1.0} for s in (1, 2)])
    store = RunStore(tmp_path)
    assert [r["step"] for r in store.records(run)] == [1, 2]
    # a resume rewrites the file atomically (a new inode) and it grows before the next read
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(
        "".join(json.dumps({"kind": "train", "step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3, 4))
    )
    replacement.replace(run / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in store.records(run)] == [(s, 0.5) for s in (1, 2, 3, 4)]
    assert store.series(run, ["loss"])["series"]["loss"]["y"] == [0.5] * 4
