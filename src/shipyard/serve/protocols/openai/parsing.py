"""Parsing: an OpenAI request body into engine requests (token ids and `SamplingParams`).

Parameters are checked strictly: an unsupported one (`tools`, `response_format`, `logit_bias`,
...) or an unknown one is a 400 that names it, never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request

from shipyard.data.chat import FALLBACK_STOPS, FALLBACK_TEMPLATE, ChatTemplateError
from shipyard.data.tokenization import Tokenizer
from shipyard.errors import EngineOverloaded, GenerationError
from shipyard.generate import Engine, SamplingParams
from shipyard.serve.core import ServedModel
from shipyard.serve.http import ServerState, parse_json
from shipyard.serve.protocols.openai.errors import OpenAIError, bad

CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = FALLBACK_TEMPLATE  # one per message, then "<|assistant|>\n"
CHAT_STOPS = FALLBACK_STOPS
MAX_STOP = 4  # as OpenAI
MAX_CHOICES = 16  # prompts x n per request
MAX_LOGPROBS = 20
UNLIMITED_CHAT_MAX_TOKENS = 256  # a chat's default max_tokens on a model without a context limit

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


def engine_error(exc: GenerationError | EngineOverloaded, param: str | None) -> OpenAIError:
    if isinstance(exc, EngineOverloaded):
        return OpenAIError(str(exc), status=503, headers={"Retry-After": "1"})
    first = str(exc).split(" ", 1)[0]
    names = {*COMPLETION_PARAMS, *CHAT_PARAMS}
    return bad(str(exc), first if first in names else param)


# ------------------------------------------------------------------------------ parsing


class _Body:
    """Typed, named access to a JSON request body; every bad value raises a 400 naming it."""

    def __init__(self, raw: Mapping[str, Any], allowed: Sequence[str]) -> None:
        for key in raw:
            if key in UNSUPPORTED:
                raise bad(
                    f"parameter '{key}' is not supported: {UNSUPPORTED[key]}",
                    key,
                    "unsupported_parameter",
                )
            if key not in allowed:
                raise bad(
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
            raise bad(f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}", key)
        return float(value)

    def integer(self, key: str, default: int | None, low: int, high: int) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad(f"'{key}' must be an integer in [{low}, {high}], got {value!r}", key)
        return value

    def boolean(self, key: str) -> bool:
        value = self.raw.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise bad(f"'{key}' must be true or false, got {value!r}", key)
        return value

    def string(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"'{key}' must be a string, got {json.dumps(value)[:64]}", key)
        return value

    def no_op(self, key: str, *allowed: object) -> None:
        """Accept `key` only at a value that changes nothing (e.g. best_of=1, echo=false)."""
        value = self.raw.get(key)
        # by type too: best_of=true or echo=0 is not the no-op value
        if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
            raise bad(
                f"parameter '{key}' is not supported (got {json.dumps(value)[:64]}); leave it out",
                key,
                "unsupported_parameter",
            )


class ParsedRequest:
    """What both routes parsed: the model, the prompts (token ids) and one SamplingParams each."""

    def __init__(
        self, served: ServedModel, engine: Engine, model: str, prompts: list[list[int]]
    ) -> None:
        self.served, self.engine, self.model, self.prompts = served, engine, model, prompts
        self.params: list[SamplingParams] = []
        self.stream = False
        self.include_usage = False


def load_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (400 otherwise, in OpenAI's error body: see errors.py)."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", None)
    return body


def _resolve(state: ServerState, body: _Body, request: Request) -> tuple[ServedModel, Engine, str]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the name of a served language model", "model")
    name, _, version = model.partition(":")
    served = state.repo.get(name, version or None)
    request.state.model = served.name
    if served.engine is None:
        what = (
            f"is a {served.loaded.manifest.architecture.name} language model without a torch "
            "model or tokenizer (e.g. an ONNX export), which the batching engine cannot run "
            "(serve the torch package it was exported from, or use /v2/models/.../infer)"
            if served.loaded.task == "language-modeling"
            else f"is not a language model (task {served.loaded.task!r})"
        )
        raise OpenAIError(
            f"model {name!r} {what}; the OpenAI routes serve language-modeling packages (use "
            "/v2/models/.../infer for others)",
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
        raise bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOP or "" in stops:
        raise bad(f"'stop' takes at most {MAX_STOP} non-empty strings, got {stops!r}", "stop")
    return [*stops, *(s for s in extra if s not in stops)]


def _stream_options(body: _Body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("'stream_options' is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad(
            "'stream_options' must be an object with only 'include_usage' (true/false)",
            "stream_options",
        )
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise bad("'stream_options.include_usage' must be true or false", "stream_options")
    return value


def _sampling(
    req: ParsedRequest,
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
        raise bad(
            f"{len(req.prompts)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", "n"
        )
    seed = body.integer("seed", None, -(2**63), 2**63 - 1 - MAX_CHOICES)
    top_k = body.integer("top_k", None, -1, 1 << 30)
    block_size = req.engine.max_context  # None: no limit (a recurrent model)
    body.string("user")  # accepted (OpenAI's end-user id) and not used
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
        raise bad("'top_p' must be in (0, 1], got 0", "top_p")
    requested = body.integer(max_tokens_key, None, 1, 1 << 30)
    for ids in req.prompts:
        max_tokens = requested
        if max_tokens is None:
            max_tokens = default_max_tokens or (
                UNLIMITED_CHAT_MAX_TOKENS if block_size is None else block_size - len(ids)
            )
        if block_size is not None and len(ids) + max_tokens > block_size:
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
                raise engine_error(exc, None) from None
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
    raise bad(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of "
        "token id lists (none empty)",
        "prompt",
    )


def _token_ids(ids: list[Any], vocab_size: int) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise bad(f"'prompt' token ids must be integers in [0, {vocab_size})", "prompt")
    return list(ids)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Validated chat messages as {role, content[, name]} with text content ("developer" =
    "system"), what a chat template is rendered with."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad(
                f"'{where}.{sorted(extra)[0]}' is not supported (messages take role, content, "
                "name)",
                f"{where}.{sorted(extra)[0]}",
            )
        if not isinstance(message.get("name", ""), str):
            raise bad(f"'{where}.name' must be a string", f"{where}.name")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise bad(
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
        raise bad(f"the model's chat template refused these messages: {exc}", "messages") from None


def _content(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise bad(
        f"'{where}.content' must be a string or a list of text parts "
        '([{"type": "text", "text": "..."}]; images and audio are not supported)',
        f"{where}.content",
    )


def parse_completion(state: ServerState, raw: dict[str, Any], request: Request) -> ParsedRequest:
    """Validate a /v1/completions body into engine requests."""
    body = _Body(raw, COMPLETION_PARAMS)
    served, engine, model = _resolve(state, body, request)
    body.no_op("best_of", 1)
    body.no_op("echo", False)
    body.no_op("suffix", "")
    body.no_op("logit_bias", {})
    prompts = _completion_prompts(body, engine.tokenizer, _vocab(engine))
    req = ParsedRequest(served, engine, model, prompts)
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


def parse_chat(state: ServerState, raw: dict[str, Any], request: Request) -> ParsedRequest:
    """Validate a /v1/chat/completions body into engine requests."""
    body = _Body(raw, CHAT_PARAMS)
    served, engine, model = _resolve(state, body, request)
    body.no_op("logit_bias", {})
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("give max_completion_tokens or max_tokens, not both", "max_tokens")
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    top = body.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    want = body.boolean("logprobs")
    if top is not None and not want:
        raise bad("'top_logprobs' needs logprobs=true", "top_logprobs")
    ids = chat_prompt_ids(engine.tokenizer, body.get("messages"))
    req = ParsedRequest(served, engine, model, [ids])
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
