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
from collections.abc import Iterator

import pytest
import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.generate import SamplingParams, generate
from shipyard.generate.traced import (
    TRACE_AFTER_TOKENS,
    TRACED_KERNEL,
    capacity_for,
    traced_capacities,
    traced_step,
    traced_step_unsupported,
)
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.llama import Llama, LlamaConfig, RopeParameters
from shipyard.models.quantized import DISABLE_ENV

TOK = Tokenizer.byte()
GREEDY = SamplingParams(max_tokens=24, temperature=0, stop_on_eos=False)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), TOK.vocab_size).eval()


def tiny_llama(**overrides: object) -> Llama:
    torch.manual_seed(0)
    fields: dict[str, object] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "vocab_size": TOK.vocab_size,
    }
    fields.update(overrides)
    return Llama(LlamaConfig.model_validate(fields)).eval()


def eager_ids(
    model: GPT | Llama, params: SamplingParams, monkeypatch: pytest.MonkeyPatch, **kw: str
) -> list[int]:
    with monkeypatch.context() as m:
        m.setenv(DISABLE_ENV, TRACED_KERNEL)
        return generate(model, TOK, "def f(x):", params, **kw).token_ids


def pretrace(model: GPT | Llama, prompt: str = "def f(x):", max_tokens: int = 24) -> None:
    """Trace up front (start-up), so the next request of this size runs the traced step."""
    capacity = capacity_for(len(TOK.encode_prompt(prompt)) + max_tokens, model.max_context)
    assert traced_step(model, capacity) is not None


@pytest.mark.parametrize("build", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_traced_greedy_tokens_equal_eager(
    build: object, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build()  # type: ignore[operator]
    expected = eager_ids(model, GREEDY, monkeypatch, weights=weights)
    assert not traced_step_unsupported(model, None)
    assert traced_capacities(model) == []  # the eager run traced nothing
    pretrace(model)  # after the eager run: its `weights` quantized the model
    result = generate(model, TOK, "def f(x):", GREEDY, weights=weights)
    assert traced_capacities(model) == [64 if isinstance(model, GPT) else 128]  # max_context
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
    assert traced_capacities(model) == [128]


def test_traced_sampling_and_logprobs_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt()
    params = SamplingParams(
        max_tokens=16, temperature=0.9, top_k=20, seed=3, stop_on_eos=False, logprobs=2
    )
    with monkeypatch.context() as m:
        m.setenv(DISABLE_ENV, TRACED_KERNEL)
        eager = generate(model, TOK, "abc", params, weights="fp32")
    pretrace(model, "abc", params.max_tokens)
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
        assert traced_capacities(model) == []
        generate(model, TOK, "abc", long, weights="fp32")  # now they pay: traced
        generate(model, TOK, "xyz", long, weights="fp32")  # reused
    assert traced_capacities(model) == [64]
    traced_lines = [r.getMessage() for r in caplog.records if "traced GPT" in r.getMessage()]
    assert len(traced_lines) == 1  # traced once
    assert "for 64 cache slots in" in traced_lines[0]
    capacity = capacity_for(3 + GREEDY.max_tokens, model.max_context)
    first = traced_step(model, capacity)
    assert first is not None
    assert traced_step(model, capacity) is first  # nothing changed: no new trace
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # an optimizer step, say
    assert traced_step(model, capacity) is not first
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
    assert traced_capacities(model) == []
    monkeypatch.delenv(DISABLE_ENV)
    expected = [generate(reference, TOK, "ab", long).token_ids for _ in range(calls)]
    assert traced_capacities(reference) == [128]  # the switch is all that kept `model` eager
    assert [r.token_ids for r in results] == expected


def test_untraceable_models_fall_back() -> None:
    dynamic = tiny_llama(rope=RopeParameters(rope_type="dynamic", factor=2.0))
    assert "dynamic" in traced_step_unsupported(dynamic, None)
    assert "autocast" in traced_step_unsupported(tiny_gpt(), torch.bfloat16)
    params = SamplingParams(max_tokens=4, temperature=0, stop_on_eos=False)
    assert len(generate(dynamic, TOK, "abc", params).token_ids) == 4


def test_capacity_buckets() -> None:
    assert capacity_for(10, 4096) == 256
    assert capacity_for(256, 4096) == 256
    assert capacity_for(257, 4096) == 512
    assert capacity_for(10, 64) == 64  # never past the context
    assert capacity_for(600, 600) == 600


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
        assert traced_step(model, 64) is None
        assert traced_step(model, 64) is None  # the same weights: no second attempt
    assert _RefusesTracing.attempts == 1
    assert sum("tracing failed" in r.getMessage() for r in caplog.records) == 1
    long = SamplingParams(max_tokens=40, temperature=0, stop_on_eos=False)
    for _ in range(-(-TRACE_AFTER_TOKENS // 40)):  # enough requests to want a trace
        assert (
            generate(model, TOK, "ab", long).token_ids
            == generate(reference, TOK, "ab", long).token_ids
        )
    assert _RefusesTracing.attempts == 1 and traced_capacities(model) == []
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # new weights (version bump): worth one more try
    assert traced_step(model, 64) is None and _RefusesTracing.attempts == 2
