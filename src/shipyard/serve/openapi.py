"""The published OpenAPI document: what every route takes and answers, declared beside the route.

The inference routes read their bodies themselves (the fast lane skips FastAPI's parsing, and the
OpenAI routes check parameters more strictly than a schema can), so FastAPI cannot infer their
request bodies. Each route declares its body with `json_body(Model)` and its answers with
`responses(...)`; `install` makes the app's `/openapi.json` carry those models. The declarations
cost nothing per request: the document is built once, on the first `GET /openapi.json`.

A JSON Schema cannot say everything a route checks (a tensor's data must have as many elements
as its shape says; a prompt plus `max_tokens` must fit the model's context): such a body is
schema-valid and still answered 400, with a message that names the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every non-OpenAI route's error: one line naming the bad value and the fix."""

    error: str = Field(description="What was wrong, what is allowed, what to do.")
    request_id: str | None = Field(
        None, description="Only on 500: the request id to look up in the server log."
    )


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error fields."""

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_error...")
    param: str | None = Field(description="The request parameter at fault, when there is one.")
    code: str | None = Field(description="A machine-readable reason, e.g. context_length_exceeded.")


class OpenAIErrorBody(BaseModel):
    """The error body of the OpenAI-compatible routes."""

    error: OpenAIErrorDetail


_DESCRIPTIONS = {
    400: "The request is malformed or does not fit the model; the message names the field.",
    401: "No API key, or an unknown or revoked one (only when the server has API keys).",
    403: "The API key lacks the scope this route needs.",
    404: "Unknown model or version.",
    409: "The operation contradicts the server's state.",
    413: "The request body is larger than the server's --max-body-bytes.",
    422: "A query parameter is missing or has the wrong type; the message names it.",
    429: "The API key (or client address) is over its --rate-limit; retry after Retry-After.",
    500: "The model failed; the body carries the request id to look up in the server log.",
    503: "The model's queue is full or it is being unloaded; retry after Retry-After.",
    504: "The request did not finish within the server's --timeout-s.",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
}

# Registered request-body models, by schema name (added to the document's components).
_BODIES: dict[str, type[BaseModel]] = {}
# Parameters that routes document but read (and check) themselves: (in, name).
_READ_BY_ROUTE: set[tuple[str, str]] = set()


def responses(
    *codes: int, error: type[BaseModel] = ErrorBody, ok: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: its 200 (`ok`, when given) and its error `codes`."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = ok
    for code in codes:
        entry: dict[str, Any] = {"model": error, "description": _DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out


def ok(
    model: type[BaseModel] | None = None,
    *,
    description: str = "Success.",
    media: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A 200 response: JSON of `model`, plus other `media` types (e.g. text/event-stream)."""
    entry: dict[str, Any] = {"description": description}
    if model is not None:
        entry["model"] = model
    if media:
        entry["content"] = media
    return entry


def json_body(model: type[BaseModel], *, description: str | None = None) -> dict[str, Any]:
    """The `openapi_extra=` of a route whose JSON body (required) is `model`."""
    known = _BODIES.setdefault(model.__name__, model)
    if known is not model:
        raise ValueError(f"two request-body models are named {model.__name__!r}")
    body: dict[str, Any] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }
    if description:
        body["description"] = description
    return {"requestBody": body}


def read_by_route(
    name: str, where: str, schema: dict[str, Any], *, description: str, required: bool = False
) -> dict[str, Any]:
    """An `openapi_extra` parameter that the route reads and checks itself (a bad value is its
    400, never FastAPI's 422)."""
    _READ_BY_ROUTE.add((where, name))
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": schema,
    }


def install(app: FastAPI) -> None:
    """Make `app.openapi()` include the registered request bodies and only real status codes."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    setattr(app, "openapi", build)  # noqa: B010 (mypy: assigning to a method)


def _document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(m, "validation") for m in _BODIES.values()], ref_template=REF)
    components.update(defs.get("$defs", {}))
    # FastAPI documents a 422 on every route with parameters. Where each parameter it validates
    # takes any string (the inference routes' path parameters) that cannot fail: no 422. Where
    # one is typed (the dashboard's `max_points: int`) it can, with the server's error body.
    # Parameters a route reads itself (`read_by_route`) answer 400, not 422.
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses", {})
            if "422" not in answers:
                continue
            if any(_can_fail(p) for p in operation.get("parameters", [])):
                answers["422"] = {
                    "description": _DESCRIPTIONS[422],
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}
                    },
                }
            else:
                del answers["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return doc


def _can_fail(parameter: dict[str, Any]) -> bool:
    """Whether FastAPI's validation of this parameter can refuse a request (422)."""
    if (parameter.get("in"), parameter.get("name")) in _READ_BY_ROUTE:
        return False
    if parameter.get("in") != "path" and parameter.get("required"):
        return True  # a missing query parameter
    return not _any_string(parameter.get("schema", {}))


def _any_string(schema: dict[str, Any]) -> bool:
    """Whether every string (or repeated string) is valid for `schema`."""
    if schema.get("type") == "string":
        return not (set(schema) & {"enum", "pattern", "minLength", "maxLength", "format"})
    if schema.get("type") == "array":
        return _any_string(schema.get("items", {}))
    return any(_any_string(s) for s in schema.get("anyOf", []))


__all__ = [
    "ErrorBody",
    "OpenAIErrorBody",
    "install",
    "json_body",
    "ok",
    "read_by_route",
    "responses",
]
