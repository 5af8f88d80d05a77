"""Continuous batching: one background thread decodes every running request together.

Each iteration of the engine thread:

1. applies cancellations and admits waiting requests while there is room (at most
   `max_batch_size` sequences, and a worst-case KV cache within `max_cached_tokens`);
2. prefills admitted prompts, at most `prefill_chunk` tokens per iteration (long prompts take
   several iterations), so running streams are never stalled for long; a fully prefilled
   request samples its first token and joins the batch;
3. runs one decode step for the whole batch: every row feeds its last token, with its own
   position ids and a mask over its left padding (see `BatchKVCache`); finished rows leave.
   A GPT or Llama on CPU runs this step traced (`shipyard.generate.traced`, traced once when
   the engine thread starts); other models, autocast and GPUs run it eagerly (`step_kind`).

The model is a `DecodingModel`: a KV-cache `LanguageModel` (GPT, Llama) or a
`RecurrentLanguageModel` (the rnn), whose `RecurrentState` is the batch's cache instead (rows
join and leave through the same `concat` / `select`; no padding, positions or mask, and no
context limit or cache budget, since a row's state never grows).

Requests come in through `submit` (asyncio, for the server) or `submit_sync` (threads, CLI,
tests) and get their `TokenEvent`s through a queue. At most `max_batch_size + max_queue`
requests are accepted at once; beyond that `submit` raises `EngineOverloaded` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import EngineOverloaded, GenerationError
from shipyard.generate.cache import (
    BatchKVCache,
    DecodeCache,
    concat_caches,
    forward_cached,
    new_cache,
)
from shipyard.generate.packed import kv_cache_dtype, prepare_decoding
from shipyard.generate.params import SamplingParams
from shipyard.generate.sampling import SamplingBatch, TokenHistory, choose_tokens
from shipyard.generate.sequence import (
    GenerationResult,
    SequenceState,
    TokenEvent,
    TokenLogprob,
    new_request_id,
)
from shipyard.generate.single import autocast_context, encode_prompt, model_device
from shipyard.generate.traced import (
    TracedStep,
    traced_prefill,
    traced_step,
    traced_step_unsupported,
)
from shipyard.models.protocol import (
    DecodingModel,
    RecurrentLanguageModel,
    context_limit,
    is_language_model,
    language_module,
)

log = logging.getLogger("shipyard.generate")

LogitsHook = Callable[[str, int, torch.Tensor], None]
"""Called as hook(request_id, token_index, raw_logits (V,)) on the engine thread (debugging)."""


class EngineObserver:
    """Hooks the engine thread calls; subclass to feed metrics. Keep them fast and thread-safe."""

    def on_request_start(self, request_id: str, prompt_tokens: int, queued_s: float) -> None:
        """A request left the queue and starts prefilling."""

    def on_first_token(self, request_id: str, time_to_first_token_s: float) -> None:
        """A request produced its first token (time measured from submission)."""

    def on_token(self, request_id: str, inter_token_s: float) -> None:
        """A request produced a later token, `inter_token_s` after its previous one."""

    def on_finish(self, result: GenerationResult) -> None:
        """A request finished (including "cancelled")."""

    def on_step(self, batch_size: int, step_s: float) -> None:
        """One decode step over `batch_size` running sequences took `step_s` seconds."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters."""

    running: int  # sequences in the decode batch
    prefilling: int  # admitted, prompt not fully processed yet
    waiting: int  # accepted, not admitted yet
    requests_total: int  # accepted since start
    requests_finished: int  # finished for any reason (cancelled included)
    requests_cancelled: int
    prompt_tokens_total: int  # prefilled prompt tokens
    generation_tokens_total: int  # generated tokens
    decode_steps: int
    cached_slots: int  # KV cache slots of the decode batch (rows x padded length; 0: recurrent)


class _End:
    """The last item of a request's queue: the stream is over, with this result."""

    def __init__(self, result: GenerationResult) -> None:
        self.result = result


_Item = TokenEvent | _End | BaseException


class _Stream:
    """What both request handles share."""

    def __init__(self, engine: Engine, request_id: str, prompt_tokens: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.final: GenerationResult | None = None  # set once the stream is over
        self._over = False  # final event, end marker or error seen

    def cancel(self) -> bool:
        """Ask the engine to stop this request; its stream then ends ("cancelled")."""
        return self._engine.cancel(self.request_id)

    def _take(self, item: _Item) -> TokenEvent | None:
        if isinstance(item, BaseException):
            self._over = True
            raise item
        if isinstance(item, _End):
            self.final, self._over = item.result, True
            return None
        if item.result is not None:
            self.final, self._over = item.result, True
        return item


class RequestStream(_Stream):
    """A blocking iterator over one request's `TokenEvent`s (from `Engine.submit_sync`)."""

    def __init__(self, engine: Engine, request_id: str, prompt_tokens: int) -> None:
        super().__init__(engine, request_id, prompt_tokens)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()

    def _put(self, item: _Item) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        event = None if self._over else self._take(self._queue.get())
        if event is None:
            raise StopIteration
        return event

    def result(self) -> GenerationResult:
        """Wait for the end of the stream and return the result."""
        for _ in self:
            pass
        assert self.final is not None
        return self.final


class AsyncRequestStream(_Stream):
    """An async iterator over one request's `TokenEvent`s (from `Engine.submit`).

    Use as `async with await engine.submit(...) as events: async for event in events: ...` so
    that leaving early (client disconnect, error) cancels the request.
    """

    def __init__(
        self,
        engine: Engine,
        request_id: str,
        prompt_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(engine, request_id, prompt_tokens)
        self.loop = loop
        # A deque and at most one waiting future: lighter than an asyncio.Queue per token.
        # Both are only touched on the loop's thread (the engine delivers via the loop).
        self._items: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def _put(self, item: _Item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _get(self) -> _Item:
        while not self._items:
            waiter = self.loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._over:
            raise StopAsyncIteration
        item = self._items.popleft() if self._items else await self._get()
        event = self._take(item)
        if event is None:
            raise StopAsyncIteration
        return event

    async def result(self) -> GenerationResult:
        """Wait for the end of the stream and return the result."""
        async for _ in self:
            pass
        assert self.final is not None
        return self.final

    async def __aenter__(self) -> AsyncRequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._over:
            self.cancel()


_S = TypeVar("_S", RequestStream, AsyncRequestStream)


def _deliver(items: list[tuple[AsyncRequestStream, _Item]]) -> None:
    for stream, item in items:
        stream._put(item)


class _Request:
    """Engine-side state of one accepted request."""

    def __init__(self, state: SequenceState, stream: RequestStream | AsyncRequestStream) -> None:
        self.state = state
        self.stream = stream
        self.cache: DecodeCache | None = None  # own cache while prefilling
        self.prefilled = 0  # prompt tokens already in the cache
        self.pad = 0  # left padding slots in the decode batch


class Engine:
    """Continuous-batching text generation over one language model, driven by a background thread.

    max_batch_size: most sequences decoded together.
    max_cached_tokens: cap on KV cache slots of the decode batch; a request is admitted only if
        (running + 1) x (largest prompt + max_tokens among them) stays within it. Default
        max_batch_size x the model's context (no extra limit); for a recurrent model, no cap
        (its state does not grow with the tokens).
    max_queue: accepted requests beyond the running ones; more raise `EngineOverloaded`.
    prefill_chunk: most prompt tokens prefilled per iteration (bounds the stall of the batch).
    device: move the model there (default: where it is). The model is put in eval mode and its
        layers get decode kernels by the CPU's features (`prepare_decoding`, logged at start-up
        and kept in `self.kernels`; training it later is unaffected).
    weights: "auto" (the package's weights on their fastest exact kernel), "int8" (quantize
        fp32 Linear layers to int8 in place and decode with the int8 GEMM) or "fp32".
    kv_cache: what the KV cache stores: "auto" (float16 with int8 weights on the native kernels,
        else the model's dtype), "fp32" or "fp16" (see `kv_cache_dtype`).
    autocast_dtype: e.g. torch.bfloat16 to run the model under autocast (GPU); None = as is.
    observer: metrics hooks; logits_hook: see `LogitsHook` (tests, debugging).
    start: start the engine thread now (else call `start()`).
    """

    def __init__(
        self,
        model: DecodingModel,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 16,
        max_cached_tokens: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        device: torch.device | str | None = None,
        autocast_dtype: torch.dtype | None = None,
        observer: EngineObserver | None = None,
        logits_hook: LogitsHook | None = None,
        start: bool = True,
        weights: str = "auto",
        kv_cache: str = "auto",
    ) -> None:
        self.max_context = context_limit(model)  # None: no limit (a recurrent model)
        module = language_module(model)
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue < 0:
            raise GenerationError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if max_cached_tokens is None and self.max_context is not None:
            max_cached_tokens = max_batch_size * self.max_context
        self.max_cached_tokens = max_cached_tokens
        if max_cached_tokens is not None and max_cached_tokens < 2:
            raise GenerationError(f"max_cached_tokens must be >= 2, got {max_cached_tokens}")
        if device is not None:
            module.to(device)
        self.kernels = prepare_decoding(module, weights)
        self.kv_dtype = kv_cache_dtype(module, kv_cache)  # None: the model's own
        if self.kv_dtype is not None and not isinstance(model, RecurrentLanguageModel):
            self.kernels += f"; KV cache {str(self.kv_dtype).removeprefix('torch.')}"
        log.info(self.kernels)
        self.model = model
        self._recurrent = isinstance(model, RecurrentLanguageModel)
        self.tokenizer = tokenizer
        self.device = model_device(module)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.autocast_dtype = autocast_dtype
        self.observer = observer or EngineObserver()
        self.logits_hook = logits_hook
        # The decode step runs traced (`shipyard.generate.traced`) where it can: traced when the
        # engine thread starts, so a server pays for it at start-up, not on a request.
        self.step_kind = "eager"  # "traced" once the thread has traced the step
        self._eager_why = (
            traced_step_unsupported(model, autocast_dtype)
            if is_language_model(model)
            else "a recurrent model"
        )
        self._step: TracedStep | None = None
        self._prefill_step: TracedStep | None = None  # prompts (chunks) of two or more tokens

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Shared with submitting threads (guarded by _lock).
        self._waiting: deque[_Request] = deque()
        self._active: dict[str, _Request] = {}
        self._cancel: set[str] = set()
        self._closing = False
        self._drain = False
        self._counts = dict.fromkeys(
            ("requests", "finished", "cancelled", "prompt_tokens", "tokens", "steps"), 0
        )
        # Engine thread only.
        self._prefilling: list[_Request] = []
        self._running: list[_Request] = []
        self._cache: DecodeCache | None = None
        self._batch: SamplingBatch | None = None
        self._history: TokenHistory | None = None
        self._next_tokens: list[int] = []
        self._outbox: list[tuple[_Request, _Item]] = []
        self._new_tokens = 0  # generated tokens not yet added to _counts (one lock per step)
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- public API (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._trace_and_run, name="shipyard-generate-engine", daemon=True
                )
                self._thread.start()

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine. drain=True finishes accepted requests first; else they are cancelled.

        New submissions raise EngineOverloaded from now on.
        """
        with self._lock:
            self._closing, self._drain = True, drain
            self._wake.notify()
            thread = self._thread
        if thread is None:
            self._run()  # never started: cancel (or finish) what was accepted, on this thread
        elif thread is not threading.current_thread():
            thread.join(timeout)

    async def aclose(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """`close` without blocking the event loop (e.g. in a server's shutdown hook)."""
        await asyncio.to_thread(self.close, drain=drain, timeout=timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncRequestStream:
        """Accept a request; return its async event stream (call from a running event loop).

        Raises GenerationError (bad parameters, prompt too long: HTTP 400) or EngineOverloaded
        (queue full or shutting down: HTTP 503) before any token is generated.
        """
        loop = asyncio.get_running_loop()
        return self._accept(
            prompt,
            params,
            request_id,
            lambda rid, n: AsyncRequestStream(self, rid, n, loop),
        )

    def submit_sync(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestStream:
        """Accept a request; return a blocking iterator over its events (same errors as submit)."""
        return self._accept(prompt, params, request_id, lambda rid, n: RequestStream(self, rid, n))

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> GenerationResult:
        """Submit and wait for the result (blocking)."""
        return self.submit_sync(prompt, params).result()

    def cancel(self, request_id: str) -> bool:
        """Stop a request (waiting or running); False if it is unknown or already finished."""
        with self._lock:
            if request_id not in self._active:
                return False
            self._cancel.add(request_id)
            self._wake.notify()
            return True

    def stats(self) -> EngineStats:
        """Current gauges and counters."""
        with self._lock:
            c = self._counts
            cache = self._cache
            running = len(self._running)
            return EngineStats(
                running=running,
                prefilling=len(self._prefilling),
                waiting=len(self._waiting),
                requests_total=c["requests"],
                requests_finished=c["finished"],
                requests_cancelled=c["cancelled"],
                prompt_tokens_total=c["prompt_tokens"],
                generation_tokens_total=c["tokens"],
                decode_steps=c["steps"],
                cached_slots=0 if cache is None or self._recurrent else running * cache.seq_len,
            )

    # -- accepting -------------------------------------------------------------------------

    def _accept(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None,
        request_id: str | None,
        make_stream: Callable[[str, int], _S],
    ) -> _S:
        params = params or SamplingParams()
        ids = encode_prompt(self.tokenizer, prompt, params, self.max_context, self.model.vocab_size)
        budget = self.max_cached_tokens
        if budget is not None and len(ids) + params.max_tokens > budget:
            raise GenerationError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"engine's max_cached_tokens ({self.max_cached_tokens}); lower max_tokens"
            )
        rid = request_id or new_request_id()
        stream = make_stream(rid, len(ids))
        request = _Request(SequenceState(rid, ids, params, self.tokenizer), stream)
        with self._lock:
            if self._closing:
                raise EngineOverloaded("the generation engine is shutting down; retry later")
            if rid in self._active:
                raise GenerationError(f"request_id {rid!r} is already in use")
            if len(self._active) >= self.max_batch_size + self.max_queue:
                raise EngineOverloaded(
                    f"the generation engine is full ({len(self._active)} requests: "
                    f"{self.max_batch_size} running + {self.max_queue} queued); retry later"
                )
            self._active[rid] = request
            self._waiting.append(request)
            self._counts["requests"] += 1
            self._wake.notify()
        return stream

    # -- engine thread ---------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._waiting or self._cancel or self._prefilling or self._running)

    def _trace_and_run(self) -> None:
        if not self._eager_why and is_language_model(self.model):
            # None (logged) where tracing fails
            self._step = traced_step(self.model, self.kv_dtype)
            if self._step is not None:
                self._prefill_step = traced_prefill(self.model, self.kv_dtype)
        if self._step is not None:
            self.step_kind = "traced"
            log.info("generation engine: traced decode step (%.2f s)", self._step.trace_s)
        else:
            log.info("generation engine: eager decode step (%s)", self._eager_why or "no trace")
        self._run()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._has_work() or self._closing):
                    self._wake.wait()
                if self._closing and not self._drain:
                    self._cancel.update(self._active)
                cancels, self._cancel = self._cancel, set()
                stop = self._closing and not (self._drain and self._has_work())
            try:
                with torch.inference_mode(), autocast_context(self.device, self.autocast_dtype):
                    self._apply_cancels(cancels)
                    self._admit()
                    self._prefill()
                    self._flush()  # first tokens go out now, not after the decode step
                    self._decode()
            except Exception as error:  # the model failed: fail every request in flight
                for req in [*self._prefilling, *self._running]:
                    self._outbox.append((req, error))
                    self._finish(req, cancelled=False)
                self._prefilling, self._running, self._cache = [], [], None
                self._next_tokens, self._batch, self._history = [], None, None
            self._flush()
            if stop:
                return

    def _apply_cancels(self, ids: set[str]) -> None:
        if not ids:
            return
        with self._lock:
            waiting = [r for r in self._waiting if r.state.request_id in ids]
            for req in waiting:
                self._waiting.remove(req)
        for req in waiting:
            self._cancel_request(req)
        for req in [r for r in self._prefilling if r.state.request_id in ids]:
            self._prefilling.remove(req)
            self._cancel_request(req)
        leaving = [i for i, r in enumerate(self._running) if r.state.request_id in ids]
        for i in leaving:
            self._cancel_request(self._running[i])
        self._leave(leaving)

    def _cancel_request(self, req: _Request) -> None:
        result = req.state.cancel()
        self._outbox.append((req, _End(result)))
        self._finish(req, cancelled=True)

    def _finish(self, req: _Request, *, cancelled: bool) -> None:
        with self._lock:
            self._counts["tokens"] += self._new_tokens
            self._new_tokens = 0
            self._active.pop(req.state.request_id, None)
            self._counts["finished"] += 1
            self._counts["cancelled"] += int(cancelled)
        if req.state.finished:
            self.observer.on_finish(req.state.result())

    def _admit(self) -> None:
        """Move waiting requests to prefilling while the batch and the cache budget allow."""
        admitted: list[_Request] = []
        with self._lock:
            while self._waiting:
                ongoing = [*self._running, *self._prefilling]
                if len(ongoing) >= self.max_batch_size:
                    break
                head = self._waiting[0]
                budget = self.max_cached_tokens
                worst = max(r.state.reserved_tokens for r in [*ongoing, head])
                if ongoing and budget is not None and (len(ongoing) + 1) * worst > budget:
                    break  # first in, first served: wait for room rather than skip ahead
                self._waiting.popleft()
                head.cache = new_cache(self.model, self.kv_dtype)
                self._prefilling.append(head)
                admitted.append(head)
        now = time.perf_counter()
        for req in admitted:  # outside the lock: an observer may call stats()
            state = req.state
            queued = now - state.submitted_at
            self.observer.on_request_start(state.request_id, len(state.prompt_ids), queued)

    def _prefill(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens; fully prefilled requests join the batch."""
        budget, joining = self.prefill_chunk, []
        for req in list(self._prefilling):
            if budget <= 0:
                break
            state, P = req.state, len(req.state.prompt_ids)
            n = min(P - req.prefilled, budget)
            chunk = state.prompt_ids[req.prefilled : req.prefilled + n]
            x = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, n)
            assert req.cache is not None
            if self._prefill_step is not None and n > 1:
                assert isinstance(req.cache, BatchKVCache)
                start = torch.zeros(1, dtype=torch.long, device=self.device)
                logits = self._prefill_step(x, req.cache, start).float()  # (1, V)
            else:
                logits = forward_cached(self.model, x, req.cache, last_only=True)[:, -1].float()
            req.prefilled += n
            budget -= n
            with self._lock:
                self._counts["prompt_tokens"] += n
            if req.prefilled < P:
                continue
            self._prefilling.remove(req)
            V = self.model.vocab_size
            batch = SamplingBatch.from_params([state.params], V, self.device)
            history = (
                TokenHistory.from_ids([state.prompt_ids], [[]], V, self.device)
                if state.params.uses_penalties
                else None
            )
            tokens, logprobs = choose_tokens(
                logits, batch, history, [state.generator], [state.params.top_logprobs]
            )
            if self._emit(req, logits[0], tokens[0], logprobs[0]):
                joining.append(req)
        self._count_tokens()
        if joining:
            self._join(joining)

    def _emit(
        self, req: _Request, logits: torch.Tensor, token: int, logprob: TokenLogprob | None
    ) -> bool:
        """Record a sampled token for `req`; return True while the request goes on."""
        state = req.state
        if self.logits_hook is not None:
            self.logits_hook(state.request_id, len(state.output_ids), logits.detach().cpu())
        previous = state.last_token_at
        event = state.add_token(token, logprob)
        self._new_tokens += 1
        assert state.last_token_at is not None
        if previous is None:
            self.observer.on_first_token(state.request_id, state.last_token_at - state.submitted_at)
        else:
            self.observer.on_token(state.request_id, state.last_token_at - previous)
        self._outbox.append((req, event))
        if event.result is None:
            return True
        self._outbox.append((req, _End(event.result)))
        self._finish(req, cancelled=False)
        return False

    def _join(self, joining: list[_Request]) -> None:
        caches = [r.cache for r in joining if r.cache is not None]
        old_len = 0 if self._cache is None else self._cache.seq_len
        self._cache = concat_caches([c for c in [self._cache, *caches] if c is not None])
        S = self._cache.seq_len
        for req in self._running:
            req.pad += S - old_len
        for req in joining:
            req.pad, req.cache = S - len(req.state.prompt_ids), None
        self._running += joining
        self._next_tokens += [r.state.output_ids[-1] for r in joining]
        self._rebuild_sampling()

    def _count_tokens(self) -> None:
        if self._new_tokens:
            with self._lock:
                self._counts["tokens"] += self._new_tokens
                self._new_tokens = 0

    def _leave(self, rows: list[int]) -> None:
        """Drop rows of the decode batch and the left padding no remaining row needs."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        self._next_tokens = [self._next_tokens[i] for i in keep]
        if not keep or self._cache is None:
            self._running, self._next_tokens, self._cache = [], [], None
            self._batch = self._history = None
            return
        drop = min(r.pad for r in self._running)
        self._cache.select(keep, drop_left=drop)
        for req in self._running:
            req.pad -= drop
        self._rebuild_sampling()

    def _rebuild_sampling(self) -> None:
        states = [r.state for r in self._running]
        V = self.model.vocab_size
        self._batch = SamplingBatch.from_params([s.params for s in states], V, self.device)
        self._history = None
        if any(s.params.uses_penalties for s in states):
            self._history = TokenHistory.from_ids(
                [s.prompt_ids for s in states], [s.output_ids for s in states], V, self.device
            )

    def _decode(self) -> None:
        """One decode step for every running sequence."""
        if not self._running or self._cache is None or self._batch is None:
            return
        start = time.perf_counter()
        B, S = len(self._running), self._cache.seq_len
        x = torch.tensor(self._next_tokens, dtype=torch.long, device=self.device).view(B, 1)
        if self._step is not None:
            assert isinstance(self._cache, BatchKVCache)
            starts = torch.tensor([r.pad for r in self._running], device=self.device)  # (B,)
            logits = self._step(x, self._cache, starts).float()  # (B, V)
        else:
            positions = mask = None  # a recurrent state: each row's own, no padding
            if not self._recurrent:
                pads = torch.tensor([r.pad for r in self._running], device=self.device).view(B, 1)
                positions = S - pads  # (B, 1): each row's own token count
                mask = torch.arange(S + 1, device=self.device).view(1, -1) >= pads  # (B, S + 1)
            logits = forward_cached(self.model, x, self._cache, positions, mask)
            logits = logits[:, -1].float()  # (B, V)
        states = [r.state for r in self._running]
        tokens, logprobs = choose_tokens(
            logits,
            self._batch,
            self._history,
            [s.generator for s in states],
            [s.params.top_logprobs for s in states],
        )
        leaving = [
            i
            for i, req in enumerate(self._running)
            if not self._emit(req, logits[i], tokens[i], logprobs[i])
        ]
        self._next_tokens = tokens
        with self._lock:
            self._counts["steps"] += 1
            self._counts["tokens"] += self._new_tokens
            self._new_tokens = 0
        self._leave(leaving)
        self.observer.on_step(B, time.perf_counter() - start)

    def _flush(self) -> None:
        """Hand this iteration's events to their streams: one loop wake-up per event loop."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AsyncRequestStream, _Item]]] = {}
        for req, item in outbox:
            stream = req.stream
            if isinstance(stream, AsyncRequestStream):
                by_loop.setdefault(stream.loop, []).append((stream, item))
            else:
                stream._put(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for stream, _ in items:
                    self.cancel(stream.request_id)
