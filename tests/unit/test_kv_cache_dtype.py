"""What the KV cache stores (`kv_cache`: auto, fp32, fp16; `kv_cache_dtype`): float16 storage
in `BatchKVCache` and the traced steps, saturated at float16's range, read by the native
attention kernel as it is and by SDPA converted back; "auto" picks float16 only for int8
weights on the native kernels.

Tolerances: a float16 cache rounds every key and value to 11 significant bits, so the logits of
a tiny random model move by ~1e-3 at most (asserted below); greedy tokens are compared on
models with a clear greedy choice (a peaked GPT), where that rounding cannot flip them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.decode_support import peaked_gpt, tiny_llama

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import GenerationError, ModelError
from shipyard.generate import Engine, SamplingParams, generate
from shipyard.generate.cache import BatchKVCache, cache_values, new_cache
from shipyard.generate.packed import kv_cache_dtype, prepare_decoding
from shipyard.generate.traced import TRACED_KERNEL, traced_prefill, traced_step
from shipyard.kernels import native
from shipyard.models.quantized import DISABLE_ENV

TOK = Tokenizer.byte()
pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=20, temperature=0, stop_on_eos=False, logprobs=True)


def test_cache_values_convert_and_saturate_into_float16() -> None:
    x = torch.tensor([1.0, -2.5, 1e6, -1e9, 65504.0, float("nan")])
    stored = cache_values(x, torch.float16)
    assert stored.dtype == torch.float16
    assert stored[:2].tolist() == [1.0, -2.5]
    assert stored[2:5].tolist() == [65504.0, -65504.0, 65504.0]  # finite, not inf
    assert stored[5].isnan()
    assert cache_values(x, torch.float32) is x  # the cache's own dtype: untouched


def test_batch_cache_stores_float16_through_append_concat_and_select() -> None:
    cache = BatchKVCache(2, torch.float16)
    k = torch.randn(1, 2, 3, 8)
    got_k, got_v = cache.append(0, k, k * 2)
    cache.append(1, k, k * 2)
    assert got_k.dtype == got_v.dtype == torch.float16
    assert torch.equal(got_k, k.half())
    other = BatchKVCache(2, torch.float16)
    other.append(0, k[:, :, :2], k[:, :, :2])
    other.append(1, k[:, :, :2], k[:, :, :2])
    both = BatchKVCache.concat([cache, other])
    assert both.dtype == torch.float16 and both.storage[0].dtype == torch.float16
    both.select([1], drop_left=1)
    assert both.storage[0].dtype == torch.float16 and both.seq_len == 2
    assert new_cache(peaked_gpt(), torch.float16).dtype == torch.float16  # type: ignore[union-attr]
    assert BatchKVCache(2).append(0, k, k)[0].dtype == torch.float32  # default: the keys' own


def test_auto_picks_float16_only_for_int8_weights_on_the_native_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fp32 = peaked_gpt()
    prepare_decoding(fp32, "fp32")
    assert kv_cache_dtype(fp32) is None  # exact: the model's own dtype
    assert kv_cache_dtype(fp32, "fp16") is torch.float16
    assert kv_cache_dtype(fp32, "fp32") is torch.float32
    int8 = peaked_gpt()
    prepare_decoding(int8, "int8")
    assert kv_cache_dtype(int8) is (torch.float16 if native.load() else None)
    monkeypatch.setenv(DISABLE_ENV, native.NATIVE_KERNEL)
    other = peaked_gpt()
    prepare_decoding(other, "int8")  # int8 GEMM or dequantized: no float16 attention kernel
    assert kv_cache_dtype(other) is None
    with pytest.raises(GenerationError, match="unknown KV cache 'int8'; choose one of auto"):
        kv_cache_dtype(fp32, "int8")


@pytest.mark.parametrize("build", [peaked_gpt, tiny_llama])
@pytest.mark.parametrize("traced", [True, False])
def test_generation_over_a_float16_cache_stays_close_to_float32(
    build: object, traced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert callable(build)
    if not traced:
        monkeypatch.setenv(DISABLE_ENV, TRACED_KERNEL)
    full = generate(build(), TOK, "def main():", GREEDY, kv_cache="fp32")
    half = generate(build(), TOK, "def main():", GREEDY, kv_cache="fp16")
    assert full.logprobs is not None and half.logprobs is not None
    gap = max(abs(a.logprob - b.logprob) for a, b in zip(full.logprobs, half.logprobs, strict=True))
    assert 0 < gap < 5e-3  # rounded (not the same numbers), but only just
    if build is peaked_gpt:
        assert full.token_ids == half.token_ids


def test_without_native_kernels_a_float16_cache_is_read_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = generate(peaked_gpt(), TOK, "x = [", GREEDY, kv_cache="fp16")
    monkeypatch.setenv(DISABLE_ENV, native.NATIVE_KERNEL)
    slow = generate(peaked_gpt(), TOK, "x = [", GREEDY, kv_cache="fp16")
    assert fast.token_ids == slow.token_ids


def test_traced_steps_are_kept_per_cache_dtype_and_refuse_another() -> None:
    model = peaked_gpt()
    prepare_decoding(model)
    full, half = traced_step(model), traced_step(model, torch.float16)
    assert full is not None and half is not None and full is not half
    assert (full.kv_dtype, half.kv_dtype) == (torch.float32, torch.float16)
    assert traced_step(model, torch.float16) is half  # reused
    prefill = traced_prefill(model, torch.float16)
    assert prefill is not None and prefill.kv_dtype == torch.float16
    with torch.inference_mode():
        cache = BatchKVCache(model.n_layer, torch.float16)
        start = torch.zeros(1, dtype=torch.long)
        prefill(torch.tensor([[1, 2, 3]]), cache, start)
        assert cache.storage[0].dtype == torch.float16 and cache.seq_len == 3
        half(torch.tensor([[4]]), cache, start)
        assert cache.seq_len == 4
        with pytest.raises(ModelError, match=r"traced for a torch\.float32 KV cache"):
            full(torch.tensor([[4]]), cache, start)


def test_engine_reports_and_uses_its_cache_dtype() -> None:
    model = peaked_gpt()
    reference = generate(copy.deepcopy(model), TOK, "def f(", GREEDY, kv_cache="fp16")
    with Engine(model, TOK, max_batch_size=4, kv_cache="fp16") as engine:
        assert "KV cache float16" in engine.kernels
        results = [engine.submit_sync(p, GREEDY) for p in ("def f(", "import ", "class A")]
        first = results[0].result()
    assert first.token_ids == reference.token_ids
    with Engine(peaked_gpt(), TOK, max_batch_size=2, start=False) as engine:
        assert "KV cache" not in engine.kernels  # fp32 weights: the model's own dtype
    with pytest.raises(GenerationError, match="unknown KV cache"):
        Engine(peaked_gpt(), TOK, kv_cache="bf16", start=False)
