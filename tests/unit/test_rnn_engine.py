"""An rnn language model in the continuous-batching engine: its recurrent state is the batch's
cache (rows gathered and stacked as sequences leave and join), and every request decodes exactly
as it does alone, for LSTM and GRU cells.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator

import pytest
import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import ModelError
from shipyard.generate import Engine, EngineObserver, GenerationResult, SamplingParams, generate
from shipyard.generate.cache import BatchKVCache, concat_caches, forward_cached, new_cache
from shipyard.models import RNN, RNNConfig, build_model
from shipyard.models.protocol import (
    RecurrentState,
    context_limit,
    is_decoding_model,
    is_language_model,
    is_recurrent_language_model,
)

TOK = Tokenizer.byte()
WAIT_S = 30.0  # bound on every Event.wait, so a bug fails instead of hanging


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm(cell: str) -> RNN:
    torch.manual_seed(0)
    cfg = RNNConfig(cell=cell, n_layer=2, n_embd=16, hidden_size=24, block_size=8, head="lm")  # type: ignore[arg-type]
    model = build_model(cfg, vocab_size=TOK.vocab_size)
    assert isinstance(model, RNN)
    return model.eval()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, stop_on_eos=False)


def test_protocols_tell_the_models_apart() -> None:
    model = lm("lstm")
    assert is_recurrent_language_model(model) and is_decoding_model(model)
    assert not is_language_model(model)  # no KV cache, no context
    assert context_limit(model) is None
    assert isinstance(new_cache(model), RecurrentState)
    with pytest.raises(ModelError, match="cannot concat"):
        concat_caches([model.new_state(), BatchKVCache(2)])
    with pytest.raises(ModelError, match="its own state"):
        forward_cached(model, torch.ones(1, 2, dtype=torch.long), BatchKVCache(2))
    classifier = build_model(RNNConfig(head="sequence"), num_outputs=2, vocab_size=TOK.vocab_size)
    with pytest.raises(ModelError, match="new_state is for head 'lm'"):
        classifier.new_state()  # type: ignore[operator]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_rows_leave_and_join(cell: str) -> None:
    """concat stacks rows in order, select gathers them: a batched step of the joined state gives
    each row's logits and state of that row stepped alone."""
    model = lm(cell)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    with torch.no_grad():
        alone = [model.new_state() for _ in prompts]
        for state, ids in zip(alone, prompts, strict=True):
            model(torch.tensor([ids]), kv_cache=state)
        batch = RecurrentState.concat([RecurrentState(), *alone])  # an empty state is skipped
        assert isinstance(batch, type(alone[0])) and batch.batch_size == 3
        assert batch.seq_len == 5
        batch.select([2, 0])  # row 1 left; rows 2 and 0 go on, in that order
        step = torch.tensor([[3], [4]])
        batched = model(step, kv_cache=batch)[:, -1]  # (2, V)
        for row, (i, token) in enumerate([(2, 3), (0, 4)]):
            want = model(torch.tensor([[token]]), kv_cache=alone[i])[0, -1]
            torch.testing.assert_close(batched[row], want, rtol=1e-5, atol=1e-5)
            for got, ref in zip(batch._tensors(), alone[i]._tensors(), strict=True):
                torch.testing.assert_close(got[:, row], ref[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="at least one non-empty"):
        RecurrentState.concat([RecurrentState()])


class Steps(EngineObserver):
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def on_step(self, batch_size: int, step_s: float) -> None:
        self.batch_sizes.append(batch_size)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_batched_decoding_matches_each_request_alone(cell: str) -> None:
    """Rows join and leave at different steps, long prompts prefill in chunks, prompt +
    max_tokens runs past the training window; every request's tokens equal `generate` alone and
    every step's logits stay within 1e-4 of one full forward over prompt + output."""
    model = lm(cell)
    logits: dict[str, list[torch.Tensor]] = defaultdict(list)
    steps = Steps()
    engine = Engine(
        model,
        TOK,
        max_batch_size=3,
        prefill_chunk=5,
        observer=steps,
        logits_hook=lambda rid, i, row: logits[rid].append(row),
        start=False,
    )
    assert engine.max_context is None and engine.max_cached_tokens is None  # no limit, no budget
    cases = [("a", 12), ("Hello there", 6), ("The quick brown fox", 30), ("xy", 9), ("0123", 4)]
    streams = [
        engine.submit_sync(p, greedy(n), request_id=f"r{i}") for i, (p, n) in enumerate(cases)
    ]
    engine.start()
    results = [s.result() for s in streams]
    engine.close()
    assert max(steps.batch_sizes) == 3  # really batched, and capped
    for (prompt, n), result in zip(cases, results, strict=True):
        alone = generate(model, TOK, prompt, greedy(n))
        assert result.token_ids == alone.token_ids and result.text == alone.text
        ids = TOK.encode(prompt)
        with torch.no_grad():
            full = model(torch.tensor([ids + result.token_ids]))[0]  # (T, V), no state
        reference = full[len(ids) - 1 : len(ids) - 1 + n]
        assert (torch.stack(logits[result.request_id]) - reference).abs().max().item() < 1e-4
    stats = engine.stats()
    assert stats.requests_finished == stats.requests_total == len(cases)
    assert stats.generation_tokens_total == sum(n for _, n in cases)
    assert (stats.running, stats.waiting, stats.cached_slots) == (0, 0, 0)


def test_seeded_sampling_cancel_and_async_requests_match_alone() -> None:
    """Sampling parameters (seed, top-k/top-p, penalties) act per row; a cancelled row leaves
    the batch and the others go on unchanged."""
    model = lm("lstm")

    def params(i: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=5 + i % 4,
            seed=i,
            temperature=0.9,
            top_k=20 if i % 2 else None,
            top_p=0.9,
            frequency_penalty=0.5 if i % 3 == 0 else 0.0,
            stop_on_eos=False,
            logprobs=True,
        )

    parked, release = threading.Event(), threading.Event()

    def hook(request_id: str, index: int, row: torch.Tensor) -> None:
        if (request_id, index) == ("doomed", 1):
            parked.set()
            assert release.wait(WAIT_S)

    async def main() -> tuple[list[tuple[str, GenerationResult]], GenerationResult]:
        engine = Engine(model, TOK, max_batch_size=4, max_queue=16, logits_hook=hook)
        doomed = engine.submit_sync("never ends", greedy(500), request_id="doomed")

        async def one(i: int) -> tuple[str, GenerationResult]:
            async with await engine.submit(f"prompt {i}", params(i)) as events:
                text = "".join([e.text async for e in events])
                assert events.final is not None
                return text, events.final

        try:
            assert await asyncio.to_thread(parked.wait, WAIT_S)
            tasks = asyncio.gather(*(one(i) for i in range(8)))
            assert engine.cancel("doomed")
            release.set()
            return await tasks, await asyncio.to_thread(doomed.result)
        finally:
            engine.close()

    results, cancelled = asyncio.run(main())
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 2
    for i, (text, result) in enumerate(results):
        alone = generate(model, TOK, f"prompt {i}", params(i))
        assert result.token_ids == alone.token_ids and text == result.text == alone.text
        assert result.logprobs is not None and alone.logprobs is not None
        for got, want in zip(result.logprobs, alone.logprobs, strict=True):
            assert abs(got.logprob - want.logprob) < 1e-4
