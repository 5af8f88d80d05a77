"""The simple JSON route: `POST /v1/models/{name}:predict` with `{"instances": [...]}`.

Answers `{"predictions": [...]}` in exactly `LoadedModel.predict`'s format, but through the
shared batcher, so JSON users get dynamic batching too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from shipyard.package import InvalidInputError
from shipyard.serve.core import V2_TO_NUMPY, ServedModel
from shipyard.serve.errors import BadRequest
from shipyard.serve.fastlane import document, model_routes
from shipyard.serve.http import (
    ServerState,
    model_request_body,
    parse_json,
    run_model,
)
from shipyard.serve.openapi import json_body, ok, responses


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
            return loaded.encode_texts(instances)
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


class PredictRequestBody(BaseModel):
    """`instances`: rows of numbers shaped like the model's input (one row per example), or
    texts for a model with a tokenizer."""

    instances: list[Any] = Field(min_length=1)


class PredictResponseBody(BaseModel):
    """One prediction per instance, in `LoadedModel.predict`'s format: `label` and
    `probabilities` (classification), `value` or `values` (regression), `next_token_id` and
    `next_token` (language models)."""

    model_name: str
    model_version: str
    predictions: list[dict[str, Any]]


_PREDICT_DOC: dict[str, Any] = {
    "description": "Predict from JSON instances, through the same batcher as the V2 route.",
    "openapi_extra": json_body(PredictRequestBody),
    "responses": responses(400, 401, 403, 404, 413, 429, 500, 503, 504, ok=ok(PredictResponseBody)),
}


def build_router() -> APIRouter:
    """The /v1 simple routes (also served by the fast lane; FastAPI documents them)."""
    router = APIRouter(tags=["simple"])
    document(router, FAST_ROUTES)
    return router


async def _predict(
    request: Request, state: ServerState, model_name: str, version: str | None
) -> Response:
    payload = parse_json(await model_request_body(request, state, model_name, version))
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest('request body must be {"instances": [...]}')
    served = state.repo.get(model_name, version)  # no await from here to infer (unload race)
    x = instances_to_array(served, payload["instances"])
    out = await run_model(request, state, served, x)
    answer = {
        "model_name": served.name,
        "model_version": served.version,
        "predictions": served.loaded.format_predictions(out),
    }
    return Response(orjson.dumps(answer), media_type="application/json")


# The hot routes: the server's fast lane calls these endpoints directly (see serve/fastlane.py).
FAST_ROUTES = model_routes(
    "/v1/models/{model_name}:predict",
    "/v1/models/{model_name}/versions/{version}:predict",
    _predict,
    "Predict",
    _PREDICT_DOC,
)
