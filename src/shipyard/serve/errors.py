"""Errors a request can end in. Each carries its HTTP status; the app turns it into JSON."""

from __future__ import annotations

from shipyard.serve.settings import ServeError


class RequestError(ServeError):
    """A request the server refuses; `status` is the HTTP status, `headers` extra headers."""

    status = 400

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(RequestError):
    """Malformed body or tensors that do not match the model's signature."""

    status = 400


class Unauthorized(RequestError):
    """No API key, or an unknown one."""

    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(RequestError):
    """A valid key without the scope the route needs."""

    status = 403


class NotFound(RequestError):
    """Unknown model, version or route."""

    status = 404


class Conflict(RequestError):
    """A management operation that contradicts the server's state."""

    status = 409


class PayloadTooLarge(RequestError):
    """The body is larger than --max-body-bytes."""

    status = 413


class RateLimited(RequestError):
    """The key's token bucket is empty."""

    status = 429


class Unavailable(RequestError):
    """The model's queue is full or it is being unloaded: retry later."""

    status = 503


class DeadlineExceeded(RequestError):
    """The request did not finish within --timeout-s."""

    status = 504


class InferenceFailed(RequestError):
    """The model raised or returned outputs that do not match its inputs (logged server-side)."""

    status = 500
