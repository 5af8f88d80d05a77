"""The traced decode step (`shipyard.generate.traced`): the same tokens as the eager step on
tiny GPT and Llama models (fp32 and int8 weights, greedy and seeded sampling, sliding window,
phi3's fused projections), a rebuilt trace when weights change, and the eager fallback when
$SHIPYARD_DISABLE_KERNELS=traced-step turns it off or a model cannot be traced exactly.

Greedy tokens are compared exactly; log-probabilities to 1e-4 (float32 rounding: the traced
step attends the whole fixed-size cache and runs fp32 layers through F.linear, not oneDNN).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tests.decode_support import tiny_llama

from shipyard.data.tokenization import Tokenizer
from shipyard.generate import Engine, GenerationResult, SamplingParams, generate
from shipyard.generate import cache as cache_module
from shipyard.generate.cache import BatchKVCache
from shipyard.generate.packed import prepare_decoding
from shipyard.generate.traced import (
    TRACE_AFTER_TOKENS,
    TRACED_KERNEL,
    has_traced_step,
    traced_prefill,
    traced_step,
    traced_step_unsupported,
)
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.llama import Llama, RopeParameters
from shipyard.models.quantized import DISABLE_ENV

TOK = Tokenizer.byte()
pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0, stop_on_eos=False)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), TOK.vocab_size).eval()


def eager_ids(
    model: GPT | Llama, params: SamplingParams, monkeypatch: pytest.MonkeyPatch, **kw: str
) -> list[int]:
    with monkeypatch.context() as m:
        m.setenv(DISABLE_ENV, TRACED_KERNEL)
        return generate(model, TOK, "def f(x):", params, **kw).token_ids


def pretrace(model: GPT | Llama) -> None:
    """Trace up front (start-up), so the next request runs the traced step."""
    assert traced_step(model) is not None


@pytest.mark.parametrize("build", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_traced_greedy_tokens_equal_eager(
    build: object, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build()  # type: ignore[operator]
    expected = eager_ids(model, GREEDY, monkeypatch, weights=weights)
    assert not traced_step_unsupported(model, None)
    assert not has_traced_step(model)  # the eager run traced nothing
    pretrace(model)  # after the eager run: its `weights` quantized the model
    result = generate(model, TOK, "def f(x):", GREEDY, weights=weights)
    assert has_traced_step(model)
    assert result.token_ids == expected
    assert len(result.token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_type": "mistral", "sliding_window": 6},  # the window moves during decoding
        {"model_type": "phi3", "partial_rotary_factor": 0.5},  # fused qkv, partial RoPE
        {"model_type": "qwen3"},  # q/k norms
    ],
    ids=["sliding-window", "phi3", "qwen3"],
)
def test_traced_llama_variants_equal_eager(
    overrides: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama(**overrides)
    expected = eager_ids(model, GREEDY, monkeypatch, weights="fp32")
    pretrace(model)
    assert generate(model, TOK, "def f(x):", GREEDY, weights="fp32").token_ids == expected
    assert has_traced_step(model)


def test_traced_sampling_and_logprobs_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt()
    params = SamplingParams(
        max_tokens=16, temperature=0.9, top_k=20, seed=3, stop_on_eos=False, logprobs=2
    )
    with monkeypatch.context() as m:
        m.setenv(DISABLE_ENV, TRACED_KERNEL)
        eager = generate(model, TOK, "abc", params, weights="fp32")
    pretrace(model)
    traced = generate(model, TOK, "abc", params, weights="fp32")
    assert traced.token_ids == eager.token_ids
    assert eager.logprobs is not None and traced.logprobs is not None
    for a, b in zip(traced.logprobs, eager.logprobs, strict=True):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_trace_is_reused_and_rebuilt_when_weights_change(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_gpt()
    long = SamplingParams(max_tokens=60, temperature=0, stop_on_eos=False)
    with caplog.at_level(logging.INFO, logger="shipyard.generate"):
        for _ in range(TRACE_AFTER_TOKENS // 60):  # too few tokens yet to pay for a trace
            generate(model, TOK, "abc", long, weights="fp32")
        assert not has_traced_step(model)
        generate(model, TOK, "abc", long, weights="fp32")  # now they pay: traced
        generate(model, TOK, "xyz", long, weights="fp32")  # reused
    assert has_traced_step(model)
    traced_lines = [r.getMessage() for r in caplog.records if "traced GPT" in r.getMessage()]
    kinds = sorted(line.split(":")[0] for line in traced_lines)
    assert kinds == ["decode step", "prefill step"]  # each traced once
    first = traced_step(model)
    assert first is not None
    assert traced_step(model) is first  # nothing changed: no new trace
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # an optimizer step, say
    assert traced_step(model) is not first
    expected = eager_ids(model, GREEDY, monkeypatch, weights="fp32")
    assert generate(model, TOK, "def f(x):", GREEDY, weights="fp32").token_ids == expected


def test_off_switch_runs_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    monkeypatch.setenv(DISABLE_ENV, f"onednn, {TRACED_KERNEL}")
    assert TRACED_KERNEL in traced_step_unsupported(model, None)
    reference = copy.deepcopy(model)
    long = SamplingParams(max_tokens=120, temperature=0, stop_on_eos=False)
    calls = -(-TRACE_AFTER_TOKENS // 120)  # enough tokens to pay for a trace
    results = [generate(model, TOK, "ab", long, weights="fp32") for _ in range(calls)]
    assert not has_traced_step(model)
    monkeypatch.delenv(DISABLE_ENV)
    expected = [generate(reference, TOK, "ab", long).token_ids for _ in range(calls)]
    assert has_traced_step(reference)  # the switch is all that kept `model` eager
    assert [r.token_ids for r in results] == expected


def test_untraceable_models_fall_back() -> None:
    dynamic = tiny_llama(rope=RopeParameters(rope_type="dynamic", factor=2.0))
    assert "dynamic" in traced_step_unsupported(dynamic, None)
    assert "autocast" in traced_step_unsupported(tiny_gpt(), torch.bfloat16)
    params = SamplingParams(max_tokens=4, temperature=0, stop_on_eos=False)
    assert len(generate(dynamic, TOK, "abc", params).token_ids) == 4


class _RefusesTracing(GPT):
    """A model whose forward cannot be traced (as an odd op would make it), counting attempts."""

    attempts = 0

    def forward(self, idx: torch.Tensor, **kw: object) -> torch.Tensor:  # type: ignore[override]
        if torch.jit.is_tracing():
            type(self).attempts += 1
            raise RuntimeError("this op cannot be traced")
        return super().forward(idx, **kw)  # type: ignore[arg-type]


def test_a_failed_trace_decodes_eagerly_and_is_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = _RefusesTracing(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), TOK.vocab_size
    ).eval()
    reference = tiny_gpt()
    with caplog.at_level(logging.WARNING, logger="shipyard.generate"):
        assert traced_step(model) is None
        assert traced_step(model) is None  # the same weights: no second attempt
    assert _RefusesTracing.attempts == 1
    assert sum("tracing failed" in r.getMessage() for r in caplog.records) == 1
    long = SamplingParams(max_tokens=40, temperature=0, stop_on_eos=False)
    for _ in range(-(-TRACE_AFTER_TOKENS // 40)):  # enough requests to want a trace
        assert (
            generate(model, TOK, "ab", long).token_ids
            == generate(reference, TOK, "ab", long).token_ids
        )
    assert _RefusesTracing.attempts == 1 and not has_traced_step(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # new weights (version bump): worth one more try
    assert traced_step(model) is None and _RefusesTracing.attempts == 2


@pytest.mark.parametrize(
    ("build", "weights"),
    [
        (tiny_gpt, "fp32"),
        (tiny_gpt, "int8"),
        (lambda: tiny_llama(model_type="mistral", sliding_window=6), "fp32"),
        (lambda: tiny_llama(model_type="phi3", partial_rotary_factor=0.5), "int8"),
    ],
    ids=["gpt-fp32", "gpt-int8", "mistral-window", "phi3-int8"],
)
def test_engine_traced_step_equals_its_eager_step(
    build: object, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batching engine's traced step: rows with different prompt lengths (left padding),
    joining and leaving at different steps, a cache that grows past its capacity, greedy and
    seeded sampling: the same tokens as the engine's eager step, log-probabilities within 1e-4."""
    cases = [
        ("a", greedy_params(40)),
        ("Hello there, world", SamplingParams(max_tokens=9, temperature=0.8, seed=5, logprobs=1)),
        ("The quick brown fox jumps over", greedy_params(25)),
        ("xy", greedy_params(3)),
        ("late joiner", SamplingParams(max_tokens=30, top_k=5, seed=2, stop_on_eos=False)),
    ]

    grown = []
    grow = BatchKVCache._grow

    def counting_grow(self: BatchKVCache, needed: int, *, zero: bool) -> None:
        grown.append(zero)
        grow(self, needed, zero=zero)

    def run(kind: str) -> list[GenerationResult]:
        model = build()  # type: ignore[operator]
        with monkeypatch.context() as m:
            m.setattr(cache_module, "_ALIGN", 4)  # little spare capacity: the cache grows often
            m.setattr(BatchKVCache, "_grow", counting_grow)
            if kind == "eager":
                m.setenv(DISABLE_ENV, TRACED_KERNEL)
            engine = Engine(model, TOK, max_batch_size=3, weights=weights, start=False)
            streams = [
                engine.submit_sync(p, params, request_id=f"r{i}")
                for i, (p, params) in enumerate(cases)
            ]
            engine.start()
            results = [s.result() for s in streams]
            engine.close()
        assert engine.step_kind == kind
        return results

    traced = run("traced")
    assert True in grown  # the traced step's `reserve` grew the batch's cache
    eager = run("eager")
    for a, b in zip(traced, eager, strict=True):
        assert a.token_ids == b.token_ids
        if b.logprobs is not None:
            assert a.logprobs is not None
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def greedy_params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, stop_on_eos=False)


def test_reserve_zeroes_the_slots_an_eager_step_left_uninitialised() -> None:
    """The traced step attends every slot up to the capacity (masked); an eager append grows the
    cache into uninitialised memory, which `reserve` must clear (0 x NaN is NaN)."""
    cache = BatchKVCache(1)
    cache.append(0, torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    keys, values = cache.storage
    keys[:, :, :, 3:] = float("nan")  # what uninitialised memory may hold
    values[:, :, :, 3:] = float("nan")
    cache.reserve(4)
    keys, values = cache.storage
    assert cache.seq_len == 3 and keys.size(3) >= 4
    assert torch.equal(keys[:, :, :, 3:], torch.zeros_like(keys[:, :, :, 3:]))
    assert torch.equal(values[:, :, :, :3], torch.ones(1, 2, 1, 3, 4))
    cache.reserve(keys.size(3) + 1)  # growing: copies the cached slots, zeroes the rest
    grown, _ = cache.storage
    assert grown.size(3) > keys.size(3)
    assert torch.equal(grown[:, :, :, :3], torch.ones(1, 2, 1, 3, 4))
    assert not grown[:, :, :, 3:].any()
    cache.advance(1)
    assert cache.seq_len == 4 and cache.keys[0] is not None and cache.keys[0].size(2) == 4


class _OddTracing(GPT):
    """A model whose forward raises something other than RuntimeError under the tracer."""

    def forward(self, idx: torch.Tensor, **kw: object) -> torch.Tensor:  # type: ignore[override]
        if torch.jit.is_tracing():
            raise TypeError("an argument the tracer cannot take")
        return super().forward(idx, **kw)  # type: ignore[arg-type]


def test_the_engine_decodes_eagerly_when_tracing_fails(caplog: pytest.LogCaptureFixture) -> None:
    """Any error while tracing falls back to the eager step: the engine thread goes on serving."""
    torch.manual_seed(0)
    model = _OddTracing(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), TOK.vocab_size)
    reference = tiny_gpt()
    with (
        caplog.at_level(logging.WARNING, logger="shipyard.generate"),
        Engine(model.eval(), TOK) as engine,
    ):
        result = engine.generate("def f(x):", GREEDY)
    assert engine.step_kind == "eager"
    assert any("TypeError" in r.getMessage() for r in caplog.records)
    assert result.token_ids == generate(reference, TOK, "def f(x):", GREEDY).token_ids


@pytest.mark.parametrize(
    "build",
    [tiny_gpt, tiny_llama, lambda: tiny_llama(model_type="mistral", sliding_window=6)],
    ids=["gpt", "llama", "mistral-window"],
)
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_traced_prefill_equals_the_eager_forward(build: object, weights: str) -> None:
    """A prompt in two chunks, then a decode step: logits within float32 rounding of the eager
    forward and the same cached keys/values (a window shorter than the prompt, too)."""
    assert callable(build)
    model = build()
    prepare_decoding(model, weights)
    prefill, step = traced_prefill(model), traced_step(model)
    assert prefill is not None and step is not None
    eager, traced = BatchKVCache(model.n_layer), BatchKVCache(model.n_layer)
    start = torch.zeros(1, dtype=torch.long)
    torch.manual_seed(3)
    with torch.inference_mode():
        for chunk in (torch.randint(0, 256, (1, 11)), torch.randint(0, 256, (1, 5))):
            want = model(chunk, kv_cache=eager, last_only=True)[:, -1]
            torch.testing.assert_close(prefill(chunk, traced, start), want, rtol=1e-5, atol=1e-5)
        token = torch.randint(0, 256, (1, 1))
        want = model(token, kv_cache=eager)[:, -1]
        torch.testing.assert_close(step(token, traced, start), want, rtol=1e-5, atol=1e-5)
    assert traced.seq_len == eager.seq_len == 17
    for got, ref in zip(traced.storage, eager.storage, strict=True):
        torch.testing.assert_close(got[:, :, :, :17], ref[:, :, :, :17], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
def test_last_only_logits_are_the_last_positions(build: object) -> None:
    assert callable(build)
    model = build()
    idx = torch.randint(0, 256, (2, 7))
    with torch.inference_mode():
        full = model(idx, kv_cache=BatchKVCache(model.n_layer))
        last = model(idx, kv_cache=BatchKVCache(model.n_layer), last_only=True)
    assert last.shape == (2, 1, full.size(-1))
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
