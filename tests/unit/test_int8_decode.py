"""Int8 and fp32 decode kernels: numerics against the fp32 reference, fallbacks when a kernel is
forced off ($SHIPYARD_DISABLE_KERNELS), and the engine's guarantees on the int8 path.

Tolerances: the int8 GEMM quantizes activations per call to 7 bits (reduce_range) on top of the
int8 weights, so a layer's output is within 3% (relative L2) of the same int8 weights in fp32;
whole-model logits within 5% relative L2. "dequantized" equals per-call dequantization to fp32
rounding (1e-5). The native kernel quantizes each row's activations to 8 bits (its exact
numerics: tests/unit/test_native_kernels.py) up to its row limit, past which it hands the rows
to the int8 GEMM.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tests.decode_support import tiny_llama
from torch import nn

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import EngineOverloaded, GenerationError, ModelError
from shipyard.generate import Engine, SamplingParams, generate
from shipyard.generate.packed import PackedLinear, prepare_decoding
from shipyard.kernels import native
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.llama import Llama
from shipyard.models.quantized import Int8Linear, int8_gemm_available

TOK = Tokenizer.byte()
pytestmark = pytest.mark.usefixtures("one_thread")
needs_gemm = pytest.mark.skipif(not int8_gemm_available(), reason="no x86 int8 GEMM here")


def expected_int8_kernel() -> str:
    """What `prepare_decoding` picks for int8 layers on this machine."""
    if native.load():
        return "native"
    return "int8-gemm" if int8_gemm_available() else "dequantized"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), TOK.vocab_size).eval()


def int8_layer() -> Int8Linear:
    torch.manual_seed(1)
    return Int8Linear.from_linear(nn.Linear(64, 48)).eval()


def test_cached_dequantized_kernel_equals_per_call_dequantization() -> None:
    layer, x = int8_layer(), torch.randn(3, 5, 64)
    with torch.inference_mode():
        reference = layer(x)  # default kernel: dequantize per call
        layer.set_kernel("dequantized")
        assert torch.allclose(layer(x), reference, atol=1e-5)


@needs_gemm
def test_int8_gemm_kernel_is_close_to_the_int8_weights_in_fp32() -> None:
    layer, x = int8_layer(), torch.randn(3, 5, 64)
    with torch.inference_mode():
        reference = layer(x)
        layer.set_kernel("int8-gemm")
        out = layer(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    assert rel_err(out, reference) < 0.03
    layer.train()  # training always takes the plain fp32 path, with gradients
    y = layer(x.requires_grad_())
    assert torch.allclose(y, reference, atol=1e-5)
    y.sum().backward()


def test_unknown_or_disabled_kernel_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = int8_layer()
    with pytest.raises(ModelError, match=r"unknown int8 kernel 'fast'.*dequantized"):
        layer.set_kernel("fast")
    monkeypatch.setenv("SHIPYARD_DISABLE_KERNELS", "int8-gemm")
    with pytest.raises(ModelError, match=r"int8-gemm is not available.*'dequantized'"):
        layer.set_kernel("int8-gemm")


def test_bad_decode_weights_is_a_generation_error() -> None:
    with pytest.raises(GenerationError, match=r"unknown decode weights 'int4'.*auto, fp32, int8"):
        prepare_decoding(tiny_gpt(), "int4")


def test_int8_decode_weights_off_cpu_is_a_generation_error() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8), TOK.vocab_size)
    with pytest.raises(GenerationError) as err:
        prepare_decoding(model, "int8")
    assert str(err.value) == (
        "decode weights 'int8' run on CPU only; the model is on meta: use auto or fp32"
    )
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # nothing swapped
    assert "fp32 linear(s): F.linear" in prepare_decoding(model, "auto")  # auto: no packing


def test_preparing_twice_reports_the_same_and_keeps_the_int8_cache() -> None:
    model, idx = tiny_gpt(), torch.randint(0, TOK.vocab_size, (1, 6))
    first = prepare_decoding(model, "int8")
    layer = next(m for m in model.modules() if isinstance(m, Int8Linear))
    with torch.inference_mode():
        before = model(idx)
    cache = layer._cache
    assert cache is not None
    # the tied LM head stays fp32 (packed where oneDNN is), also on the second call
    assert prepare_decoding(model, "int8") == first and "1 fp32 linear(s)" in first
    assert prepare_decoding(model, "auto") == first
    assert layer._cache is cache  # same kernel: no repacking
    with torch.inference_mode():
        assert torch.equal(model(idx), before)


def test_loading_new_weights_drops_the_dequantized_cache() -> None:
    layer, x = int8_layer(), torch.randn(2, 64)
    layer.set_kernel("dequantized")
    with torch.inference_mode():
        old = layer(x)
    assert layer._cache is not None
    torch.manual_seed(2)
    other = Int8Linear.from_linear(nn.Linear(64, 48))
    layer.load_state_dict(other.state_dict())
    assert set(layer.state_dict()) == {"weight_int8", "weight_scale", "bias"}  # no cache saved
    assert layer._cache is None and "_cache" not in layer._buffers
    with torch.inference_mode():
        new = layer(x)
        assert not torch.allclose(new, old)
        assert torch.allclose(new, other(x), atol=1e-5)


@needs_gemm
@pytest.mark.parametrize("build", [tiny_gpt, tiny_llama])
def test_int8_decoding_logits_close_to_fp32(build: object) -> None:
    assert callable(build)
    model = build()
    idx = torch.randint(0, TOK.vocab_size, (2, 12))
    with torch.inference_mode():
        fp32 = model(idx)
        summary = prepare_decoding(model, "int8")
        int8 = model(idx)
    assert f"int8 linear(s): {expected_int8_kernel()}" in summary
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert rel_err(int8, fp32) < 0.05
    # the same int8 weights in fp32 ("fp32" decoding of an int8 model) are the closer reference
    with torch.inference_mode():
        assert "int8 linear(s): dequantized" in prepare_decoding(model, "fp32")
        assert rel_err(int8, model(idx)) < 0.05


def test_kernels_fall_back_when_forced_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_DISABLE_KERNELS", "native,int8-gemm,onednn")
    model = tiny_llama()
    idx = torch.randint(0, TOK.vocab_size, (1, 9))
    reference = Llama(model.config).eval()
    reference.load_state_dict(model.state_dict())
    summary = prepare_decoding(model, "int8")
    assert "int8 linear(s): dequantized" in summary and "F.linear" in summary
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    # the reference: the same int8 weights dequantized per call (no fast kernel at all)
    prepare_decoding(reference, "int8")
    for m in reference.modules():
        if isinstance(m, Int8Linear):
            m.set_kernel("dequantize")
    with torch.inference_mode():
        assert torch.allclose(model(idx), reference(idx), atol=1e-5)


@needs_gemm
def test_int8_greedy_tokens_agree_with_fp32_on_a_peaked_model() -> None:
    # random tiny models have near-flat logits (any rounding flips argmax); scale the head so
    # the greedy choice is clear, as in a trained model
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8.0)
    params = SamplingParams(max_tokens=16, temperature=0, stop_on_eos=False)
    fp32 = generate(model, TOK, "def main():", params).token_ids
    int8 = generate(model, TOK, "def main():", params, weights="int8").token_ids
    agree = sum(a == b for a, b in zip(fp32, int8, strict=True)) / len(fp32)
    assert agree >= 0.75, (fp32, int8)


def test_engine_on_int8_keeps_cancellation_and_limits() -> None:
    reached, release = threading.Event(), threading.Event()

    def gate(request_id: str, index: int, logits: torch.Tensor) -> None:
        if (request_id, index) == ("a", 1):
            reached.set()
            assert release.wait(30)

    greedy = SamplingParams(max_tokens=50, temperature=0, stop_on_eos=False)
    with Engine(
        tiny_llama(), TOK, max_batch_size=1, max_queue=1, logits_hook=gate, weights="int8"
    ) as engine:
        assert f"int8 linear(s): {expected_int8_kernel()}" in engine.kernels
        a = engine.submit_sync("a", greedy, request_id="a")
        b = engine.submit_sync("b", SamplingParams(max_tokens=3, temperature=0, stop_on_eos=False))
        with pytest.raises(EngineOverloaded, match="full"):
            engine.submit_sync("c", greedy)
        assert reached.wait(30)
        assert engine.cancel("a")
        release.set()
        cancelled = a.result()
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 2
        assert b.result().finish_reason == "length" and b.result().completion_tokens == 3
        assert engine.stats().requests_cancelled == 1
