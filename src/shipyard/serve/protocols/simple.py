"""The simple JSON route: `POST /v1/models/{name}:predict` with `{"instances": [...]}`.

Answers `{"predictions": [...]}` in exactly `LoadedModel.predict`'s format, but through the
shared batcher, so JSON users get dynamic batching too.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from shipyard.package import InvalidInputError
from shipyard.serve.batching import Outputs
from shipyard.serve.core import V2_TO_NUMPY, ServedModel
from shipyard.serve.errors import BadRequest
from shipyard.serve.fastlane import FastRoute
from shipyard.serve.http import ServerState, authorize, disconnected, read_body, state_of


def instances_to_array(served: ServedModel, instances: Any) -> np.ndarray:
    """A batch array for the model's input from JSON instances (numbers, or texts to tokenize)."""
    if not isinstance(instances, list) or not instances:
        raise BadRequest("'instances' must be a non-empty list")
    spec = served.input_spec
    loaded = served.loaded
    if isinstance(instances[0], dict):
        try:
            # records (column -> value): the package's anonymisation, then its inputs
            arr = loaded.records_to_array(instances)
        except InvalidInputError as exc:
            raise BadRequest(str(exc)) from None
        return served.check_input(None, spec.datatype, arr)
    if isinstance(instances[0], str):
        if not all(isinstance(t, str) for t in instances):
            raise BadRequest("'instances' mixes texts and other values")
        try:
            # the package's own tokenization, exactly as LoadedModel.predict applies it
            return loaded._encode_texts(instances)
        except InvalidInputError as exc:
            raise BadRequest(str(exc)) from None
    try:
        arr = np.asarray(instances)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("'instances' is not a rectangular array of numbers") from None
    want = V2_TO_NUMPY[spec.datatype]
    allowed = "iu" if want.kind in "iu" else "iuf"
    if arr.dtype.kind not in allowed:
        kind = "integers" if want.kind in "iu" else "numbers"
        raise BadRequest(f"'instances' must be {kind} for input {spec.name!r} (shape {spec.shape})")
    try:
        arr = arr.astype(want)
    except (ValueError, OverflowError):
        raise BadRequest(f"'instances' cannot be read as {spec.datatype}") from None
    return served.check_input(None, spec.datatype, arr)


def format_predictions(served: ServedModel, out: Outputs) -> list[dict[str, Any]]:
    """Outputs as LoadedModel.predict returns them (one JSON object per instance)."""
    loaded = served.loaded
    if loaded.task == "classification":
        probs = out["probabilities"]
        names = loaded.labels or [str(i) for i in range(probs.shape[1])]
        return [
            {"label": str(label), "probabilities": dict(zip(names, map(float, row), strict=True))}
            for label, row in zip(out["label"], probs, strict=True)
        ]
    if loaded.task == "regression":
        values = out["values"]
        if values.shape[1] == 1:
            return [{"value": float(v[0])} for v in values]
        return [{"values": [float(v) for v in row]} for row in values]
    result = []
    for row in out["logits"][:, -1, :]:
        token = int(row.argmax())
        item: dict[str, Any] = {"next_token_id": token}
        if loaded.tokenizer is not None:
            item["next_token"] = loaded.tokenizer.decode([token])
        result.append(item)
    return result


async def predict(request: Request, model_name: str) -> Response:
    """`POST /v1/models/{model_name}:predict` (default version)."""
    await authorize(request, "infer")
    return await _predict(request, state_of(request), model_name, None)


async def predict_version(request: Request, model_name: str, version: str) -> Response:
    """`POST /v1/models/{model_name}/versions/{version}:predict`."""
    await authorize(request, "infer")
    return await _predict(request, state_of(request), model_name, version)


# The hot routes: the server's fast lane calls these endpoints directly (see serve/fastlane.py).
FAST_ROUTES = [
    FastRoute("/v1/models/{model_name}:predict", predict),
    FastRoute("/v1/models/{model_name}/versions/{version}:predict", predict_version),
]


def build_router() -> APIRouter:
    """The /v1 simple routes (also served by the fast lane; FastAPI documents them)."""
    router = APIRouter(tags=["simple"])
    for route in FAST_ROUTES:
        router.add_api_route(route.path, route.endpoint, methods=["POST"], response_model=None)
    return router


async def _predict(
    request: Request, state: ServerState, model_name: str, version: str | None
) -> Response:
    state.repo.get(model_name, version)
    request.state.model = model_name
    body = await read_body(request, state.settings.max_body_bytes)
    try:
        payload = orjson.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest('request body must be {"instances": [...]}')
    served = state.repo.get(model_name, version)  # no await from here to infer (unload race)
    x = instances_to_array(served, payload["instances"])
    out = await served.infer(
        x, timeout_s=state.settings.timeout_s, disconnected=lambda: disconnected(request)
    )
    answer = {
        "model_name": served.name,
        "model_version": served.version,
        "predictions": format_predictions(served, out),
    }
    return Response(orjson.dumps(answer), media_type="application/json")
