"""The OpenAI routes' errors: `OpenAIError` and OpenAI's error body for any `RequestError`."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from shipyard.serve.errors import RequestError

TAG = "openai"  # the OpenAPI tag of these routes; also how a request is recognised as theirs


class OpenAIError(RequestError):
    """A 4xx/5xx with OpenAI's error fields (`param`, `code`)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, headers=headers)
        self.status = status
        self.param = param
        self.code = code


_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "insufficient_scope"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}


def is_openai_route(request: Request) -> bool:
    """True when the request was routed to one of this module's routes."""
    return TAG in getattr(request.scope.get("route"), "tags", ())


def error_response(exc: RequestError) -> JSONResponse:
    """OpenAI's error body for any RequestError."""
    kind, code = _TYPES.get(exc.status, ("server_error", None))
    param = None
    if isinstance(exc, OpenAIError):
        param, code = exc.param, exc.code or code
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def bad(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, param=param, code=code)
