"""Streaming: choices as server-sent events (`text/event-stream`), token by token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse

from shipyard.generate import AsyncRequestStream, TokenEvent
from shipyard.serve.protocols.openai.answers import (
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    usage,
)
from shipyard.serve.protocols.openai.parsing import ParsedRequest


async def merged_events(streams: list[AsyncRequestStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
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


def streaming_response(
    request: Request,
    req: ParsedRequest,
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
                async for i, event in merged_events(streams):
                    completion_tokens += 1
                    finish = finish_reason(event.finish_reason)
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
                            "logprobs": chat_logprobs(tokenizer, lps) if lps else None,
                            "finish_reason": finish,
                        }
                    else:
                        choice = {
                            "index": i,
                            "text": event.text,
                            "logprobs": (
                                completion_logprobs(tokenizer, lps, offsets[i]) if lps else None
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
                yield _sse({**head, "choices": [], "usage": usage(req, completion_tokens)})
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
