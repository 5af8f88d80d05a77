"""The inference fast lane: `POST` requests to the inference routes (KServe V2 and simple
inference, OpenAI completions) skip FastAPI's router.

At thousands of small requests per second, FastAPI's route matching, dependency solving and
exception layers cost more than parsing the request and running a small model. The lane sits
just inside the access-log middleware (request ids, metrics, logs and the last-resort 500 still
apply), matches `POST` paths against the inference routes' templates and awaits the very same
endpoint functions that FastAPI declares for them, so both ways in behave identically. FastAPI
still owns those routes for everything else: the OpenAPI schema, and 405 for other methods.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard.serve.errors import RequestError
from shipyard.serve.http import ServerState, authorize, state_of

Endpoint = Callable[..., Awaitable[Response]]
ErrorRenderer = Callable[[RequestError], Response]


def _template_regex(path: str) -> re.Pattern[str]:
    """`/v2/models/{model_name}/infer` → a regex whose groups are the path parameters
    (one segment each, as Starlette's default `str` convertor)."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", path):
        out.append(re.escape(path[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(path[pos:]))
    return re.compile("".join(out))


@dataclass
class FastRoute:
    """A `POST` route template and its endpoint, called as `endpoint(request, **params)`.

    `openapi` holds what FastAPI's `add_api_route` takes to document it (`summary`,
    `responses`, `openapi_extra`, ...): the lane itself never looks at it. `render_error`, when
    set, renders this route's `RequestError`s (the OpenAI routes answer with OpenAI's error
    body) in place of the lane's default.
    """

    path: str  # the template; also what metrics and the access log report as the route
    endpoint: Endpoint
    openapi: dict[str, Any] = field(default_factory=dict)
    render_error: ErrorRenderer | None = None
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        self.regex = _template_regex(self.path)


ModelHandler = Callable[[Request, ServerState, str, str | None], Awaitable[Response]]


def model_routes(
    default: str, versioned: str, handler: ModelHandler, summary: str, openapi: dict[str, Any]
) -> list[FastRoute]:
    """The two routes of one inference operation: `default` (the model's default version) and
    `versioned` (with `{version}`). Both check the `infer` scope, then call
    `handler(request, state, model_name, version or None)`."""

    async def default_version(request: Request, model_name: str) -> Response:
        await authorize(request, "infer")
        return await handler(request, state_of(request), model_name, None)

    async def one_version(request: Request, model_name: str, version: str) -> Response:
        await authorize(request, "infer")
        return await handler(request, state_of(request), model_name, version)

    return [
        FastRoute(default, default_version, {"summary": f"{summary} (default version)", **openapi}),
        FastRoute(versioned, one_version, {"summary": f"{summary} (one version)", **openapi}),
    ]


def document(router: APIRouter, routes: Sequence[FastRoute]) -> None:
    """Declare `routes` on `router` too: FastAPI then documents them and answers 405 for other
    methods, while the lane serves their `POST`s."""
    for route in routes:
        router.add_api_route(
            route.path, route.endpoint, methods=["POST"], response_model=None, **route.openapi
        )


class InferenceFastLane:
    """ASGI middleware: serve `routes` directly, pass every other request to `app`.

    `render_error` turns a `RequestError` from an endpoint into the response the app's own
    exception handler would send (unless the route renders its own).
    """

    def __init__(
        self, app: ASGIApp, *, routes: Sequence[FastRoute], render_error: ErrorRenderer
    ) -> None:
        self.app = app
        self.routes = list(routes)
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for route in self.routes:
                match = route.regex.fullmatch(path)
                if match is None:
                    continue
                params = match.groupdict()
                scope["route"], scope["path_params"] = route, params
                request = Request(scope, receive, send)
                try:
                    response = await route.endpoint(request, **params)
                except RequestError as exc:
                    response = (route.render_error or self.render_error)(exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
