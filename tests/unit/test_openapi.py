"""The OpenAPI document, in process: bodies, statuses, media types, and the parsers' strictness
where the schema promises it (Schemathesis checks the whole of it in the integration tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shipyard.serve import ServeSettings, create_app
from shipyard.serve.errors import BadRequest
from shipyard.serve.protocols.kserve_v2 import decode_request
from shipyard.serve.protocols.openai.parsing import CHAT_PARAMS, COMPLETION_PARAMS
from shipyard.serve.protocols.openai.schemas import ChatCompletionRequest, CompletionRequest
from shipyard.ui import UISettings, create_ui_app


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    with TestClient(create_app(ServeSettings())) as client:
        r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _ref(doc: dict[str, Any], operation: dict[str, Any]) -> str:
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[1]
    assert name in doc["components"]["schemas"]
    return name


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v2/models/{model_name}/infer", "InferRequestBody"),
        ("/v2/models/{model_name}/versions/{version}/infer", "InferRequestBody"),
        ("/v1/models/{model_name}:predict", "PredictRequestBody"),
        ("/v1/models/{model_name}/versions/{version}:predict", "PredictRequestBody"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v2/admin/models/load", "LoadRequest"),
        ("/v2/admin/models/{model_name}/default", "DefaultRequest"),
    ],
)
def test_request_bodies_are_declared(doc: dict[str, Any], path: str, body: str) -> None:
    operation = doc["paths"][path]["post"]
    assert operation["requestBody"]["required"] is True
    assert _ref(doc, operation) == body


def test_statuses_and_error_bodies(doc: dict[str, Any]) -> None:
    infer = doc["paths"]["/v2/models/{model_name}/infer"]["post"]["responses"]
    assert set(infer) == {"200", "400", "401", "403", "404", "413", "429", "500", "503", "504"}
    assert set(infer["200"]["content"]) == {"application/json", "application/octet-stream"}
    error = infer["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/ErrorBody") and "Retry-After" in infer["503"]["headers"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorBody")
    assert "itemSchema" in chat["200"]["content"]["text/event-stream"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    ready = doc["paths"]["/v2/health/ready"]["get"]["responses"]
    assert set(ready) == {"200", "503"}
    # path parameters are plain strings: FastAPI's request validation (422) cannot happen
    assert not [
        (p, m)
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
        if "422" in op["responses"]
    ]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_422_is_listed_exactly_where_a_request_can_get_one(tmp_path: Path) -> None:
    ui = UISettings(runs_dir=tmp_path)
    with TestClient(create_ui_app(ServeSettings(access_log=False), ui)) as client:
        doc = client.get("/openapi.json").json()
        listed = {
            (m, p)
            for p, ops in doc["paths"].items()
            for m, op in ops.items()
            if "422" in op["responses"]
        }
        # the dashboard's typed query parameters; every other parameter takes any string, and the
        # KServe header is read (and refused with 400) by the route itself
        assert listed == {
            ("get", "/ui/api/runs/{run_id}/series"),
            ("get", "/ui/api/runs/{run_id}/tail"),
            ("get", "/ui/api/compare"),
        }
        for url in (
            "/ui/api/runs/r/series?max_points=many",
            "/ui/api/runs/r/tail?offset=end",
            "/ui/api/compare?run=a&run=b&full=perhaps",
        ):
            r = client.get(url)
            assert r.status_code == 422, url
            assert r.json()["error"].startswith("query.")  # the documented ErrorBody
        answer = doc["paths"]["/ui/api/compare"]["get"]["responses"]["422"]
        assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert "HTTPValidationError" not in doc["components"]["schemas"]
        r = client.post(
            "/v2/models/m/infer", content=b"{}", headers={"Inference-Header-Content-Length": "x"}
        )
        assert r.status_code in (400, 404)  # the route reads the header itself: never 422


def test_openai_schemas_list_exactly_the_parameters_the_parser_takes() -> None:
    assert set(CompletionRequest.model_fields) == set(COMPLETION_PARAMS)
    assert set(ChatCompletionRequest.model_fields) == set(CHAT_PARAMS)
    schema = CompletionRequest.model_json_schema()
    assert schema["additionalProperties"] is False  # unknown keys are refused, as by the parser


def _v2(**extra: Any) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    return json.dumps({"inputs": [tensor], **extra}).encode()


@pytest.mark.parametrize(
    "body, message",
    [
        (_v2(parameters=[]), "'parameters' must be an object"),
        (_v2(parameters=0), "'parameters' must be an object"),
        (_v2(parameters={"binary_data_output": "yes"}), "binary_data_output must be true or"),
        (_v2(outputs=[{"name": "label", "parameters": ""}]), "outputs[0]: 'parameters' must"),
        (_v2(outputs=[{"name": "label", "parameters": {"binary_data": 1}}]), "binary_data must"),
    ],
)
def test_v2_parameters_are_objects_and_flags_booleans(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(body)
    assert message in info.value.message


def test_v2_null_parameters_mean_none() -> None:
    req = decode_request(_v2(parameters=None, outputs=[{"name": "label", "parameters": None}]))
    assert req.binary_output is False and req.outputs is not None
    assert req.outputs[0].binary is None
