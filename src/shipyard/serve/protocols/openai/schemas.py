"""What the OpenAPI document says about the OpenAI routes' bodies (`parsing` is the parser).

The request models forbid unknown keys, as the parser does; the limits are the parser's
(`MAX_CHOICES`, `MAX_LOGPROBS`, `MAX_STOP`). What a schema cannot say (the prompt plus
`max_tokens` must fit the model's context; `n` times the prompts at most `MAX_CHOICES`) is a
400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shipyard.serve.protocols.openai.parsing import MAX_CHOICES, MAX_LOGPROBS, MAX_STOP

_STRICT = ConfigDict(extra="forbid")

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    """Only with stream=true."""

    model_config = _STRICT
    include_usage: bool = Field(False, description="End with a chunk carrying usage.")


class _Sampling(BaseModel):
    """The parameters both routes take."""

    model_config = _STRICT
    model: str = Field(min_length=1, description="A served language model: NAME or NAME:VERSION.")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 30, description="0 or -1: no limit.")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=1e-6, le=100)
    ignore_eos: bool | None = None
    user: str | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = Field(
        None, description="Only {} (no bias) is supported."
    )
    max_tokens: int | None = Field(None, ge=1, le=1 << 30)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="Text, texts, token ids, or lists of token ids.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[1] | None = None
    echo: Literal[False] | None = None
    suffix: Literal[""] | None = None


class TextPart(BaseModel):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; "developer" is taken as "system"."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 30)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Needs logprobs.")


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"] | None


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class CompletionChoice(_Choice):
    """One completion."""

    text: str


class Completion(_Answer):
    """The answer of POST /v1/completions without streaming."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"]
    content: str


class ChatChoice(_Choice):
    """One chat completion."""

    message: AssistantMessage


class ChatCompletion(_Answer):
    """The answer of POST /v1/chat/completions without streaming."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    """A served language model (NAME for its default version, NAME:VERSION for each)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """The served language models."""

    object: Literal["list"]
    data: list[ModelCard]


_LOGPROBS_OR_NULL = {"anyOf": [{"type": "object"}, {"type": "null"}]}
_CHUNK: dict[str, Any] = {
    "type": "object",
    "description": "A completion or chat.completion.chunk object, or an error object.",
    "anyOf": [
        {"required": ["id", "object", "created", "model", "choices"]},
        {"required": ["error"]},
    ],
    "properties": {
        "id": {"type": "string"},
        "object": {"enum": ["text_completion", "chat.completion.chunk"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "logprobs", "finish_reason"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "text": {"type": "string"},
                    "delta": {
                        "type": "object",
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": "string"},
                        },
                    },
                    "logprobs": _LOGPROBS_OR_NULL,
                    "finish_reason": {"enum": ["stop", "length", None]},
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
        },
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
        },
    },
}

SSE = {
    "text/event-stream": {
        # OpenAPI 3.2's per-event schema: `data: {chunk JSON}` events, then `data: [DONE]`
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": _CHUNK,
                        },
                    ]
                }
            },
        },
        "description": "With stream=true: one event per token batch, then `data: [DONE]`.",
    }
}
