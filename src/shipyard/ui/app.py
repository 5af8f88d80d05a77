"""The dashboard mounted on a shipyard server app: `mount_ui(app, settings)`.

`shipyard ui` is a server with no models plus the dashboard; `shipyard serve --ui` mounts it on a
server that serves models, so the server and playground pages show (and call) that server. Both
reuse the server's API keys: with keys, every /ui path (pages, assets, JSON) needs one, sent as a
bearer header or as the session cookie the login form sets (`shipyard.ui.login`).

Every response under /ui carries a strict Content-Security-Policy: scripts, styles, images and
connections from this origin only, no inline code, no frames. Violations the browser sees are
posted to /ui/api/csp-report, counted, and listed at GET /ui/api/csp-report.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.package import LoadedModel
from shipyard.package.registry import Registry
from shipyard.serve.app import create_app
from shipyard.serve.http import authorize, read_body
from shipyard.serve.settings import ServeSettings
from shipyard.ui.api import UIContext, build_router
from shipyard.ui.login import UIAuth, build_login
from shipyard.ui.pages import build_pages
from shipyard.ui.runs import RunStore

log = logging.getLogger("shipyard.ui")

UI_ENV = "SHIPYARD_UI_SETTINGS"
STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'; report-uri /ui/api/csp-report"
)
_MAX_CSP_REPORT = 16 << 10
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class UISettings(BaseModel):
    """What the dashboard reads: a runs folder and a registry (default: the usual one)."""

    model_config = ConfigDict(extra="forbid")
    runs_dir: Path = Path("runs")
    registry_url: str | None = None
    artifact_root: str | None = None

    def to_env(self) -> None:
        """Publish for worker processes (see `serve_app_from_env`)."""
        os.environ[UI_ENV] = self.model_dump_json()


class SecurityHeaders:
    """Pure ASGI middleware: CSP and friends on /ui responses; other paths pass untouched (the
    inference routes keep their fast path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/" or path == "/ui" or path.startswith("/ui/")):
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
        if path.startswith("/ui/api/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                headers = list(message.get("headers", []))
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_ui(app: FastAPI, settings: UISettings) -> FastAPI:
    """Add the dashboard (pages, JSON API, assets under /ui) to a `create_app` server app."""
    ctx = UIContext(
        RunStore(settings.runs_dir),
        lambda: Registry(settings.registry_url, settings.artifact_root),
    )
    violations: list[dict[str, Any]] = []

    app.add_middleware(UIAuth)  # inside SecurityHeaders: its 401s and redirects get the CSP too
    app.add_middleware(SecurityHeaders)

    @app.post("/ui/api/csp-report", include_in_schema=False)
    async def csp_report(request: Request) -> Response:
        # the browser posts these without credentials: accept a small body (413 beyond), keep a few
        body = await read_body(request, _MAX_CSP_REPORT)
        if len(violations) < 100:
            try:
                report = json.loads(body or b"{}")
            except ValueError:
                report = {"raw": body[:200].decode(errors="replace")}
            violations.append(report)
            log.warning("CSP violation: %s", report)
        return Response(status_code=204)

    @app.get("/ui/api/csp-report", include_in_schema=False)
    async def csp_reports(request: Request) -> JSONResponse:
        await authorize(request, "infer")
        return JSONResponse({"violations": violations})

    app.include_router(build_router(ctx))
    app.include_router(build_login())
    app.include_router(build_pages())
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")

    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> Any:
        async with previous(app_) as state:
            try:
                yield state
            finally:
                ctx.close()

    app.router.lifespan_context = lifespan
    return app


def create_ui_app(
    serve: ServeSettings, ui: UISettings, *, preloaded: Sequence[LoadedModel] = ()
) -> FastAPI:
    """A server app (models from `serve`, possibly none) with the dashboard mounted;
    `preloaded` models (already in memory) are served as they are, as in `create_app`."""
    return mount_ui(create_app(serve, preloaded=preloaded), ui)


def serve_app_from_env() -> FastAPI:
    """Uvicorn factory for worker processes of `shipyard serve --ui --workers N`."""
    raw = os.environ.get(UI_ENV) or "{}"
    return create_ui_app(ServeSettings.from_env(), UISettings.model_validate_json(raw))
