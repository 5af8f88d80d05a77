"""Streaming: choices as server-sent events (`text/event-stream`), token by token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from fastapi import Request, Response
from starlette.types import Receive, Scope, Send

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


class EventStream(Response):
    """A `text/event-stream` response of `body`'s chunks that stops as soon as the client goes
    away (the body generator is then closed: its `finally` frees the engine's slots).

    What Starlette's `StreamingResponse` does with its disconnect listener, without the task
    group and cancel scopes it builds for every response: a plain task waits for
    `http.disconnect` and cancels the response's own task, whose cancellation ends here.
    """

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        finished = False

        def hang_up(waiter: asyncio.Future[None]) -> None:
            if not finished and not waiter.cancelled():
                task.cancel()

        gone = asyncio.ensure_future(_disconnect(receive))
        gone.add_done_callback(hang_up)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone.done() or gone.cancelled():
                raise  # cancelled from outside (the server stopping): not ours to swallow
            task.uncancel()  # the client hung up: this response is over, the server is not
        finally:
            finished = True
            gone.cancel()
            await self.body_iterator.aclose()


async def _disconnect(receive: Receive) -> None:
    """Return when the client goes away (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def streaming_response(
    request: Request,
    req: ParsedRequest,
    streams: list[AsyncRequestStream],
    *,
    chat: bool,
    response_id: str,
) -> EventStream:
    tokenizer = req.engine.tokenizer
    created = int(time.time())
    head = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": req.model,
    }

    text_chunk = _TextChunks(head, chat, len(streams))

    async def body() -> AsyncGenerator[bytes, None]:
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

    return EventStream(body())
