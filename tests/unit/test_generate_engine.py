"""Continuous batching engine: batched numerics against each request alone, scheduling (a short
request overtakes a long one), bounded queue, cancellation, async API and shutdown.

Interleavings are made deterministic by a logits hook that blocks the engine thread on an Event
at a chosen token, never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import pytest
import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import EngineOverloaded, GenerationError
from shipyard.generate import (
    Engine,
    EngineObserver,
    GenerationResult,
    SamplingParams,
    generate,
)
from shipyard.generate.traced import TRACED_KERNEL
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.quantized import DISABLE_ENV

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
TOK = Tokenizer.byte()
pytestmark = pytest.mark.usefixtures("one_thread")
WAIT_S = 30.0  # generous bound on every Event.wait, so a bug fails instead of hanging


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY, TOK.vocab_size).eval()


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.finished: list[str] = []
        self.first_tokens: list[str] = []

    def on_first_token(self, request_id: str, time_to_first_token_s: float) -> None:
        assert time_to_first_token_s > 0
        self.first_tokens.append(request_id)

    def on_step(self, batch_size: int, step_s: float) -> None:
        self.batch_sizes.append(batch_size)

    def on_finish(self, result: GenerationResult) -> None:
        self.finished.append(result.request_id)


class Gate:
    """A logits hook that parks the engine thread when `request_id` reaches token `index`."""

    def __init__(self, request_id: str, index: int) -> None:
        self.request_id, self.index = request_id, index
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, request_id: str, index: int, logits: torch.Tensor) -> None:
        if (request_id, index) == (self.request_id, self.index):
            self.reached.set()
            assert self.release.wait(WAIT_S)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, stop_on_eos=False)


@pytest.mark.parametrize("step", ["traced", "eager"])
def test_batched_decoding_matches_each_request_alone(
    model: GPT, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows join (with left padding) and leave at different steps; a long prompt is prefilled
    in chunks; every step's logits stay within 1e-4 of the request run alone, whether the
    decode step runs traced (the CPU default) or eagerly."""
    if step == "eager":
        monkeypatch.setenv(DISABLE_ENV, TRACED_KERNEL)
    logits: dict[str, list[torch.Tensor]] = defaultdict(list)
    recorder = Recorder()
    engine = Engine(
        model,
        TOK,
        max_batch_size=4,
        prefill_chunk=8,
        observer=recorder,
        logits_hook=lambda rid, i, row: logits[rid].append(row),
        start=False,
    )
    cases = [
        ("a", 12),
        ("Hello there", 6),
        ("The quick brown fox jumps over", 9),
        ("xy", 15),
        ("0123456789", 4),
        ("late joiner", 7),
    ]
    streams = [
        engine.submit_sync(p, greedy(n), request_id=f"r{i}") for i, (p, n) in enumerate(cases)
    ]
    engine.start()
    results = [s.result() for s in streams]
    engine.close()
    assert engine.step_kind == step
    assert max(recorder.batch_sizes) == 4  # really batched, and capped
    for (prompt, n), result in zip(cases, results, strict=True):
        alone = generate(model, TOK, prompt, greedy(n))
        assert result.token_ids == alone.token_ids and result.text == alone.text
        ids = TOK.encode(prompt)
        with torch.no_grad():
            full = model(torch.tensor([ids + result.token_ids]))[0]  # (T, V), no cache
        reference = full[len(ids) - 1 : len(ids) - 1 + n]  # the predictions of each new token
        batched = torch.stack(logits[result.request_id])
        assert (batched - reference).abs().max().item() < 1e-4
    stats = engine.stats()
    assert stats.requests_finished == stats.requests_total == len(cases)
    assert stats.prompt_tokens_total == sum(len(TOK.encode(p)) for p, _ in cases)
    assert stats.generation_tokens_total == sum(n for _, n in cases)
    assert (stats.running, stats.waiting, stats.cached_slots) == (0, 0, 0)


def test_short_request_submitted_later_finishes_first(model: GPT) -> None:
    gate = Gate("long", 2)
    recorder = Recorder()
    with Engine(model, TOK, max_batch_size=4, logits_hook=gate, observer=recorder) as engine:
        long = engine.submit_sync("a long story", greedy(40), request_id="long")
        assert gate.reached.wait(WAIT_S)  # long is decoding, parked at its third token
        short = engine.submit_sync("hi", greedy(3), request_id="short")
        gate.release.set()
        assert short.result().completion_tokens == 3
        assert long.result().completion_tokens == 40
    assert recorder.finished == ["short", "long"]
    assert 2 in recorder.batch_sizes


def test_a_first_token_is_handed_out_before_the_next_decode_step(model: GPT) -> None:
    """The prefill's token reaches its stream at once, not after the decode step that follows
    in the same engine iteration (here parked: it would never come)."""
    parked = {2: threading.Event(), 3: threading.Event()}
    go = {2: threading.Event(), 3: threading.Event()}

    def gate(request_id: str, index: int, logits: torch.Tensor) -> None:
        if request_id == "long" and index in parked:
            parked[index].set()
            assert go[index].wait(WAIT_S)

    with Engine(model, TOK, max_batch_size=4, logits_hook=gate) as engine:
        long = engine.submit_sync("a long story", greedy(10), request_id="long")
        assert parked[2].wait(WAIT_S)  # decoding; the short request arrives meanwhile
        short = engine.submit_sync("hi", greedy(3), request_id="short")
        go[2].set()
        assert parked[3].wait(WAIT_S)  # next iteration: short prefilled, then this decode step
        first: list[object] = []
        reader = threading.Thread(target=lambda: first.append(next(iter(short))), daemon=True)
        reader.start()
        reader.join(timeout=10)
        assert first, "the first token waited for the decode step"
        go[3].set()
        assert short.result().completion_tokens == 3
        assert long.result().completion_tokens == 10


def test_full_queue_raises_engine_overloaded(model: GPT) -> None:
    gate = Gate("a", 1)
    with Engine(model, TOK, max_batch_size=1, max_queue=1, logits_hook=gate) as engine:
        a = engine.submit_sync("a", greedy(10), request_id="a")
        b = engine.submit_sync("b", greedy(2))
        with pytest.raises(EngineOverloaded, match="full"):
            engine.submit_sync("c", greedy(2))
        gate.release.set()
        assert a.result().finish_reason == b.result().finish_reason == "length"
        assert engine.generate("c", greedy(2)).completion_tokens == 2  # room again


def test_bad_requests_are_generation_errors(model: GPT) -> None:
    with Engine(model, TOK, max_cached_tokens=40, start=False) as engine:
        with pytest.raises(GenerationError, match=r"prompt \(60 tokens\).*context of 64"):
            engine.submit_sync("a" * 60, greedy(5))
        with pytest.raises(GenerationError, match="max_cached_tokens"):
            engine.submit_sync("a" * 30, greedy(20))
        engine.submit_sync("a", greedy(2), request_id="x")
        with pytest.raises(GenerationError, match="already in use"):
            engine.submit_sync("a", greedy(2), request_id="x")


def test_cancel_frees_the_slot_for_a_waiting_request(model: GPT) -> None:
    gate = Gate("a", 1)
    with Engine(model, TOK, max_batch_size=1, logits_hook=gate) as engine:
        a = engine.submit_sync("a", greedy(50), request_id="a")
        b = engine.submit_sync("b", greedy(3), request_id="b")
        c = engine.submit_sync("c", greedy(3), request_id="c")
        assert gate.reached.wait(WAIT_S)
        assert engine.cancel("c")  # still waiting: leaves without a token
        assert engine.cancel("a")  # running: leaves at the next iteration
        gate.release.set()
        cancelled = a.result()
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 2
        assert [e.token_id for e in a] == []  # the stream is over
        assert b.result().finish_reason == "length"
        assert c.result().finish_reason == "cancelled" and c.result().completion_tokens == 0
        assert not engine.cancel("a")  # already gone
        assert engine.stats().requests_cancelled == 2


def test_async_concurrent_requests_match_seeded_generation_alone(model: GPT) -> None:
    """Same seed, same prompt, same text, whatever else shares the batch."""

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=6 + i % 5, seed=i, stop_on_eos=False, logprobs=True)

    async def main() -> list[tuple[str, GenerationResult]]:
        engine = Engine(model, TOK, max_batch_size=4, max_queue=16)

        async def one(i: int) -> tuple[str, GenerationResult]:
            async with await engine.submit(f"prompt {i}", params(i)) as events:
                text = "".join([e.text async for e in events])
                assert events.final is not None
                return text, events.final

        try:
            return await asyncio.gather(*(one(i) for i in range(12)))
        finally:
            engine.close()

    for i, (text, result) in enumerate(asyncio.run(main())):
        alone = generate(model, TOK, f"prompt {i}", params(i))
        assert result.token_ids == alone.token_ids and text == result.text == alone.text
        assert result.logprobs is not None and alone.logprobs is not None
        for got, want in zip(result.logprobs, alone.logprobs, strict=True):
            assert abs(got.logprob - want.logprob) < 1e-4


def test_leaving_an_async_stream_early_cancels_it(model: GPT) -> None:
    async def main() -> Engine:
        engine = Engine(model, TOK)
        async with await engine.submit("abc", greedy(50)) as events:
            async for _ in events:
                break  # the client went away after one token
        engine.close(drain=True)  # the cancel was requested before: it finishes at once
        return engine

    stats = asyncio.run(main()).stats()
    assert stats.requests_cancelled == 1 and stats.generation_tokens_total < 50


def test_close_cancels_accepted_requests_and_refuses_new_ones(model: GPT) -> None:
    engine = Engine(model, TOK, start=False)
    waiting = engine.submit_sync("a", greedy(5))
    engine.close()
    assert waiting.result().finish_reason == "cancelled"
    with pytest.raises(EngineOverloaded, match="shutting down"):
        engine.submit_sync("b", greedy(5))


def test_model_failure_reaches_the_caller(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = GPT(TINY, TOK.vocab_size).eval()

    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("device on fire")

    monkeypatch.setattr(broken, "forward", fail)
    with Engine(broken, TOK) as engine:
        events = engine.submit_sync("a", greedy(3))
        with pytest.raises(RuntimeError, match="on fire"):
            next(events)
        assert list(events) == []  # the stream is over, it does not hang
        assert engine.stats().requests_finished == 1
