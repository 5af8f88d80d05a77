"""`create_app(settings) -> FastAPI`: the server as an ASGI app, for uvicorn, tests and notebooks.

Example::

    from shipyard.serve import ServeSettings, create_app
    app = create_app(ServeSettings(packages=["runs/digits/package"]))
    # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shipyard import __version__
from shipyard.package import LoadedModel
from shipyard.serve import management, metrics
from shipyard.serve.accesslog import AccessLogMiddleware, access_log
from shipyard.serve.auth import KeyStore, RateLimiter
from shipyard.serve.core import ModelRepository
from shipyard.serve.errors import RequestError
from shipyard.serve.fastlane import InferenceFastLane
from shipyard.serve.http import ServerState, require, server_state
from shipyard.serve.openapi import install, responses
from shipyard.serve.protocols import kserve_v2, openai, simple
from shipyard.serve.settings import ServeSettings, is_loopback

log = logging.getLogger("shipyard.serve")


def create_app(settings: ServeSettings, *, preloaded: Sequence[LoadedModel] = ()) -> FastAPI:
    """The server app. Models in `settings` load at start-up (lifespan); `preloaded` models
    (already in memory, e.g. in tests) are served as they are."""
    keys = KeyStore(settings.keys_file) if settings.auth_enabled and settings.keys_file else None
    limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
    state = ServerState(settings, ModelRepository(settings), keys, limiter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        repo = state.repo
        for loaded in preloaded:
            served = await repo.add(loaded, source="preloaded")
            repo.configured.add(served.name)
        bases = []
        sources: list[str | Path] = [*settings.packages, *settings.registry_refs]
        for source in sources:
            served = await repo.load(source)
            repo.configured.add(served.name)
            bases.append(served)
        for name, path in settings.adapters.items():  # settings checked: exactly one base
            served = await repo.load_adapter(name, path, bases[0])
            repo.configured.add(served.name)
        repo.started = True
        # Everything alive now (torch, the models) lives as long as the server: move it out of
        # the collector's sight, so full collections triggered by per-request garbage do not
        # walk millions of start-up objects (they showed up as ~100 ms p99 spikes under load).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and finished in-flight requests by now; drain the
            # batchers anyway (work queued by requests that were cut off by its timeout)
            state.shutting_down = True
            await repo.close()
            metrics.mark_worker_exit()

    app = FastAPI(
        title="shipyard",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    _configure_access_log(settings)
    # Middleware added last runs first: the access log wraps the fast lane, which wraps FastAPI.
    app.add_middleware(
        InferenceFastLane,
        routes=[*simple.FAST_ROUTES, *kserve_v2.FAST_ROUTES, *openai.FAST_ROUTES],
        render_error=_error_body,
    )
    app.add_middleware(
        AccessLogMiddleware, max_body_bytes=settings.max_body_bytes, enabled=settings.access_log
    )

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        if openai.is_openai_route(request):
            return openai.error_response(exc)
        return _error_body(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path[:200]}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    app.include_router(kserve_v2.build_router())
    app.include_router(simple.build_router())
    app.include_router(openai.build_router())
    app.include_router(management.build_router())

    metrics_open = (
        not settings.auth_enabled or settings.metrics_public or is_loopback(settings.host)
    )
    admin_only = require("admin")

    async def metrics_guard(request: Request) -> None:
        if not metrics_open:
            await admin_only(request)

    @app.get(
        "/metrics",
        tags=["observability"],
        summary="Prometheus metrics (text exposition format)",
        response_class=PlainTextResponse,
        responses=responses(401, 403, 429),
    )
    async def prometheus_metrics(
        _: None = Depends(metrics_guard), s: ServerState = Depends(server_state)
    ) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    install(app)
    return app


def app_from_env() -> FastAPI:
    """Uvicorn app factory for worker processes (`shipyard serve` publishes the settings)."""
    return create_app(ServeSettings.from_env())


def _error_body(exc: RequestError) -> JSONResponse:
    """The JSON error every non-OpenAI route answers a RequestError with."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def _configure_access_log(settings: ServeSettings) -> None:
    if not settings.access_log:
        return
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False
    access_log.setLevel(logging.INFO)
