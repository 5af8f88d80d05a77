"""The management API (admin scope) under `/v2/admin`.

    GET  /v2/admin/models                                   loaded models, versions, defaults
    POST /v2/admin/models/load           {"ref": "NAME:VERSION" | "NAME@ALIAS" | "NAME",
                                          "make_default": true}
    POST /v2/admin/models/{name}/default {"version": "3", "unload_previous": false}
    POST /v2/admin/models/{name}/versions/{version}/unload

Models are loaded from the registry only, never from a client-supplied path: a path would let
an admin key read (and probe) any directory the server can see. A version switch loads the new
version fully before routing to it, swaps the default atomically, and only then drains and
unloads the old one, so no request fails during the switch.

Changes apply to the process that handles the call; with `--workers N > 1` they are refused
(409): restart with new arguments (or roll pods) instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from shipyard.errors import PackageError, RegistryError
from shipyard.serve.auth import ApiKey
from shipyard.serve.core import ServedModel, check_model_name
from shipyard.serve.errors import Conflict, NotFound
from shipyard.serve.http import ServerState, parse_body, require, server_state
from shipyard.serve.openapi import json_body, responses

_MAX_BODY = 64 << 10  # the bodies are a few short fields


class LoadRequest(BaseModel):
    """Body of POST /v2/admin/models/load."""

    model_config = ConfigDict(extra="forbid")
    ref: str
    make_default: bool = True


class DefaultRequest(BaseModel):
    """Body of POST /v2/admin/models/{name}/default."""

    model_config = ConfigDict(extra="forbid")
    version: str
    unload_previous: bool = False


def _describe(state: ServerState, name: str) -> dict[str, Any]:
    versions = state.repo.versions(name)
    return {
        "name": name,
        "default_version": state.repo.default_version(name),
        "versions": [_version(v) for _, v in sorted(versions.items())],
    }


def _version(served: ServedModel) -> dict[str, Any]:
    return {
        "version": served.version,
        "source": served.source,
        "task": served.loaded.task,
        "loaded_at": served.loaded_at,
        "load_seconds": round(served.load_seconds, 4),
        "queued": served.batcher.busy,
    }


def _single_process(state: ServerState) -> None:
    if state.settings.workers > 1:
        raise Conflict(
            f"the server runs {state.settings.workers} worker processes and this call would "
            "change only one of them; restart with the new models instead"
        )


def build_router() -> APIRouter:
    """The /v2/admin routes."""
    router = APIRouter(prefix="/v2/admin", tags=["management"])
    admin = Depends(require("admin"))

    @router.get(
        "/models",
        summary="Loaded models, versions and defaults",
        responses=responses(401, 403, 429),
    )
    async def list_models(
        state: ServerState = Depends(server_state), key: ApiKey | None = admin
    ) -> dict[str, Any]:
        return {"models": [_describe(state, n) for n in state.repo.names()]}

    @router.post(
        "/models/load",
        summary="Load a model version from the registry",
        openapi_extra=json_body(LoadRequest),
        responses=responses(400, 401, 403, 404, 409, 413, 429),
    )
    async def load(
        request: Request, state: ServerState = Depends(server_state), key: ApiKey | None = admin
    ) -> dict[str, Any]:
        _single_process(state)
        body = await parse_body(request, LoadRequest, _MAX_BODY)
        try:
            served = await state.repo.load(body.ref, make_default=body.make_default)
        except RegistryError as exc:
            raise NotFound(str(exc)) from None
        except PackageError as exc:
            raise Conflict(f"cannot load {body.ref!r}: {exc}") from None
        return {"loaded": _version(served), "model": _describe(state, served.name)}

    @router.post(
        "/models/{model_name}/default",
        summary="Route unversioned requests to a version",
        openapi_extra=json_body(DefaultRequest),
        responses=responses(400, 401, 403, 404, 409, 413, 429),
    )
    async def set_default(
        request: Request,
        model_name: str,
        state: ServerState = Depends(server_state),
        key: ApiKey | None = admin,
    ) -> dict[str, Any]:
        _single_process(state)
        check_model_name(model_name)
        body = await parse_body(request, DefaultRequest, _MAX_BODY)
        previous = state.repo.default_version(model_name)
        await state.repo.set_default(model_name, body.version)
        if body.unload_previous and previous is not None and previous != body.version:
            await state.repo.remove(model_name, previous)
        return _describe(state, model_name)

    @router.post(
        "/models/{model_name}/versions/{version}/unload",
        summary="Drain and unload a version",
        responses=responses(401, 403, 404, 409, 429),
    )
    async def unload(
        model_name: str,
        version: str,
        state: ServerState = Depends(server_state),
        key: ApiKey | None = admin,
    ) -> dict[str, Any]:
        _single_process(state)
        await state.repo.remove(model_name, version)
        return {"unloaded": {"name": model_name, "version": version}}

    return router
