"""OpenAI-compatible routes for language-model packages (works with the official `openai` SDK).

    GET  /v1/models                 the language models served ({"object": "list", "data": [...]})
    GET  /v1/models/{model}         one of them
    POST /v1/completions            prompt → text (streaming: server-sent events)
    POST /v1/chat/completions       messages → assistant message, through the model's own chat
                                    template (imported checkpoints), else `CHAT_TEMPLATE`

One module per job: `parsing` (a body into engine requests, strictly checked), `answers`
(finish reasons, usage, logprobs), `streaming` (server-sent events), `routes` (submit and
answer), `schemas` (what the OpenAPI document says), `errors` (OpenAI's error body).

Every choice is one request to the model's continuous-batching `Engine` (`n` choices are `n`
independent requests; with a `seed`, choice i uses seed + i). Errors on these routes use
OpenAI's body, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from shipyard.serve.protocols.openai.errors import OpenAIError, error_response, is_openai_route
from shipyard.serve.protocols.openai.parsing import (
    CHAT_STOPS,
    CHAT_TEMPLATE,
    UNSUPPORTED,
    chat_messages,
    chat_prompt,
    chat_prompt_ids,
)
from shipyard.serve.protocols.openai.routes import FAST_ROUTES, build_router

__all__ = [
    "CHAT_STOPS",
    "CHAT_TEMPLATE",
    "FAST_ROUTES",
    "UNSUPPORTED",
    "OpenAIError",
    "build_router",
    "chat_messages",
    "chat_prompt",
    "chat_prompt_ids",
    "error_response",
    "is_openai_route",
]
