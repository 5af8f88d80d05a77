"""Answers: OpenAI's finish reasons, usage and logprobs objects, from engine results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shipyard.data.tokenization import Tokenizer
from shipyard.generate import TokenLogprob
from shipyard.serve.protocols.openai.parsing import ParsedRequest


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def usage(req: ParsedRequest, completion_tokens: int) -> dict[str, int]:
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


def completion_logprobs(
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


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
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
