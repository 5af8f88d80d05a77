"""Schemathesis hooks for `test_openapi_contract`: real test data for the served models.

Loaded by the Schemathesis CLI through `SCHEMATHESIS_HOOKS`; the test passes the served model
names and a real input row in `SHIPYARD_CONTRACT_DATA` (JSON). Random bodies almost never make a
valid tensor for the digits model, so the examples phase also sends one that is valid for it; the
OpenAI bodies name the served language model whenever the generated `model` is a valid string
(replacing one valid string with another keeps a negative case negative).
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

DATA: dict[str, Any] = json.loads(os.environ.get("SHIPYARD_CONTRACT_DATA", "{}"))


def _label(context: Any) -> str:
    operation = context.operation
    return f"{operation.method.upper()} {operation.path}" if operation is not None else ""


@schemathesis.hook
def before_add_examples(context: Any, examples: list[Any]) -> None:
    operation = context.operation
    label = _label(context)
    classifier = {"model_name": DATA["classifier"], "version": DATA["classifier_version"]}
    row = DATA["row"]
    params = {k: v for k, v in classifier.items() if "{" + k + "}" in operation.path}
    if label.endswith("/infer"):
        tensor = {"name": DATA["input"], "datatype": "FP32", "shape": [1, len(row)], "data": row}
        examples.append(operation.Case(path_parameters=params, body={"inputs": [tensor]}))
    elif label.endswith(":predict"):
        examples.append(operation.Case(path_parameters=params, body={"instances": [row]}))
    elif label == "POST /v1/completions":
        body = {"model": DATA["lm"], "prompt": "def ", "max_tokens": 4, "logprobs": 2}
        examples.append(operation.Case(body=body))
        examples.append(operation.Case(body={**body, "stream": True, "n": 2}))
    elif label == "POST /v1/chat/completions":
        messages = [{"role": "user", "content": "hello"}]
        body = {"model": DATA["lm"], "messages": messages, "max_tokens": 4}
        examples.append(operation.Case(body=body))
        examples.append(operation.Case(body={**body, "stream": True, "logprobs": True}))


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    openai = _label(context) in ("POST /v1/completions", "POST /v1/chat/completions")
    if openai and isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
        return {**body, "model": DATA["lm"]}
    return body
