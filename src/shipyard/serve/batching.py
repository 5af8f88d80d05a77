"""The inference core's dynamic batcher: many concurrent requests, one forward pass.

Requests put their rows on a bounded per-model queue and await a future. One asyncio task per
model takes the oldest request, waits at most `max_wait_ms` (measured from that request's arrival)
for more rows, concatenates up to `max_batch_size` rows whose trailing shape and dtype match, runs
one forward in the model's own worker thread (so the event loop never blocks) and hands each
request back exactly its rows. While a forward runs, new requests queue, so under load the next
batch is full without any waiting at all.

A request whose future is cancelled (timeout, client gone) leaves the queue at once and is never
run. `close()` stops new submissions and drains what is queued, for unloading and shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shipyard.serve.errors import BadRequest, InferenceFailed, RequestError, Unavailable
from shipyard.serve.settings import default

log = logging.getLogger("shipyard.serve")

Outputs = dict[str, np.ndarray]
ForwardFn = Callable[[np.ndarray], Outputs]
BatchHook = Callable[[int, int, float], None]  # (rows, requests, forward seconds)


@dataclass(eq=False)
class _Item:
    x: np.ndarray
    future: asyncio.Future[Outputs]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[tuple[int, ...], np.dtype]:
        return self.x.shape[1:], self.x.dtype


class Batcher:
    """Groups concurrent requests for one model into batched forward passes.

    Args:
        fn: the forward: batched inputs (N, ...) → outputs whose first dimension is N.
        max_batch_size: rows per forward (a single larger request still runs, alone).
        max_wait_ms: how long the oldest request may wait for the batch to fill.
        max_queue: queued requests before `submit` raises `Unavailable` (HTTP 503).
        on_batch: called after each forward with (rows, requests, seconds) (metrics, tests).
        on_queue_time: called with each request's seconds in the queue.
        on_depth: called with the queue depth whenever it changes.
        client_errors: exceptions from `fn` that mean "bad input" (HTTP 400 with their message).
    """

    def __init__(
        self,
        name: str,
        fn: ForwardFn,
        *,
        max_batch_size: int = default("max_batch_size"),
        max_wait_ms: float = default("max_wait_ms"),
        max_queue: int = default("max_queue"),
        on_batch: BatchHook | None = None,
        on_queue_time: Callable[[float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        client_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._fn = fn
        self._on_batch = on_batch
        self._on_queue_time = on_queue_time
        self._on_depth = on_depth
        self._client_errors = client_errors
        self._queue: deque[_Item] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._running = 0  # requests in the forward pass now

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.name}"
            )

    async def close(self) -> None:
        """Refuse new requests, finish every queued and running one, then stop."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the forward pass in progress)."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Requests queued or in the running forward."""
        return len(self._queue) + self._running

    # -- requests -------------------------------------------------------------------------

    def submit(self, x: np.ndarray) -> asyncio.Future[Outputs]:
        """Queue `x` (N, ...) and return the future of its outputs. Never awaits, so a caller
        that resolved this batcher from the repository enqueues before anything can unload it."""
        if self._closing or self._task is None:
            raise Unavailable(
                f"model {self.name!r} is being unloaded; retry", headers={"Retry-After": "1"}
            )
        if len(self._queue) >= self.max_queue:
            raise Unavailable(
                f"model {self.name!r} is overloaded ({self.max_queue} requests queued); "
                "retry later",
                headers={"Retry-After": "1"},
            )
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        item = _Item(x, future)
        self._queue.append(item)
        future.add_done_callback(lambda f: self._drop(item) if f.cancelled() else None)
        self._depth_changed()
        assert self._wakeup is not None
        self._wakeup.set()
        return future

    def _drop(self, item: _Item) -> None:
        # a cancelled request (timeout or client gone) leaves the queue before it runs
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already taken into a batch
        self._depth_changed()

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))

    # -- the batching loop ----------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait_s
            while self._rows_ready(first) < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or first.future.done():
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._forward(batch)

    def _rows_ready(self, first: _Item) -> int:
        key = first.key
        return sum(len(it.x) for it in self._queue if it.key == key)

    def _take(self) -> list[_Item]:
        """Pop the oldest request and every later compatible one that fits the batch."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if not self._queue:
            return []
        key = self._queue[0].key
        batch: list[_Item] = []
        rows = 0
        keep: deque[_Item] = deque()
        while self._queue:
            it = self._queue.popleft()
            if it.future.done():
                continue
            n = len(it.x)
            if it.key == key and (not batch or rows + n <= self.max_batch_size):
                batch.append(it)
                rows += n
                if rows >= self.max_batch_size:
                    break
            else:
                keep.append(it)
        keep.extend(self._queue)
        self._queue = keep
        self._depth_changed()
        return batch

    async def _forward(self, batch: list[_Item]) -> None:
        now = time.perf_counter()
        if self._on_queue_time is not None:
            for it in batch:
                self._on_queue_time(now - it.enqueued)
        counts = [len(it.x) for it in batch]
        x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch])
        self._running = len(batch)
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._fn, x)
            total = len(x)
            for name, arr in outputs.items():
                if arr.ndim == 0 or arr.shape[0] != total:
                    raise RuntimeError(
                        f"output {name!r} has shape {arr.shape}, expected {total} rows "
                        "(one per input row)"
                    )
        except Exception as exc:
            self._running = 0
            if len(batch) > 1:
                # isolate the request(s) at fault: the others still get their answers
                for it in batch:
                    if not it.future.done():
                        await self._forward([it])
                return
            error: RequestError
            if isinstance(exc, self._client_errors):
                error = BadRequest(str(exc))
            else:
                log.exception("model %s failed on a batch of %d rows", self.name, len(x))
                error = InferenceFailed(f"model {self.name!r} failed on this input")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        self._running = 0
        elapsed = time.perf_counter() - now
        if self._on_batch is not None:
            self._on_batch(len(x), len(batch), elapsed)
        start = 0
        for it, n in zip(batch, counts, strict=True):
            if not it.future.done():
                it.future.set_result({k: v[start : start + n] for k, v in outputs.items()})
            start += n
