"""The routes: submit parsed requests to the model's engine, answer in full or stream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from shipyard.errors import EngineOverloaded, GenerationError
from shipyard.generate import AsyncRequestStream, GenerationResult
from shipyard.serve.accesslog import new_request_id
from shipyard.serve.auth import ApiKey
from shipyard.serve.core import ServedModel
from shipyard.serve.errors import InferenceFailed, RequestError
from shipyard.serve.fastlane import FastRoute, document
from shipyard.serve.http import (
    ServerState,
    authorize,
    disconnected,
    read_body,
    require,
    server_state,
    state_of,
)
from shipyard.serve.lm import EngineMetrics
from shipyard.serve.openapi import OpenAIErrorBody, json_body, ok, responses
from shipyard.serve.protocols.openai.answers import (
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    usage,
)
from shipyard.serve.protocols.openai.errors import TAG, OpenAIError, error_response
from shipyard.serve.protocols.openai.parsing import (
    ParsedRequest,
    engine_error,
    load_json,
    parse_chat,
    parse_completion,
)
from shipyard.serve.protocols.openai.schemas import (
    SSE,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from shipyard.serve.protocols.openai.streaming import streaming_response


async def submit(req: ParsedRequest) -> list[AsyncRequestStream]:
    """Submit every choice; if one is refused, withdraw the others."""
    streams: list[AsyncRequestStream] = []
    per_prompt = len(req.params) // len(req.prompts)
    try:
        for i, params in enumerate(req.params):
            streams.append(await req.engine.submit(req.prompts[i // per_prompt], params))
    except (GenerationError, EngineOverloaded) as exc:
        for stream in streams:
            stream.cancel()
        raise engine_error(exc, "prompt") from None
    if isinstance(req.engine.observer, EngineMetrics):
        req.engine.observer.refresh()  # the waiting gauge
    return streams


async def gather_results(
    request: Request, streams: list[AsyncRequestStream]
) -> list[GenerationResult]:
    """Every stream's result; cancels them all if the client goes away first."""
    gathered = asyncio.ensure_future(asyncio.gather(*(s.result() for s in streams)))
    watcher = asyncio.ensure_future(disconnected(request))
    waiting: set[asyncio.Future[Any]] = {gathered, watcher}
    try:
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            try:
                return list(gathered.result())
            except RequestError:
                raise
            except Exception as exc:
                raise InferenceFailed("the model failed while generating") from exc
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        gathered.cancel()
        for stream in streams:
            if stream.final is None:
                stream.cancel()


async def _complete(request: Request, chat: bool) -> Response:
    await authorize(request, "infer")
    state = state_of(request)
    raw = load_json(await read_body(request, state.settings.max_body_bytes))
    req = parse_chat(state, raw, request) if chat else parse_completion(state, raw, request)
    # the id before the submit: from here to the first token the engine wants the GIL too
    response_id = ("chatcmpl-" if chat else "cmpl-") + new_request_id()
    streams = await submit(req)
    if req.stream:
        return streaming_response(request, req, streams, chat=chat, response_id=response_id)
    results = await gather_results(request, streams)
    tokenizer = req.engine.tokenizer
    choices = []
    for i, result in enumerate(results):
        logprobs = None
        if chat:
            if result.logprobs is not None:
                logprobs = chat_logprobs(tokenizer, result.logprobs)
            message = {"role": "assistant", "content": result.text}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(result.finish_reason),
                }
            )
        else:
            if result.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, result.logprobs, 0)
            choices.append(
                {
                    "index": i,
                    "text": result.text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(result.finish_reason),
                }
            )
    answer = {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage(req, sum(r.completion_tokens for r in results)),
    }
    return JSONResponse(answer)


async def _completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


_GENERATION_ERRORS = (400, 401, 403, 404, 413, 429, 500, 503)


def _generation_docs(name: str, summary: str, body: Any, answer: Any) -> dict[str, Any]:
    return {
        "name": name,
        "summary": summary,
        "openapi_extra": json_body(body),
        "responses": responses(
            *_GENERATION_ERRORS, error=OpenAIErrorBody, ok=ok(answer, media=SSE)
        ),
    }


# The generation routes go through the server's fast lane (see serve/fastlane.py): FastAPI's
# routing and dependency solving were ~1 ms of every request's time to first token.
FAST_ROUTES = [
    FastRoute(
        "/v1/completions",
        _completions,
        _generation_docs("completions", "Complete a prompt", CompletionRequest, Completion),
        render_error=error_response,
    ),
    FastRoute(
        "/v1/chat/completions",
        _chat_completions,
        _generation_docs(
            "chat_completions", "Answer a conversation", ChatCompletionRequest, ChatCompletion
        ),
        render_error=error_response,
    ),
]


def _model_card(model_id: str, served: ServedModel) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(served.loaded_at),
        "owned_by": "shipyard",
    }


def build_router() -> APIRouter:
    """The OpenAI-compatible routes."""
    router = APIRouter(tags=[TAG])
    infer = Depends(require("infer"))

    auth_errors = (401, 403, 429)

    @router.get(
        "/v1/models",
        summary="List the served language models",
        response_model=None,
        responses=responses(*auth_errors, error=OpenAIErrorBody, ok=ok(ModelList)),
    )
    async def list_models(
        state: ServerState = Depends(server_state), key: ApiKey | None = infer
    ) -> dict[str, Any]:
        data = []
        for name in state.repo.names():
            default = state.repo.default_version(name)
            for version, served in sorted(state.repo.versions(name).items()):
                if served.engine is None:
                    continue
                if version == default:
                    data.append(_model_card(name, served))
                data.append(_model_card(f"{name}:{version}", served))
        return {"object": "list", "data": data}

    @router.get(
        "/v1/models/{model}",
        summary="One served language model",
        response_model=None,
        responses=responses(*auth_errors, 404, error=OpenAIErrorBody, ok=ok(ModelCard)),
    )
    async def retrieve_model(
        model: str, state: ServerState = Depends(server_state), key: ApiKey | None = infer
    ) -> dict[str, Any]:
        name, _, version = model.partition(":")
        served = state.repo.get(name, version or None)
        if served.engine is None:
            raise OpenAIError(f"model {name!r} is not a language model", status=404, param="model")
        return _model_card(model, served)

    document(router, FAST_ROUTES)
    return router
