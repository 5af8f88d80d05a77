"""shipyard's native CPU kernels (`shipyard.kernels`) against PyTorch's own ops as references.

Tolerances: the kernels sum in another order than MKL / SDPA, so results agree to float32
rounding (rtol 1e-5 with a small atol); the int8 kernel equals the dequantized weights in fp32
to the same rounding. Where the kernels promise more (a row's result does not depend on the
batch or the thread count) the test asks for bitwise equality.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.decode_support import peaked_gpt, tiny_llama

from shipyard.data.tokenization import Tokenizer
from shipyard.generate import SamplingParams, generate
from shipyard.generate.packed import prepare_decoding
from shipyard.kernels import native
from shipyard.models.attention import NativeKernels, attention, gelu_tanh
from shipyard.models.llama import Llama
from shipyard.models.quantized import (
    Int8Linear,
    _prepack_int8,
    int8_gemm_available,
    quantize_weight_int8,
)

pytestmark = pytest.mark.skipif(
    not native.load(), reason=f"native kernels unavailable: {native.native_unavailable()}"
)
ops = torch.ops.shipyard
TOK = Tokenizer.byte()


@pytest.fixture(autouse=True)
def _inference() -> Iterator[None]:
    with torch.inference_mode():
        yield


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 16, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(37, 19), (64, 48), (16, 1)])
def test_f32_linear_equals_f_linear(rows: int, out_features: int, in_features: int) -> None:
    torch.manual_seed(rows)
    w, b = torch.randn(out_features, in_features), torch.randn(out_features)
    x = torch.randn(rows, in_features)
    packed = native.pack_weight(w)
    close(ops.linear_f32(x, w, packed, b, 32), F.linear(x, w, b))  # 40 rows: F.linear's
    close(ops.linear_f32(x, w, packed, None, 64), F.linear(x, w))


def test_f32_linear_takes_any_leading_shape_and_strides() -> None:
    w, b = torch.randn(24, 32), torch.randn(24)
    x = torch.randn(3, 32, 5).transpose(1, 2)  # (3, 5, 32), not contiguous
    got = ops.linear_f32(x, w, native.pack_weight(w), b, 64)
    assert got.shape == (3, 5, 24)
    close(got, F.linear(x, w, b))


def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(300, 256), torch.randn(300)
    packed = native.pack_weight(w)
    x = torch.randn(16, 256)
    batch = ops.linear_f32(x, w, packed, b, 64)
    for rows in (1, 3, 6, 7):
        assert torch.equal(ops.linear_f32(x[:rows], w, packed, b, 64), batch[:rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_f32(x, w, packed, b, 64)
        torch.set_num_threads(2)
        two = ops.linear_f32(x, w, packed, b, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, batch) and torch.equal(two, batch)


def int8_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What `linear_i8` computes, in torch: each row quantized with its own scale
    (s = max|x| / 127, round half to even, clamp to +-127), exact integer sums, then
    float(acc) * (s * scale) + bias (in float64, rounded once: the kernel's fma rounds once too,
    so the two differ at most where the float64 sum itself rounds, ~2^-29 of the time)."""
    s = x.abs().amax(dim=1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    xq = torch.clamp(torch.round(x / safe[:, None]), -127, 127).to(torch.int64)
    acc = xq @ q.to(torch.int64).T  # exact
    y = acc.float().double() * (s[:, None] * scale[None, :]).double()
    return (y if bias is None else y + bias.double()).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(50, 39), (16, 64), (37, 1027)])
def test_int8_linear_is_exact_on_per_row_quantized_activations(
    rows: int, out_features: int, in_features: int
) -> None:
    torch.manual_seed(rows * 7 + in_features)
    q, scale = quantize_weight_int8(torch.randn(out_features, in_features))
    b, x = torch.randn(out_features), torch.randn(rows, in_features)
    packed = native.pack_int8(q)
    got = ops.linear_i8(x, packed, scale, b, in_features, None, 64)  # no fallback
    assert torch.equal(got, int8_reference(x, q, scale, b))
    # and close to the int8 weights in float32: the activations' 8 bits are all it adds
    want = F.linear(x, q.float() * scale[:, None], b)
    assert (got - want).norm() / want.norm() < 0.02


def test_int8_linear_sums_exactly_without_saturating() -> None:
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (21, 255), dtype=torch.int8)
    q[0], q[1] = 127, -127  # 127 * 127 + 127 * 127 per pair: the 16-bit step must not saturate
    x = torch.randint(-127, 128, (6, 255)).float()
    x[:, 0], x[0], x[1] = 127.0, 127.0, -127.0  # every row's scale is exactly 1
    got = ops.linear_i8(x, native.pack_int8(q), torch.ones(21), None, 255, None, 64)
    assert torch.equal(got.to(torch.int64), x.to(torch.int64) @ q.to(torch.int64).T)


def test_int8_linear_rows_are_independent_of_their_batch_and_the_threads() -> None:
    torch.manual_seed(1)
    q, scale = quantize_weight_int8(torch.randn(70, 48))
    packed, b = native.pack_int8(q), torch.randn(70)
    x = torch.randn(9, 48)
    x[3] *= 100.0  # an outlier row changes no other row (one scale per row)
    x[4] = 0.0  # a row of zeros gives the bias
    x[5, 7] = float("nan")  # a NaN row gives NaN, alone
    batch = ops.linear_i8(x, packed, scale, b, 48, None, 64)

    def same(got: torch.Tensor, want: torch.Tensor) -> None:  # bitwise, NaN where NaN
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)

    for i in (0, 3, 8):
        same(ops.linear_i8(x[i : i + 1], packed, scale, b, 48, None, 64), batch[i : i + 1])
    same(batch[4], b)
    assert batch[5].isnan().all() and not batch[[0, 1, 2, 3, 4, 6, 7, 8]].isnan().any()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        same(ops.linear_i8(x, packed, scale, b, 48, None, 64), batch)
    finally:
        torch.set_num_threads(threads)
    no_bias = ops.linear_i8(x, packed, scale, None, 48, None, 64)
    lead = ops.linear_i8(x.view(3, 3, 48), packed, scale, None, 48, None, 64)
    same(lead, no_bias.view(3, 3, 70))


@pytest.mark.skipif(not int8_gemm_available(), reason="no x86 int8 GEMM here")
def test_int8_linear_hands_many_rows_to_the_int8_gemm() -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(40, 50)).eval()
    fallback, packed = _prepack_int8(layer), native.pack_int8(layer.weight_int8)
    scale, bias = layer.weight_scale, layer.bias
    for rows in (8, 9, 12):
        x = torch.randn(rows, 40)
        got = ops.linear_i8(x, packed, scale, bias, 40, fallback, 8)
        if rows <= 8:  # its own: per-row 8-bit activations
            assert torch.equal(got, ops.linear_i8(x, packed, scale, bias, 40, None, 8))
        else:  # the int8 GEMM's (7-bit activations, one scale per call), exactly
            assert torch.equal(got, torch.ops.quantized.linear_dynamic(x, fallback, True))


def test_bad_inputs_are_clear_errors() -> None:
    w = torch.randn(8, 4)
    packed = native.pack_weight(w)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        ops.linear_f32(torch.randn(2, 4, dtype=torch.float64), w, packed, None, 8)
    with pytest.raises(RuntimeError, match="has 5 features, the weight 4"):
        ops.linear_f32(torch.randn(2, 5), w, packed, None, 8)
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        ops.linear_f32(torch.randn(2, 4), torch.randn(40, 4), packed, None, 8)
    with pytest.raises(RuntimeError, match="2-D float32 CPU weight"):
        native.pack_weight(torch.randn(3, 3, dtype=torch.float64))
    q = torch.full((8, 5), -128, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"weights must lie in \[-127, 127\]"):
        native.pack_int8(q)
    packed8 = native.pack_int8(q.clamp(min=-127))
    with pytest.raises(RuntimeError, match="x has 4 features, the weight 5"):
        ops.linear_i8(torch.randn(2, 4), packed8, torch.ones(8), None, 5, None, 64)
    with pytest.raises(RuntimeError, match="does not match the scales and in_features"):
        ops.linear_i8(torch.randn(2, 9), packed8, torch.ones(8), None, 9, None, 64)


def decode_case(
    B: int, H: int, G: int, S: int, hs: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, 1, hs) not contiguous; k, v views of a larger cache; a mask with left padding,
    a spare tail and a sliding window on the last row."""
    torch.manual_seed(B * 100 + S)
    storage = torch.randn(2, B, G, S + 8, hs)
    k, v = storage[0, :, :, :S], storage[1, :, :, :S]
    q = torch.randn(B, 1, H, hs).transpose(1, 2)
    slots = torch.arange(S)
    start = torch.arange(B) % 3
    mask = (slots[None, :] >= start[:, None]) & (slots[None, :] < S - 2)
    mask[-1] &= slots > S - 6  # a window of 3 slots
    return q, k, v, mask[:, None, None, :]


@pytest.mark.parametrize(
    ("B", "H", "G", "S", "hs"),
    [(1, 4, 4, 9, 16), (5, 6, 2, 33, 64), (3, 8, 1, 17, 32), (2, 2, 1, 11, 12)],  # 12: scalar
)
def test_decode_attention_equals_sdpa(B: int, H: int, G: int, S: int, hs: int) -> None:
    q, k, v, mask = decode_case(B, H, G, S, hs)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = ops.decode_attention(q, k, v, mask, q.size(-1) ** -0.5)
    close(got, want)
    close(attention(q, k, v, mask, native=True), want)  # a layer prepared for generation
    assert torch.equal(attention(q, k, v, mask), want)  # a plain forward: SDPA itself
    alone = ops.decode_attention(q[1:2], k[1:2], v[1:2], mask[1:2], q.size(-1) ** -0.5)
    assert torch.equal(alone, got[1:2])  # a row's result does not depend on its batch
    no_mask = ops.decode_attention(q, k, v, None, 0.25)
    close(no_mask, F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True))


@pytest.mark.parametrize(("B", "H", "G", "S", "hs"), [(5, 6, 2, 33, 64), (2, 2, 1, 11, 12)])
def test_decode_attention_reads_a_float16_cache_as_its_float32_values(
    B: int, H: int, G: int, S: int, hs: int
) -> None:
    q, k, v, mask = decode_case(B, H, G, S, hs)
    k16, v16 = k.half(), v.half()  # views of a float16 cache: strided like the float32 one
    got = ops.decode_attention(q, k16, v16, mask, hs**-0.5)
    as_float = ops.decode_attention(q, k16.float(), v16.float(), mask, hs**-0.5)
    if hs % 16 == 0:  # the vector path: the very same arithmetic on the float16 numbers
        assert torch.equal(got, as_float)
    close(got, as_float)  # the scalar path (other head sizes): its tails may fuse differently
    want = F.scaled_dot_product_attention(
        q, k16.float(), v16.float(), attn_mask=mask, enable_gqa=True
    )
    close(got, want)
    close(attention(q, k16, v16, mask, native=True), want)
    assert torch.equal(attention(q, k16, v16, mask), want)  # SDPA: converted back to float32
    with pytest.raises(RuntimeError, match=r"float32 or float16 k and v"):
        ops.decode_attention(q, k16, v, mask, 1.0)


@pytest.mark.parametrize("hs", [64, 12])
def test_decode_attention_of_a_short_prefill_equals_sdpa(hs: int) -> None:
    torch.manual_seed(hs)
    B, H, G, T, S = 2, 4, 2, 5, 13
    q = torch.randn(B, H, T, hs)
    k, v = torch.randn(B, G, S, hs), torch.randn(B, G, S, hs)
    slots, position = torch.arange(S), torch.arange(6, 6 + T)  # the new tokens' slots
    start = torch.tensor([0, 3])  # row 1 is left-padded
    mask = (slots[None, None, :] <= position[None, :, None]) & (
        slots[None, None, :] >= start[:, None, None]
    )
    mask = mask[:, None]  # (B, 1, T, S): causal over the new slots, per row
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = ops.decode_attention(q, k, v, mask, hs**-0.5)
    close(got, want)
    close(attention(q, k, v, mask, native=True), want)
    one = ops.decode_attention(q[:, :, 2:3], k, v, mask[:, :, 2:3], hs**-0.5)
    assert torch.equal(one, got[:, :, 2:3])  # each query computed alone
    shared = ops.decode_attention(q, k, v, mask[:1, :, :1], hs**-0.5)  # (1, 1, 1, S) broadcast
    close(
        shared, F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:1, :, :1], enable_gqa=True)
    )


def test_decode_attention_over_no_allowed_slot_is_nan_and_bad_shapes_raise() -> None:
    q, k, v, mask = decode_case(2, 2, 2, 5)
    mask = mask.clone()
    mask[0] = False
    out = ops.decode_attention(q, k, v, mask, 1.0)
    assert out[0].isnan().all() and not out[1].isnan().any()
    with pytest.raises(RuntimeError, match=r"mask must be bool \(B or 1, 1, T or 1, S\)"):
        ops.decode_attention(q, k, v, mask.float(), 1.0)
    with pytest.raises(RuntimeError, match=r"shapes do not match"):
        ops.decode_attention(q, k[:, :1].expand(2, 3, 5, 16), v, None, 1.0)


def test_gelu_tanh_equals_pytorchs() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 37) * 4
    x[0, 0, :6] = torch.tensor([0.0, 1e-30, -60.0, 60.0, 300.0, -300.0])  # tails: 0 and x
    want = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(ops.gelu_tanh(x), want, rtol=1e-6, atol=1e-6)
    odd = x.transpose(0, 2)  # not contiguous
    torch.testing.assert_close(ops.gelu_tanh(odd), want.transpose(0, 2), rtol=1e-6, atol=1e-6)
    fallback = torch.nn.GELU(approximate="tanh")
    assert torch.equal(gelu_tanh(x, fallback, native=True), ops.gelu_tanh(x))
    assert torch.equal(gelu_tanh(x, fallback), want)  # a plain forward: PyTorch's own
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.clone().requires_grad_()
        gelu_tanh(xg, fallback, native=True).sum().backward()  # autograd: PyTorch's
        assert xg.grad is not None


def test_attention_keeps_sdpa_for_training_and_prefill() -> None:
    q, k, v, mask = decode_case(2, 4, 2, 6)
    with torch.inference_mode(False), torch.enable_grad():
        qg = q.detach().clone().requires_grad_()
        out = attention(qg, k.clone(), v.clone(), mask.clone(), native=True)
        assert out.grad_fn is not None  # autograd: SDPA, differentiable
        out.sum().backward()
        assert qg.grad is not None
    prefill_q = torch.randn(2, 4, 3, 16)
    close(
        attention(prefill_q, k, v, None, is_causal=False),
        F.scaled_dot_product_attention(prefill_q, k, v, enable_gqa=True),
    )


def small_llama() -> Llama:
    return tiny_llama(intermediate_size=96, tie_word_embeddings=True)


@pytest.mark.parametrize("build", [peaked_gpt, small_llama])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_generation_with_and_without_native_kernels_agrees(
    build: object, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert callable(build)
    params = SamplingParams(max_tokens=24, temperature=0, stop_on_eos=False, logprobs=True)
    with torch.inference_mode(False):
        fast = generate(build(), TOK, "def main():", params, weights=weights)
        monkeypatch.setenv(native.DISABLE_ENV, native.NATIVE_KERNEL)
        slow = generate(build(), TOK, "def main():", params, weights=weights)
    if weights == "fp32":
        assert fast.token_ids == slow.token_ids
        assert fast.logprobs is not None and slow.logprobs is not None
        gap = max(
            abs(a.logprob - b.logprob) for a, b in zip(fast.logprobs, slow.logprobs, strict=True)
        )
        assert gap < 1e-4
    else:  # weight-only int8 against the int8 GEMM's quantized activations: close, not equal
        agree = sum(a == b for a, b in zip(fast.token_ids, slow.token_ids, strict=True))
        assert agree >= 0.75 * len(fast.token_ids), (fast.token_ids, slow.token_ids)


def run_load(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from shipyard.kernels import native; print('loaded', native.load())\n"
        "print('unavailable:', native.native_unavailable())"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        check=False,
    )


def test_a_failed_build_falls_back_and_leaves_no_library(tmp_path: Path) -> None:
    cache = tmp_path / "kernels"
    done = run_load({"SHIPYARD_KERNEL_CACHE": str(cache), "CXX": "false"})
    assert done.returncode == 0, done.stderr
    assert "loaded False" in done.stdout
    assert "native CPU kernels off: RuntimeError: false exited 1" in done.stdout
    assert not list(cache.glob("*.so"))  # the failed build left nothing to load next time


def test_disabled_kernels_do_not_load_and_a_cached_build_is_reused() -> None:
    off = run_load({native.DISABLE_ENV: "native"})
    assert "loaded False" in off.stdout and "disabled by $SHIPYARD_DISABLE_KERNELS" in off.stdout
    again = run_load({})  # this process built (or found) the library: no second build
    assert "loaded True" in again.stdout and "building" not in again.stdout + again.stderr


@pytest.mark.parametrize("build", [peaked_gpt, small_llama])
def test_only_layers_prepared_for_generation_run_native_kernels(build: object) -> None:
    """A plain forward gives the same bits in every process (packages are checked that way),
    whether or not generation loaded the kernels there; `prepare_decoding` opts a model in."""
    assert callable(build)
    model = build()
    layers = [m for m in model.modules() if isinstance(m, NativeKernels)]
    assert layers and not any(m.native_kernels for m in layers)
    idx = torch.randint(0, 256, (2, 1))
    plain = model(idx)
    prepare_decoding(model)
    assert all(m.native_kernels for m in layers)
    torch.testing.assert_close(model(idx), plain, rtol=1e-5, atol=1e-5)
