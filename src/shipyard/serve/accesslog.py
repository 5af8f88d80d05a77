"""Per-request plumbing as one ASGI middleware: request id, access log, metrics, last-resort 500.

Every response carries `X-Request-ID` (the client's, when it sends a well-formed one, else a new
one) and every request writes one JSON line to the `shipyard.serve.access` logger.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.serve import metrics

access_log = logging.getLogger("shipyard.serve.access")
log = logging.getLogger("shipyard.serve")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# Request ids: a random per-process prefix and a counter (unique without a urandom call each).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A fresh request id (32 hex digits, unique across processes and restarts)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def iso_timestamp(t: float) -> str:
    """`t` (seconds since the epoch) as 2026-01-31T12:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class AccessLogMiddleware:
    """Wraps the app: request ids, one JSON log line per request, request metrics, 413 on a
    declared Content-Length over the limit, and a JSON 500 (never a traceback) on a crash."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, enabled: bool = True) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        supplied = length = ""
        for k, v in scope["headers"]:  # only two headers matter here: no dict of all of them
            name = k.lower()
            if name == b"x-request-id":
                supplied = v.decode("latin-1")
            elif name == b"content-length":
                length = v.decode("latin-1")
        request_id = supplied if REQUEST_ID.match(supplied) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            if length.isdigit() and int(length) > self.max_body_bytes:
                await _json(
                    send_with_id,
                    413,
                    {
                        "error": f"request body of {length} bytes exceeds the limit of "
                        f"{self.max_body_bytes}"
                    },
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                await _json(
                    send_with_id, 500, {"error": "internal server error", "request_id": request_id}
                )
        finally:
            metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            model = state.get("model") or ""
            metrics.observe_request(model, template, status, elapsed)
            if self.enabled and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                record: dict[str, Any] = {
                    "ts": iso_timestamp(time.time()),
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "route": template,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "model": model or None,
                    "key_id": state.get("key_id"),
                    "client": client[0] if client else None,
                }
                access_log.info(orjson.dumps(record).decode())


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})
