"""The dashboard's JSON endpoints, under `/ui/api` (every page is drawn from these).

    GET  /ui/api/runs                              runs table (summaries, sparklines, cv/tune)
    GET  /ui/api/runs/{id}                         one run: config, summary, report, files
    GET  /ui/api/runs/{id}/series?keys=&x=&max_points=   downsampled curves + best points
    GET  /ui/api/runs/{id}/tail?offset=            records appended since `offset`
    GET  /ui/api/runs/{id}/files/{name}            a report plot (PNG) of the run
    GET  /ui/api/compare?run=A&run=B[&group=G][&full=1]   differing settings, best metrics,
                                                   curves, the cv/tune groups of the runs
    GET  /ui/api/registry/models                   registered models
    GET  /ui/api/registry/models/{name}            versions (lineage, metrics, aliases) + history
    POST /ui/api/registry/models/{name}/promote    {"version": 3, "alias": "production"}   admin
    POST /ui/api/registry/models/{name}/rollback   {"alias": "production"}                 admin
    GET  /ui/api/server                            health, loaded models (of the worker answering)
    GET  /ui/api/server/metrics                    a snapshot of /metrics as JSON (every worker)
    GET  /ui/api/server/models/{name}              what the playground needs: signature, labels

Reads need any valid API key when the server has keys; writes need an admin key, and the key's
name is recorded in the registry's alias history.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from shipyard.errors import RegistryError
from shipyard.package import MANIFEST
from shipyard.package.registry import Registry
from shipyard.serve import metrics
from shipyard.serve.auth import ApiKey
from shipyard.serve.errors import BadRequest, NotFound
from shipyard.serve.http import authorize, parse_body, state_of
from shipyard.train.checkpoint import list_checkpoints
from shipyard.train.rundir import CHECKPOINTS_DIR, PACKAGE_DIR
from shipyard.ui.groups import expand_groups, group_runs
from shipyard.ui.lineage import registered_digests, with_lineage
from shipyard.ui.runs import (
    RunNotFound,
    RunStore,
    UIError,
    collect_columns,
    config_diff,
    watched_metric,
)

T = TypeVar("T")
_PLOTS = ("loss.png", "lr.png", "confusion_matrix.png")  # what evaluate.report draws
_MAX_BODY = 16 << 10  # promote and rollback bodies are two short fields
MAX_COMPARE = 12


class PromoteRequest(BaseModel):
    """Body of POST .../promote."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    alias: str = "production"


class RollbackRequest(BaseModel):
    """Body of POST .../rollback."""

    model_config = ConfigDict(extra="forbid")
    alias: str = "production"


class UIContext:
    """What the endpoints share: the run store and a lazily opened registry."""

    def __init__(self, runs: RunStore, registry_factory: Callable[[], Registry]) -> None:
        self.runs = runs
        self._registry_factory = registry_factory
        self._registry: Registry | None = None

    def registry(self) -> Registry:
        """The registry, opened on first use (a bad URL fails the request, not the start)."""
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    def close(self) -> None:
        """Release the registry's connections."""
        if self._registry is not None:
            self._registry.close()
            self._registry = None


def actor_of(key: ApiKey | None) -> str:
    """The name recorded for a change: the API key's name, else the local user of the server."""
    if key is not None:
        return key.name
    try:
        return f"ui:{getpass.getuser()}"
    except (KeyError, OSError):
        return "ui"


async def _call(fn: Callable[[], T]) -> T:
    """Run blocking file/SQL work off the event loop; project errors become 4xx JSON: an
    unknown run 404, another bad request 400."""
    try:
        return await run_in_threadpool(fn)
    except RunNotFound as exc:
        raise NotFound(str(exc)) from None
    except UIError as exc:
        raise BadRequest(str(exc)) from None
    except RegistryError as exc:
        message = str(exc)
        missing = message.startswith("no model named") or " has no version " in message
        raise (NotFound if missing else BadRequest)(message) from None


def build_router(ctx: UIContext) -> APIRouter:
    """The /ui/api routes over `ctx`."""
    router = APIRouter(prefix="/ui/api", tags=["ui"])
    runs = ctx.runs

    # -- runs ---------------------------------------------------------------------------

    def grouped() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = runs.list_runs()
        return rows, group_runs(runs, rows)

    @router.get("/runs")
    async def list_runs(request: Request) -> dict[str, Any]:
        await authorize(request, "infer")
        rows, groups = await _call(grouped)
        return {"root": str(runs.root), "runs": rows, "groups": groups}

    @router.get("/runs/{run_id:path}/series")
    async def series(
        request: Request,
        run_id: str,
        keys: str | None = None,
        x: str = "step",
        max_points: int = 1000,
    ) -> dict[str, Any]:
        await authorize(request, "infer")
        wanted = [k for k in (keys or "").split(",") if k]

        return await _call(lambda: runs.series(runs.resolve(run_id), wanted or None, x, max_points))

    @router.get("/runs/{run_id:path}/tail")
    async def tail(request: Request, run_id: str, offset: int = 0) -> dict[str, Any]:
        await authorize(request, "infer")
        return await _call(lambda: runs.tail(runs.resolve(run_id), offset))

    @router.post("/runs/{run_id:path}/register")
    async def register(request: Request, run_id: str) -> dict[str, Any]:
        key = await authorize(request, "admin")

        def work() -> dict[str, Any]:
            package = runs.resolve(run_id) / PACKAGE_DIR
            if not (package / MANIFEST).is_file():
                raise UIError(f"run {run_id!r} has no package yet: shipyard package RUN_DIR")
            mv = ctx.registry().register(package, tags={"registered_by": actor_of(key)})
            return {"registered": mv.to_dict()}

        return await _call(work)

    @router.get("/runs/{run_id:path}/files/{name}")
    async def run_file(request: Request, run_id: str, name: str) -> FileResponse:
        await authorize(request, "infer")
        if name not in _PLOTS:
            raise NotFound(f"no file {name[:100]!r}; the dashboard serves: {', '.join(_PLOTS)}")
        run = await _call(lambda: runs.resolve(run_id))
        path = run / name
        if not path.is_file():
            raise NotFound(f"run {run_id!r} has no {name}")
        return FileResponse(path, media_type="image/png")

    @router.get("/runs/{run_id:path}")
    async def run_detail(request: Request, run_id: str) -> dict[str, Any]:
        await authorize(request, "infer")

        def work() -> dict[str, Any]:
            run = runs.resolve(run_id)
            report = runs.report(run)
            checkpoints = [p.name for p in list_checkpoints(run / CHECKPOINTS_DIR)]
            manifest: dict[str, Any] | None = None
            try:
                manifest = json.loads((run / PACKAGE_DIR / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = None
            return {
                "summary": runs.summary(run),
                "path": str(run),
                "config": runs.config(run),
                "report": _report_scalars(report),
                "plots": [p for p in _PLOTS if (run / p).is_file()],
                "checkpoints": checkpoints,
                "package": (
                    {
                        "path": str(run / PACKAGE_DIR),
                        "name": manifest.get("name"),
                        "version": manifest.get("version"),
                    }
                    if isinstance(manifest, dict)
                    else None
                ),
            }

        return await _call(work)

    @router.get("/compare")
    async def compare(
        request: Request,
        run: list[str] = Query(default_factory=list),
        group: list[str] = Query(default_factory=list),
        full: bool = False,
        x: str = "step",
        max_points: int = 500,
    ) -> dict[str, Any]:
        await authorize(request, "infer")

        def work() -> dict[str, Any]:
            rows, groups = grouped() if group or run else ([], [])
            ids = list(run)
            if group:
                try:
                    ids += expand_groups(groups, group, MAX_COMPARE - len(run))
                except KeyError as exc:
                    known = ", ".join(g["id"] for g in groups) or "none"
                    raise UIError(
                        f"no cv or tune group {str(exc.args[0])[:200]!r}; groups: {known[:500]}"
                    ) from None
            ids = list(dict.fromkeys(ids))
            if not 2 <= len(ids) <= MAX_COMPARE:
                raise UIError(
                    f"compare needs 2 to {MAX_COMPARE} runs, got {len(ids)}: "
                    "/ui/api/compare?run=ID1&run=ID2 (or group=CV-OR-STUDY-ID)"
                )
            dirs = [runs.resolve(r) for r in ids]
            configs = [runs.config(d) for d in dirs]
            listed = {r["id"]: r for r in rows}
            summaries = [listed.get(i) or runs.summary(d) for i, d in zip(ids, dirs, strict=True)]
            curves = []
            for d, cfg in zip(dirs, configs, strict=True):
                metric, _ = watched_metric(cfg)
                columns = collect_columns(runs.records(d))
                have = [k for k in ("loss", f"val_{metric}") if k in columns]
                curves.append(runs.series(d, have or None, x, max_points)["series"])
            at_best = []
            for d, summary in zip(dirs, summaries, strict=True):
                step = (summary.get("best") or {}).get("step")
                record = next(
                    (
                        r
                        for r in runs.records(d)
                        if r.get("kind") == "val" and r.get("step") == step
                    ),
                    {},
                )
                at_best.append(
                    {
                        k: v
                        for k, v in record.items()
                        if k not in ("kind", "step", "epoch", "time") and isinstance(v, int | float)
                    }
                )
            return {
                "runs": summaries,
                "groups": _groups_of(groups, summaries),
                "at_best": at_best,
                "differences": config_diff(configs, full=full),
                "full": full,
                "curves": curves,
            }

        return await _call(work)

    # -- registry ---------------------------------------------------------------------------

    @router.get("/registry/models")
    async def registry_models(request: Request) -> dict[str, Any]:
        await authorize(request, "infer")
        models = await _call(lambda: ctx.registry().list_models())
        return {"models": [m.to_dict() for m in models]}

    @router.get("/registry/models/{name}")
    async def registry_model(request: Request, name: str) -> dict[str, Any]:
        await authorize(request, "infer")

        def work() -> dict[str, Any]:
            reg = ctx.registry()
            versions = [_with_run(runs, v.to_dict()) for v in reversed(reg.list_versions(name))]
            has_parent = any((v.get("lineage") or {}).get("parent") for v in versions)
            digests = registered_digests(reg) if has_parent else None
            return {
                "name": name,
                "aliases": reg.aliases(name),
                "versions": with_lineage(versions, digests),
                "history": [e.to_dict() for e in reg.history(name)],
            }

        return await _call(work)

    @router.post("/registry/models/{name}/promote")
    async def promote(request: Request, name: str) -> dict[str, Any]:
        key = await authorize(request, "admin")
        body = await parse_body(request, PromoteRequest, _MAX_BODY)
        mv = await _call(
            lambda: ctx.registry().promote(name, body.version, body.alias, actor=actor_of(key))
        )
        return {"promoted": mv.to_dict(), "alias": body.alias, "actor": actor_of(key)}

    @router.post("/registry/models/{name}/rollback")
    async def rollback(request: Request, name: str) -> dict[str, Any]:
        key = await authorize(request, "admin")
        body = await parse_body(request, RollbackRequest, _MAX_BODY)
        mv = await _call(lambda: ctx.registry().rollback(name, body.alias, actor=actor_of(key)))
        return {"current": mv.to_dict(), "alias": body.alias, "actor": actor_of(key)}

    # -- server -----------------------------------------------------------------------------

    @router.get("/server")
    async def server(request: Request) -> dict[str, Any]:
        await authorize(request, "infer")
        state = state_of(request)
        repo = state.repo
        models = []
        for name in repo.names():
            for version, served in sorted(repo.versions(name).items()):
                models.append(
                    {
                        "name": name,
                        "version": version,
                        "default": repo.default_version(name) == version,
                        "task": served.loaded.task,
                        "kind": "language-model" if served.engine is not None else "tensor",
                        "source": served.source,
                        "loaded_at": served.loaded_at,
                        "load_seconds": round(served.load_seconds, 4),
                    }
                )
        return {
            "live": True,
            "ready": repo.ready and not state.shutting_down,
            "workers": state.settings.workers,
            "auth": state.settings.auth_enabled,
            # the worker that answered: its readiness and models' load times are its own (every
            # worker loads the same models: with --workers > 1 the admin API cannot change them)
            "pid": os.getpid(),
            "metrics_scope": metrics_scope(),
            "models": models,
        }

    @router.get("/server/metrics")
    async def server_metrics(request: Request) -> dict[str, Any]:
        await authorize(request, "infer")
        body, _ = metrics.render()
        return {
            **metrics_snapshot(body.decode()),
            "scope": metrics_scope(),
            "pid": os.getpid(),
        }

    @router.get("/server/models/{name}")
    async def server_model(request: Request, name: str) -> dict[str, Any]:
        await authorize(request, "infer")
        served = state_of(request).repo.get(name)
        return {
            "name": served.name,
            "version": served.version,
            "task": served.loaded.task,
            "kind": "language-model" if served.engine is not None else "tensor",
            **served.loaded.signature.model_dump(),  # inputs, outputs: name, datatype, shape
            "labels": served.loaded.labels,
        }

    return router


def _groups_of(
    groups: list[dict[str, Any]], summaries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The groups the compared runs belong to (and the studies those belong to), each with
    `compared`: the ids of its runs on the page."""
    by_id = {g["id"]: g for g in groups}
    out: dict[str, dict[str, Any]] = {}
    for s in summaries:
        gid = s.get("group")
        while isinstance(gid, str) and gid in by_id:
            g = out.setdefault(gid, {**by_id[gid], "compared": []})
            g["compared"].append(s["id"])
            gid = g.get("parent")
    return list(out.values())


def metrics_scope() -> str:
    """Whose requests /metrics counts: "all-workers" when `shipyard serve --workers N` shares
    a Prometheus multiprocess directory between its workers, else "this-process"."""
    return "all-workers" if os.environ.get(metrics.MULTIPROC_ENV) else "this-process"


def _with_run(runs: RunStore, version: dict[str, Any]) -> dict[str, Any]:
    """A version dict plus `run_id` when its lineage's run directory is one of the shown runs."""
    run_dir = (version.get("lineage") or {}).get("run_dir")
    version["run_id"] = None
    if isinstance(run_dir, str):
        path = Path(run_dir)
        if path.is_absolute() and path.resolve().is_relative_to(runs.root):
            version["run_id"] = runs.run_id(path.resolve())
    return version


def _report_scalars(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """report.json without the bulky per-class tables: {split: {metric: value}, run: {...}}."""
    if report is None:
        return None
    out: dict[str, Any] = {}
    for section, values in report.items():
        if isinstance(values, dict):
            out[section] = {
                k: v for k, v in values.items() if isinstance(v, int | float | str | bool | None)
            }
    return out


def metrics_snapshot(text: str) -> dict[str, Any]:
    """The Prometheus exposition as JSON the server page charts: counters summed over labels,
    histograms as cumulative buckets. Rates come from two snapshots (the page keeps the last)."""
    counters: dict[str, float] = {}
    histograms: dict[str, dict[str, Any]] = {}
    errors = 0.0
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            total = 0.0
            for s in family.samples:
                if s.name.endswith("_total"):
                    total += s.value
                    if family.name == "shipyard_requests" and s.labels.get("status", "")[:1] in (
                        "4",
                        "5",
                    ):
                        errors += s.value
            counters[family.name] = total
        elif family.type == "histogram":
            buckets: dict[float, float] = {}
            count = total = 0.0
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif s.name.endswith("_count"):
                    count += s.value
                elif s.name.endswith("_sum"):
                    total += s.value
            histograms[family.name] = {
                "buckets": [
                    [le if le != float("inf") else None, n] for le, n in sorted(buckets.items())
                ],
                "count": count,
                "sum": total,
            }
        elif family.type == "gauge":
            counters[family.name] = sum(s.value for s in family.samples)
    counters["shipyard_request_errors"] = errors
    return {"counters": counters, "histograms": histograms}
