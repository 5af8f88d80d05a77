"""KServe V2 / Open Inference Protocol over HTTP, with the binary tensor data extension.

Wire format (what `tritonclient.http` sends with its defaults): the body is a JSON header, then
the raw tensors back to back. The `Inference-Header-Content-Length` HTTP header gives the JSON
header's length; each binary input carries `parameters.binary_data_size` (its byte length).
Tensors are little-endian and row-major; a BYTES tensor is each element's 4-byte little-endian
length followed by its bytes. Outputs are sent binary when the request's output asks
(`parameters.binary_data`) or `parameters.binary_data_output` is true; the response then carries
`Inference-Header-Content-Length` too. Without binary parts a body is plain JSON.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from shipyard import __version__
from shipyard.serve.auth import ApiKey
from shipyard.serve.core import V2_TO_NUMPY, ServedModel, v2_datatype
from shipyard.serve.errors import BadRequest
from shipyard.serve.fastlane import document, model_routes
from shipyard.serve.http import (
    ServerState,
    model_request_body,
    require,
    run_model,
    server_state,
)
from shipyard.serve.openapi import json_body, ok, read_by_route, responses

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMS = 16


@dataclass
class InferInput:
    """One decoded input tensor."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class RequestedOutput:
    """An output the request asked for; `binary` None means "use binary_data_output";
    `class_count` asks for the top classes instead of the tensor (classification extension)."""

    name: str
    binary: bool | None = None
    class_count: int | None = None


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: list[InferInput]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ schemas
# What the published OpenAPI document says about the bodies (`decode_request` is the parser).

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class TensorParameters(BaseModel):
    """Per-tensor parameters (binary tensor data extension)."""

    binary_data_size: int | None = Field(
        None, ge=0, description="Bytes of this tensor in the binary part of the body."
    )


class InferInputTensor(BaseModel):
    """One input tensor: row-major `data` (nested or flat), or its bytes in the binary part."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int] = Field(max_length=MAX_DIMS, json_schema_extra={"items": {"minimum": 0}})
    data: list[Any] | None = Field(
        None, description="Required unless parameters.binary_data_size is given."
    )
    parameters: TensorParameters | None = None


class OutputParameters(BaseModel):
    """Per-output parameters."""

    binary_data: bool | None = Field(None, description="Send this output in the binary part.")
    classification: int | None = Field(
        None, ge=0, description="Answer the top N classes as 'value:index:label' instead."
    )


class RequestedOutputSpec(BaseModel):
    """An output the request asks for (by default: all of them)."""

    name: str
    parameters: OutputParameters | None = None


class InferParameters(BaseModel):
    """Request parameters."""

    binary_data_output: bool | None = Field(None, description="Send every output binary.")


class InferRequestBody(BaseModel):
    """A KServe V2 inference request (JSON; with the binary extension, the JSON header)."""

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: InferParameters | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[RequestedOutputSpec] | None = None


class OutputTensor(BaseModel):
    """One output tensor: `data`, or its byte length in the binary part."""

    name: str
    datatype: Datatype
    shape: list[int]
    data: list[Any] | None = None
    parameters: TensorParameters | None = None


class InferResponseBody(BaseModel):
    """A KServe V2 inference response (with binary outputs: the JSON header)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMeta(BaseModel):
    """A tensor in the model's signature (-1: any size)."""

    name: str
    datatype: Datatype
    shape: list[int]


class Ready(BaseModel):
    """Server readiness."""

    ready: bool


class ModelReady(BaseModel):
    """A model (version) that answers is ready."""

    name: str
    version: str | None = None
    ready: bool


class ModelMetadata(BaseModel):
    """The V2 model metadata object."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


_INFER_DOC = (
    "Run the model on one input tensor. The body is JSON, or with the binary tensor data "
    "extension a JSON header followed by raw tensors (send `Inference-Header-Content-Length`). "
    "The answer is JSON, or `application/octet-stream` with `Inference-Header-Content-Length` "
    "when binary outputs were asked for."
)
_INFER_OPENAPI = {
    **json_body(InferRequestBody),
    "parameters": [
        read_by_route(
            HEADER_LENGTH,
            "header",
            {"type": "integer", "minimum": 1},
            description="Length of the JSON header when binary tensors follow it.",
        )
    ],
}
_INFER_RESPONSES = responses(
    400, 401, 403, 404, 413, 429, 500, 503, 504,
    ok=ok(
        InferResponseBody,
        media={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    ),
)  # fmt: skip
_MODEL_ERRORS = (401, 403, 404, 429)


# ------------------------------------------------------------------------------ BYTES


def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    """Row-major elements, each as a 4-byte little-endian length and its bytes (str → UTF-8)."""
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes_tensor(raw: bytes | memoryview, count: int, where: str) -> np.ndarray:
    """The inverse of `serialize_bytes_tensor`: an object array of `count` bytes elements."""
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise BadRequest(f"{where}: BYTES data ends after {i} of {count} elements")
        (n,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + n > len(view):
            raise BadRequest(f"{where}: BYTES element {i} claims {n} bytes past the end")
        out[i] = bytes(view[offset : offset + n])
        offset += n
    if offset != len(view):
        raise BadRequest(f"{where}: {len(view) - offset} bytes left after {count} BYTES elements")
    return out


def tensor_bytes(arr: np.ndarray) -> bytes:
    """The binary-extension encoding of one tensor."""
    if arr.dtype.kind in "OUS":
        return serialize_bytes_tensor(arr)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


# ------------------------------------------------------------------------------ decoding


def _shape(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise BadRequest(f"{where}: 'shape' must be a list of at most {MAX_DIMS} integers >= 0")
    return value


def _json_tensor(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a list (nested or flat, row-major)")
    count = math.prod(shape)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(f"{where}: 'data' is not a rectangular array") from None
    if arr.size != count:
        raise BadRequest(f"{where}: 'data' has {arr.size} elements but shape {shape} needs {count}")
    kind = arr.dtype.kind
    want = V2_TO_NUMPY[datatype]
    ok = {
        "BYTES": kind in "U",
        "BOOL": kind == "b",
    }.get(datatype, kind in ("iu" if want.kind in "iu" else "iuf"))
    if count and not ok:
        expected = {"BYTES": "strings", "BOOL": "true/false"}.get(
            datatype, "integers" if want.kind in "iu" else "numbers"
        )
        raise BadRequest(f"{where}: datatype {datatype} needs {expected} in 'data'")
    if want.kind in "iu" and count:
        info = np.iinfo(want)
        try:
            lo, hi = int(arr.min()), int(arr.max())
        except (TypeError, ValueError):
            raise BadRequest(f"{where}: 'data' is not numeric") from None
        if lo < info.min or hi > info.max:
            raise BadRequest(f"{where}: values out of range for {datatype}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = [str(v) for v in arr.reshape(-1)]
        return out.reshape(shape)
    try:
        with np.errstate(over="ignore"):  # out-of-range floats become inf: rejected later
            return arr.reshape(shape).astype(want)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"{where}: 'data' cannot be read as {datatype}") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    """An optional JSON object (absent or null: empty); BadRequest for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object")
    return value


def _flag(value: Any, where: str) -> bool | None:
    """An optional boolean; BadRequest for anything else ("yes" or 1 is not taken as true)."""
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where} must be true or false, got {json.dumps(value)[:32]}")
    return value


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        header_raw, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header_raw, binary = body, memoryview(b"")
    try:
        header = orjson.loads(header_raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest(
            "request body is not valid JSON (or the JSON header length is wrong)"
        ) from None
    if not isinstance(header, dict):
        raise BadRequest("request body must be a JSON object with 'inputs'")
    params = _object(header.get("parameters"), "'parameters'")
    binary_output = _flag(params.get("binary_data_output"), "parameters.binary_data_output")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    inputs: list[InferInput] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise BadRequest(f"inputs[{i}] must be an object with name, datatype, shape, data")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"inputs[{i}]: 'name' must be a non-empty string")
        where = f"input {name[:64]!r}"
        datatype = raw.get("datatype")
        if datatype not in V2_TO_NUMPY:
            raise BadRequest(
                f"{where}: datatype {str(datatype)[:16]!r} is not supported; use one of "
                f"{', '.join(V2_TO_NUMPY)}"
            )
        shape = _shape(raw.get("shape"), where)
        count = math.prod(shape)
        iparams = _object(raw.get("parameters"), f"{where}: 'parameters'")
        size = iparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"{where}: binary_data_size must be an integer >= 0")
            if "data" in raw:
                raise BadRequest(f"{where}: give 'data' or binary_data_size, not both")
            chunk = binary[offset : offset + size]
            if len(chunk) != size:
                raise BadRequest(
                    f"{where}: binary_data_size is {size} but only {len(chunk)} bytes remain"
                )
            offset += size
            if datatype == "BYTES":
                data = deserialize_bytes_tensor(chunk, count, where).reshape(shape)
            else:
                dtype = V2_TO_NUMPY[datatype]
                if size != count * dtype.itemsize:
                    raise BadRequest(
                        f"{where}: binary data has {size} bytes but shape {shape} of {datatype} "
                        f"needs {count * dtype.itemsize}"
                    )
                data = (
                    np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
                    .astype(dtype)  # native order, and a writable copy
                    .reshape(shape)
                )
        elif "data" in raw:
            data = _json_tensor(raw["data"], datatype, shape, where)
        else:
            raise BadRequest(f"{where}: missing 'data' (or parameters.binary_data_size)")
        inputs.append(InferInput(name, datatype, shape, data))
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary)} bytes of binary tensor data but the inputs declare "
            f"{offset}"
        )
    outputs: list[RequestedOutput] | None = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list of {'name': ...}")
        outputs = []
        for i, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise BadRequest(f"outputs[{i}] must be an object with a 'name'")
            oparams = _object(raw.get("parameters"), f"outputs[{i}]: 'parameters'")
            class_count = oparams.get("classification")
            if class_count is not None and (
                not isinstance(class_count, int) or isinstance(class_count, bool) or class_count < 0
            ):
                raise BadRequest(
                    f"outputs[{i}]: parameters.classification must be an integer >= 0 (the "
                    f"number of top classes), got {json.dumps(class_count)[:32]}"
                )
            binary_flag = _flag(oparams.get("binary_data"), f"outputs[{i}]: binary_data")
            outputs.append(
                RequestedOutput(
                    raw["name"],
                    None if binary_flag is None else bool(binary_flag),
                    class_count or None,  # 0 means "no classification", as in Triton
                )
            )
    return InferRequest(
        inputs=inputs,
        id=request_id,
        outputs=outputs,
        binary_output=bool(binary_output),
        parameters=params,
    )


def top_classes(scores: np.ndarray, k: int, labels: list[str] | None) -> np.ndarray:
    """Triton's classification extension: for scores (N, C), the top `k` classes of each row as
    BYTES "value:index" or "value:index:label", highest first, shape (N, min(k, C)).

    Values are printed with six decimals, as Triton's `std::to_string` does; ties keep the
    lower index first.
    """
    if scores.ndim != 2 or scores.dtype.kind not in "iuf":
        raise BadRequest(
            f"the classification extension needs a numeric (batch, classes) output; this one is "
            f"{v2_datatype(scores)} with shape {list(scores.shape)}"
        )
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    out = np.empty(order.shape, dtype=object)
    for r, row in enumerate(order):
        for j, c in enumerate(row):
            text = f"{float(scores[r, c]):f}:{int(c)}"
            if labels is not None and c < len(labels):
                text += f":{labels[c]}"
            out[r, j] = text.encode()
    return out


def _json_data(arr: np.ndarray) -> list[Any]:
    flat = arr.reshape(-1)
    if arr.dtype.kind in "OSU":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def encode_response(
    outputs: dict[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    request_id: str | None = None,
    requested: list[RequestedOutput] | None = None,
    binary_output: bool = False,
    class_labels: dict[str, list[str]] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when it has binary parts, the JSON header's length.

    `class_labels` names the classes of an output (its columns), for outputs requested with
    `class_count`.
    """
    wanted = requested if requested is not None else [RequestedOutput(n) for n in outputs]
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in wanted:
        binary = want.binary if want.binary is not None else binary_output
        arr = outputs[want.name]
        if want.class_count is not None:
            arr = top_classes(arr, want.class_count, (class_labels or {}).get(want.name))
        tensors.append(_tensor_entry(want.name, arr, binary, blobs))
    header["outputs"] = tensors
    head = orjson.dumps(header)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _tensor_entry(name: str, arr: np.ndarray, binary: bool, blobs: list[bytes]) -> dict[str, Any]:
    """One tensor's JSON entry; with `binary`, its raw bytes go to `blobs` (the body's tail)."""
    entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
    if binary:
        raw = tensor_bytes(arr)
        entry["parameters"] = {"binary_data_size": len(raw)}
        blobs.append(raw)
    else:
        entry["data"] = _json_data(arr)
    return entry


# ------------------------------------------------------------------------------ client side


def encode_request(
    inputs: dict[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: list[RequestedOutput] | None = None,
    binary_output: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """A request body (and JSON header length when binary), as tritonclient would send it."""
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in inputs.items():
        tensors.append(_tensor_entry(name, arr, binary, blobs))
    header["inputs"] = tensors
    if outputs is not None:
        header["outputs"] = []
        for o in outputs:
            oparams: dict[str, Any] = {}
            if o.binary is not None:
                oparams["binary_data"] = o.binary
            if o.class_count is not None:
                oparams["classification"] = o.class_count
            header["outputs"].append(
                {"name": o.name, **({"parameters": oparams} if oparams else {})}
            )
    elif binary_output:
        header["parameters"] = {"binary_data_output": True}
    head = orjson.dumps(header)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def decode_response(body: bytes, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Outputs of a response body, JSON or binary (the inverse of `encode_response`)."""
    head = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(head) :]
    header = json.loads(head)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for t in header["outputs"]:
        shape, datatype = t["shape"], t["datatype"]
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                arr = deserialize_bytes_tensor(chunk, math.prod(shape), t["name"])
            else:
                arr = np.frombuffer(chunk, dtype=V2_TO_NUMPY[datatype].newbyteorder("<"))
        else:
            dtype = V2_TO_NUMPY[datatype]
            arr = np.array(t["data"], dtype=dtype)
        out[t["name"]] = arr.reshape(shape)
    return out


# ------------------------------------------------------------------------------ routes


def _tensor_meta(specs: list[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def model_metadata(state: ServerState, served: ServedModel) -> dict[str, Any]:
    """The V2 model metadata object."""
    sig = served.loaded.signature
    return {
        "name": served.name,
        "versions": sorted(state.repo.versions(served.name)),
        "platform": "pytorch",
        "inputs": _tensor_meta(sig.inputs),
        "outputs": _tensor_meta(sig.outputs),
    }


def build_router() -> APIRouter:
    """The /v2 routes."""
    router = APIRouter(tags=["kserve-v2"])

    @router.get("/v2/health/live", summary="Liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get(
        "/v2/health/ready",
        summary="Readiness: every configured model is loaded",
        response_model=None,
        responses={
            200: ok(Ready, description="Ready."),
            503: {"description": "Not ready (starting or shutting down).", "model": Ready},
        },
    )
    async def ready(state: ServerState = Depends(server_state)) -> Response:
        ok = state.repo.ready and not state.shutting_down
        return Response(
            json.dumps({"ready": ok}), status_code=200 if ok else 503, media_type="application/json"
        )

    @router.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {
            "name": "shipyard",
            "version": __version__,
            "extensions": ["binary_tensor_data", "classification"],
        }

    meta: dict[str, Any] = {
        "response_model": None,
        "responses": responses(*_MODEL_ERRORS, ok=ok(ModelMetadata)),
    }
    ready_doc: dict[str, Any] = {
        "response_model": None,
        "responses": responses(*_MODEL_ERRORS, ok=ok(ModelReady)),
    }

    @router.get("/v2/models/{model_name}", summary="Model metadata", **meta)
    async def metadata(
        model_name: str,
        state: ServerState = Depends(server_state),
        key: ApiKey | None = Depends(require("infer")),
    ) -> dict[str, Any]:
        return model_metadata(state, state.repo.get(model_name))

    @router.get("/v2/models/{model_name}/versions/{version}", summary="Version metadata", **meta)
    async def version_metadata(
        model_name: str,
        version: str,
        state: ServerState = Depends(server_state),
        key: ApiKey | None = Depends(require("infer")),
    ) -> dict[str, Any]:
        return model_metadata(state, state.repo.get(model_name, version))

    @router.get("/v2/models/{model_name}/ready", summary="Model readiness", **ready_doc)
    async def model_ready(
        model_name: str,
        state: ServerState = Depends(server_state),
        key: ApiKey | None = Depends(require("infer")),
    ) -> dict[str, Any]:
        served = state.repo.get(model_name)
        return {"name": served.name, "ready": True}

    @router.get(
        "/v2/models/{model_name}/versions/{version}/ready", summary="Version readiness", **ready_doc
    )
    async def version_ready(
        model_name: str,
        version: str,
        state: ServerState = Depends(server_state),
        key: ApiKey | None = Depends(require("infer")),
    ) -> dict[str, Any]:
        served = state.repo.get(model_name, version)
        return {"name": served.name, "version": served.version, "ready": True}

    document(router, FAST_ROUTES)

    return router


def _class_labels(served: ServedModel) -> dict[str, list[str]]:
    """A classifier's class names, for its probabilities (classification extension)."""
    loaded = served.loaded
    if loaded.task != "classification":
        return {}
    names = [s.name for s in loaded.signature.outputs]
    if "probabilities" not in names:
        return {}
    spec = loaded.signature.outputs[names.index("probabilities")]
    labels = loaded.labels or [str(i) for i in range(spec.shape[-1])]
    return {"probabilities": list(labels)}


# The hot routes: the server's fast lane calls these endpoints directly (see serve/fastlane.py).
async def _infer(
    request: Request, state: ServerState, model_name: str, version: str | None
) -> Response:
    body = await model_request_body(request, state, model_name, version)
    raw_length = request.headers.get(HEADER_LENGTH)
    header_length: int | None = None
    if raw_length is not None:
        try:
            header_length = int(raw_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer") from None
    req = decode_request(body, header_length)
    if len(req.inputs) != 1:
        raise BadRequest(f"this model takes exactly one input; got {len(req.inputs)}")
    # from here to `infer` nothing awaits, so the model cannot be unloaded in between
    served = state.repo.get(model_name, version)
    inp = req.inputs[0]
    x = served.check_input(inp.name, inp.datatype, inp.data)
    names = [s.name for s in served.loaded.signature.outputs]
    for want in req.outputs or []:
        if want.name not in names:
            raise BadRequest(f"unknown output {want.name[:64]!r}; outputs: {', '.join(names)}")
    outputs = await run_model(request, state, served, x)
    payload, head_len = encode_response(
        outputs,
        model_name=served.name,
        model_version=served.version,
        request_id=req.id,
        requested=req.outputs,
        binary_output=req.binary_output,
        class_labels=(
            _class_labels(served) if any(o.class_count for o in req.outputs or ()) else None
        ),
    )
    if head_len is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(head_len)}
    )


# The hot routes: the server's fast lane calls these endpoints directly (see serve/fastlane.py).
FAST_ROUTES = model_routes(
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{version}/infer",
    _infer,
    "Inference",
    {"description": _INFER_DOC, "openapi_extra": _INFER_OPENAPI, "responses": _INFER_RESPONSES},
)
