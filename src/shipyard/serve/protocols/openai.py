"""OpenAI-compatible routes for language-model packages (works with the official `openai` SDK).

    GET  /v1/models                 the language models served ({"object": "list", "data": [...]})
    GET  /v1/models/{model}         one of them
    POST /v1/completions            prompt → text (streaming: server-sent events)
    POST /v1/chat/completions       messages → assistant message, through the model's own chat
                                    template (imported checkpoints), else `CHAT_TEMPLATE`

Every choice is one request to the model's continuous-batching `Engine` (`n` choices are `n`
independent requests; with a `seed`, choice i uses seed + i). Parameters are checked strictly:
an unsupported one (`tools`, `response_format`, `logit_bias`, ...) or an unknown one is a 400
that names it, never silently ignored. Errors on these routes use OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from shipyard.data.chat import FALLBACK_STOPS, FALLBACK_TEMPLATE, ChatTemplateError
from shipyard.data.tokenization import Tokenizer
from shipyard.errors import EngineOverloaded, GenerationError
from shipyard.generate import (
    AsyncRequestStream,
    Engine,
    GenerationResult,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from shipyard.serve.auth import ApiKey
from shipyard.serve.core import ServedModel
from shipyard.serve.errors import InferenceFailed, RequestError
from shipyard.serve.http import ServerState, disconnected, read_body, require, server_state
from shipyard.serve.lm import EngineMetrics

TAG = "openai"

CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = FALLBACK_TEMPLATE  # one per message, then "<|assistant|>\n"
CHAT_STOPS = FALLBACK_STOPS
MAX_STOP = 4  # as OpenAI
MAX_CHOICES = 16  # prompts x n per request
MAX_LOGPROBS = 20

_COMMON = (
    "model",
    "stream",
    "stream_options",
    "seed",
    "stop",
    "temperature",
    "top_p",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
    "logit_bias",
)
COMPLETION_PARAMS = (*_COMMON, "prompt", "max_tokens", "logprobs", "best_of", "echo", "suffix")
CHAT_PARAMS = (
    *_COMMON,
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
)
# parameters OpenAI knows and shipyard refuses, with the reason
UNSUPPORTED: dict[str, str] = {
    "tools": "tool calling is not supported (shipyard serves base language models)",
    "tool_choice": "tool calling is not supported (shipyard serves base language models)",
    "parallel_tool_calls": "tool calling is not supported (shipyard serves base language models)",
    "functions": "function calling is not supported (shipyard serves base language models)",
    "function_call": "function calling is not supported (shipyard serves base language models)",
    "response_format": "structured output (response_format) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning models are not supported",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions (metadata) are not supported",
    "service_tier": "service tiers are not supported",
    "verbosity": "verbosity is not supported",
}


# ------------------------------------------------------------------------------ errors


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


def _bad(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, param=param, code=code)


def _engine_error(exc: GenerationError | EngineOverloaded, param: str | None) -> OpenAIError:
    if isinstance(exc, EngineOverloaded):
        return OpenAIError(str(exc), status=503, headers={"Retry-After": "1"})
    first = str(exc).split(" ", 1)[0]
    names = {*COMPLETION_PARAMS, *CHAT_PARAMS}
    return _bad(str(exc), first if first in names else param)


# ------------------------------------------------------------------------------ parsing


class _Body:
    """Typed, named access to a JSON request body; every bad value raises a 400 naming it."""

    def __init__(self, raw: Mapping[str, Any], allowed: Sequence[str]) -> None:
        for key in raw:
            if key in UNSUPPORTED:
                raise _bad(
                    f"parameter '{key}' is not supported: {UNSUPPORTED[key]}",
                    key,
                    "unsupported_parameter",
                )
            if key not in allowed:
                raise _bad(
                    f"unknown parameter '{key[:64]}'; supported: {', '.join(sorted(allowed))}",
                    key[:64],
                    "unknown_parameter",
                )
        self.raw = raw

    def get(self, key: str) -> Any:
        return self.raw.get(key)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(key)
        if value is None:
            return default
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not low <= value <= high:
            raise _bad(f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}", key)
        return float(value)

    def integer(self, key: str, default: int | None, low: int, high: int) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(f"'{key}' must be an integer in [{low}, {high}], got {value!r}", key)
        return value

    def boolean(self, key: str) -> bool:
        value = self.raw.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _bad(f"'{key}' must be true or false, got {value!r}", key)
        return value

    def no_op(self, key: str, *allowed: object) -> None:
        """Accept `key` only at a value that changes nothing (e.g. best_of=1, echo=false)."""
        value = self.raw.get(key)
        if value is not None and value not in allowed:
            raise _bad(
                f"parameter '{key}' is not supported (got {json.dumps(value)[:64]}); leave it out",
                key,
                "unsupported_parameter",
            )


class _Request:
    """What both routes parsed: the model, the prompts (token ids) and one SamplingParams each."""

    def __init__(
        self, served: ServedModel, engine: Engine, model: str, prompts: list[list[int]]
    ) -> None:
        self.served, self.engine, self.model, self.prompts = served, engine, model, prompts
        self.params: list[SamplingParams] = []
        self.stream = False
        self.include_usage = False


def _load_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad("request body is not valid JSON", None) from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None)
    return body


def _resolve(state: ServerState, body: _Body, request: Request) -> tuple[ServedModel, Engine, str]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: the name of a served language model", "model")
    name, _, version = model.partition(":")
    served = state.repo.get(name, version or None)
    request.state.model = served.name
    if served.engine is None:
        raise OpenAIError(
            f"model {name!r} is not a language model (task {served.loaded.task!r}); the OpenAI "
            "routes serve language-modeling packages (use /v2/models/.../infer for others)",
            status=400,
            param="model",
            code="model_not_supported",
        )
    return served, served.engine, model


def _stops(body: _Body, extra: Sequence[str] = ()) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOP or "" in stops:
        raise _bad(f"'stop' takes at most {MAX_STOP} non-empty strings, got {stops!r}", "stop")
    return [*stops, *(s for s in extra if s not in stops)]


def _stream_options(body: _Body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("'stream_options' is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad(
            "'stream_options' must be an object with only 'include_usage' (true/false)",
            "stream_options",
        )
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise _bad("'stream_options.include_usage' must be true or false", "stream_options")
    return value


def _sampling(
    req: _Request,
    body: _Body,
    *,
    max_tokens_key: str,
    default_max_tokens: int | None,
    logprobs: int | None,
    stops: list[str],
    prompt_param: str,
) -> None:
    """Fill req.params (n per prompt, seeds seed, seed+1, ...) and req.stream/include_usage."""
    n = body.integer("n", 1, 1, MAX_CHOICES)
    assert n is not None
    if n * len(req.prompts) > MAX_CHOICES:
        raise _bad(
            f"{len(req.prompts)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", "n"
        )
    seed = body.integer("seed", None, -(2**63), 2**63 - 1 - MAX_CHOICES)
    top_k = body.integer("top_k", None, -1, 1 << 30)
    block_size = req.engine.model.max_context
    req.stream = body.boolean("stream")
    req.include_usage = _stream_options(body, req.stream)
    common = {
        "temperature": body.number("temperature", 1.0, 0.0, 2.0),
        "top_p": body.number("top_p", 1.0, 0.0, 1.0),
        "top_k": top_k if top_k is not None and top_k > 0 else None,
        "presence_penalty": body.number("presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": body.number("frequency_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": body.number("repetition_penalty", 1.0, 1e-6, 100.0),
        "stop": stops,
        "logprobs": logprobs,
        "stop_on_eos": not body.boolean("ignore_eos"),
    }
    if common["top_p"] == 0:
        raise _bad("'top_p' must be in (0, 1], got 0", "top_p")
    requested = body.integer(max_tokens_key, None, 1, 1 << 30)
    for ids in req.prompts:
        max_tokens = requested
        if max_tokens is None:
            max_tokens = default_max_tokens or block_size - len(ids)
        if len(ids) + max_tokens > block_size:
            param = prompt_param if len(ids) >= block_size else max_tokens_key
            raise OpenAIError(
                f"this model's context is {block_size} tokens, but the prompt has {len(ids)} "
                f"and {max_tokens_key} asks for {max_tokens}; shorten the {prompt_param} or "
                f"lower {max_tokens_key}",
                param=param,
                code="context_length_exceeded",
            )
        for i in range(n):
            try:
                params = SamplingParams(
                    max_tokens=max_tokens,
                    seed=None if seed is None else seed + i,
                    **common,  # type: ignore[arg-type]
                )
            except GenerationError as exc:
                raise _engine_error(exc, None) from None
            req.params.append(params)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_prompt(text) or [tokenizer.eos_id]


def _completion_prompts(body: _Body, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [_encode(tokenizer, prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [_encode(tokenizer, p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [_token_ids(prompt, vocab_size)]
        if all(isinstance(p, list) and p for p in prompt):
            return [_token_ids(p, vocab_size) for p in prompt]
    raise _bad(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of "
        "token id lists (none empty)",
        "prompt",
    )


def _token_ids(ids: list[Any], vocab_size: int) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise _bad(f"'prompt' token ids must be integers in [0, {vocab_size})", "prompt")
    return list(ids)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Validated chat messages as {role, content[, name]} with text content ("developer" =
    "system"), what a chat template is rendered with."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object with 'role' and 'content'", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise _bad(
                f"'{where}.{sorted(extra)[0]}' is not supported (messages take role, content, "
                "name)",
                f"{where}.{sorted(extra)[0]}",
            )
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise _bad(
                f"'{where}.role' must be one of system, developer, user, assistant; got "
                f"{str(role)[:32]!r} (tool messages are not supported)",
                f"{where}.role",
            )
        item = {"role": str(role), "content": _content(message, where)}
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        out.append(item)
    return out


def chat_prompt(messages: Any) -> str:
    """The prompt text for a list of chat messages in shipyard's fallback format
    (`CHAT_TEMPLATE`; "developer" = "system"), for models without a chat template."""
    parts = [
        CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in chat_messages(messages)
    ]
    return "".join(parts) + "<|assistant|>\n"


def chat_prompt_ids(tokenizer: Tokenizer, messages: Any) -> list[int]:
    """Prompt ids for chat messages: the model's own template, else the fallback format."""
    try:
        return tokenizer.chat_prompt_ids(chat_messages(messages))
    except ChatTemplateError as exc:  # e.g. "Conversation roles must alternate ..."
        raise _bad(f"the model's chat template refused these messages: {exc}", "messages") from None


def _content(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _bad(
        f"'{where}.content' must be a string or a list of text parts "
        '([{"type": "text", "text": "..."}]; images and audio are not supported)',
        f"{where}.content",
    )


def parse_completion(state: ServerState, raw: dict[str, Any], request: Request) -> _Request:
    """Validate a /v1/completions body into engine requests."""
    body = _Body(raw, COMPLETION_PARAMS)
    served, engine, model = _resolve(state, body, request)
    body.no_op("best_of", 1)
    body.no_op("echo", False)
    body.no_op("suffix", "")
    body.no_op("logit_bias", {})
    prompts = _completion_prompts(body, engine.tokenizer, _vocab(engine))
    req = _Request(served, engine, model, prompts)
    _sampling(
        req,
        body,
        max_tokens_key="max_tokens",
        default_max_tokens=16,
        logprobs=body.integer("logprobs", None, 0, MAX_LOGPROBS),
        stops=_stops(body),
        prompt_param="prompt",
    )
    return req


def parse_chat(state: ServerState, raw: dict[str, Any], request: Request) -> _Request:
    """Validate a /v1/chat/completions body into engine requests."""
    body = _Body(raw, CHAT_PARAMS)
    served, engine, model = _resolve(state, body, request)
    body.no_op("logit_bias", {})
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("give max_completion_tokens or max_tokens, not both", "max_tokens")
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    top = body.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    want = body.boolean("logprobs")
    if top is not None and not want:
        raise _bad("'top_logprobs' needs logprobs=true", "top_logprobs")
    ids = chat_prompt_ids(engine.tokenizer, body.get("messages"))
    req = _Request(served, engine, model, [ids])
    _sampling(
        req,
        body,
        max_tokens_key=key,
        default_max_tokens=None,
        logprobs=(top or 0) if want else None,
        stops=_stops(body, engine.tokenizer.chat_stops),
        prompt_param="messages",
    )
    return req


def _vocab(engine: Engine) -> int:
    return int(engine.model.vocab_size)


# ------------------------------------------------------------------------------ running


async def _submit(req: _Request) -> list[AsyncRequestStream]:
    """Submit every choice; if one is refused, withdraw the others."""
    streams: list[AsyncRequestStream] = []
    per_prompt = len(req.params) // len(req.prompts)
    try:
        for i, params in enumerate(req.params):
            streams.append(await req.engine.submit(req.prompts[i // per_prompt], params))
    except (GenerationError, EngineOverloaded) as exc:
        for stream in streams:
            stream.cancel()
        raise _engine_error(exc, "prompt") from None
    if isinstance(req.engine.observer, EngineMetrics):
        req.engine.observer.refresh()  # the waiting gauge
    return streams


async def _results(request: Request, streams: list[AsyncRequestStream]) -> list[GenerationResult]:
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


async def _events(streams: list[AsyncRequestStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from every stream as they come."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncRequestStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((i, event))
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _usage(req: _Request, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids in req.prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    if tokenizer.kind == "byte":
        byte = token_id - 2  # byte kind: id = byte value + 2
        return [byte] if 0 <= byte < 256 else []
    return list(_token_text(tokenizer, token_id).encode())


def _completion_logprobs(
    tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob], offset: int
) -> dict[str, Any]:
    tokens = [_token_text(tokenizer, lp.token_id) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": _token_text(tokenizer, token_id),
            "logprob": logprob,
            "bytes": _token_bytes(tokenizer, token_id),
        }

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


_json_string = json.encoder.encode_basestring_ascii  # what json.dumps does to a str (C)


class _TextChunks:
    """The SSE bytes of a plain text chunk (no logprobs, no finish reason), from a template.

    Byte for byte what `_sse({**head, "choices": [choice]})` gives, without building and
    serialising the dicts for every token: only the text goes through the JSON encoder.
    """

    def __init__(self, head: dict[str, Any], chat: bool, choices: int) -> None:
        start = "data: " + json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":[{"index":'
        middle = ',"delta":{"content":' if chat else ',"text":'
        self._prefix = [f"{start}{i}{middle}" for i in range(choices)]
        self._suffix = ('},"logprobs":null,' if chat else ',"logprobs":null,') + (
            '"finish_reason":null}]}\n\n'
        )

    def __call__(self, index: int, text: str) -> bytes:
        return (self._prefix[index] + _json_string(text) + self._suffix).encode()


def _streaming(
    request: Request,
    req: _Request,
    streams: list[AsyncRequestStream],
    *,
    chat: bool,
    response_id: str,
) -> StreamingResponse:
    tokenizer = req.engine.tokenizer
    created = int(time.time())
    head = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": req.model,
    }

    text_chunk = _TextChunks(head, chat, len(streams))

    async def body() -> AsyncIterator[bytes]:
        completion_tokens = 0
        offsets = [0] * len(streams)
        try:
            if chat:
                for i in range(len(streams)):
                    choice = {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield _sse({**head, "choices": [choice]})
            try:
                async for i, event in _events(streams):
                    completion_tokens += 1
                    finish = _finish(event.finish_reason)
                    if finish is None and event.logprob is None:
                        if event.text:
                            offsets[i] += len(event.text)
                            yield text_chunk(i, event.text)
                        # else held back: part of a character or of a possible stop string
                        continue
                    lps = [event.logprob] if event.logprob is not None else None
                    if chat:
                        choice = {
                            "index": i,
                            "delta": {"content": event.text} if event.text else {},
                            "logprobs": _chat_logprobs(tokenizer, lps) if lps else None,
                            "finish_reason": finish,
                        }
                    else:
                        choice = {
                            "index": i,
                            "text": event.text,
                            "logprobs": (
                                _completion_logprobs(tokenizer, lps, offsets[i]) if lps else None
                            ),
                            "finish_reason": finish,
                        }
                        offsets[i] += len(event.text)
                    yield _sse({**head, "choices": [choice]})
            except Exception:
                error = {"message": "the model failed while generating", "type": "server_error"}
                yield _sse({"error": {**error, "param": None, "code": None}})
                return
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(req, completion_tokens)})
            yield b"data: [DONE]\n\n"
        finally:  # client gone (or done): free the engine slots at the next step
            for stream in streams:
                if stream.final is None:
                    stream.cancel()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _complete(request: Request, state: ServerState, chat: bool) -> Any:
    raw = _load_json(await read_body(request, state.settings.max_body_bytes))
    req = parse_chat(state, raw, request) if chat else parse_completion(state, raw, request)
    streams = await _submit(req)
    response_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    if req.stream:
        return _streaming(request, req, streams, chat=chat, response_id=response_id)
    results = await _results(request, streams)
    tokenizer = req.engine.tokenizer
    choices = []
    for i, result in enumerate(results):
        logprobs = None
        if chat:
            if result.logprobs is not None:
                logprobs = _chat_logprobs(tokenizer, result.logprobs)
            message = {"role": "assistant", "content": result.text}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": _finish(result.finish_reason),
                }
            )
        else:
            if result.logprobs is not None:
                logprobs = _completion_logprobs(tokenizer, result.logprobs, 0)
            choices.append(
                {
                    "index": i,
                    "text": result.text,
                    "logprobs": logprobs,
                    "finish_reason": _finish(result.finish_reason),
                }
            )
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": _usage(req, sum(r.completion_tokens for r in results)),
    }


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

    @router.get("/v1/models")
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

    @router.get("/v1/models/{model}")
    async def retrieve_model(
        model: str, state: ServerState = Depends(server_state), key: ApiKey | None = infer
    ) -> dict[str, Any]:
        name, _, version = model.partition(":")
        served = state.repo.get(name, version or None)
        if served.engine is None:
            raise OpenAIError(f"model {name!r} is not a language model", status=404, param="model")
        return _model_card(model, served)

    @router.post("/v1/completions")
    async def completions(
        request: Request, state: ServerState = Depends(server_state), key: ApiKey | None = infer
    ) -> Any:
        return await _complete(request, state, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, state: ServerState = Depends(server_state), key: ApiKey | None = infer
    ) -> Any:
        return await _complete(request, state, chat=True)

    return router


__all__ = [
    "CHAT_STOPS",
    "CHAT_TEMPLATE",
    "UNSUPPORTED",
    "OpenAIError",
    "build_router",
    "chat_messages",
    "chat_prompt",
    "chat_prompt_ids",
    "error_response",
    "is_openai_route",
]
