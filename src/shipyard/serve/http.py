"""Request plumbing the routes share: server state, the auth dependency, body reading."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from shipyard.serve.auth import ApiKey, KeyStore, RateLimiter, require_scope
from shipyard.serve.batching import Outputs
from shipyard.serve.core import ModelRepository, ServedModel
from shipyard.serve.errors import BadRequest, PayloadTooLarge
from shipyard.serve.settings import ServeSettings

_Body = TypeVar("_Body", bound=BaseModel)


@dataclass
class ServerState:
    """What one server process holds: settings, models, keys, rate limits."""

    settings: ServeSettings
    repo: ModelRepository
    keys: KeyStore | None
    limiter: RateLimiter | None
    shutting_down: bool = False


def state_of(request: Request) -> ServerState:
    """This app's ServerState."""
    state: ServerState = request.app.state.server
    return state


async def server_state(request: Request) -> ServerState:
    """FastAPI dependency: this app's ServerState. Async on purpose: FastAPI runs a sync
    dependency in its thread pool, a thread hop on every request."""
    return state_of(request)


async def authorize(request: Request, scope: str) -> ApiKey | None:
    """Authenticate the bearer key, check `scope`, rate-limit; return the key (None without auth).

    401 without a valid key, 403 without the scope, 429 over the key's rate (clients without
    auth are limited per address). Hot routes call this directly rather than through
    `require`: FastAPI's dependency solving costs more per request than the check itself.
    """
    state = state_of(request)
    key: ApiKey | None = None
    if state.keys is not None:
        key = state.keys.authenticate(request.headers.get("authorization"))
        request.state.key_id = key.id
        require_scope(key, scope)
    if state.limiter is not None:
        client = key.id if key is not None else (request.client.host if request.client else "-")
        state.limiter.check(client)
    return key


def require(scope: str) -> Callable[[Request], Awaitable[ApiKey | None]]:
    """FastAPI dependency factory: `authorize(request, scope)` (see there)."""

    async def dependency(request: Request) -> ApiKey | None:
        return await authorize(request, scope)

    return dependency


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 beyond), gzip/deflate decoded if declared."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding[:32]!r} is not supported (gzip, deflate)")
    # bounded decompression: a small compressed body must not expand past the limit
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile):
        raise BadRequest(f"request body is not valid {encoding} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    return out


async def model_request_body(
    request: Request, state: ServerState, model_name: str, version: str | None
) -> bytes:
    """The body of a request to one model: 404 before reading a body for nothing, and the
    request tagged with its model (metrics, access log)."""
    state.repo.get(model_name, version)
    request.state.model = model_name
    return await read_body(request, state.settings.max_body_bytes)


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body; BadRequest when it is not JSON."""
    try:
        return orjson.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None


async def parse_body(request: Request, model: type[_Body], limit: int) -> _Body:
    """The request's JSON body (at most `limit` bytes; none reads as {}) validated strictly
    against `model`; BadRequest naming the first bad field."""
    raw = parse_json(await read_body(request, limit) or b"{}")
    try:
        # strict: "version": "1" or "make_default": "yes" is a mistake to name, not a value to guess
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}") from None


async def run_model(request: Request, state: ServerState, served: ServedModel, x: Any) -> Outputs:
    """`served.infer(x)` under the server's timeout, withdrawn if the client goes away."""
    return await served.infer(
        x, timeout_s=state.settings.timeout_s, disconnected=lambda: disconnected(request)
    )


async def disconnected(request: Request) -> None:
    """Return when the client goes away (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
