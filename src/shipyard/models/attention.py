"""Scaled dot-product attention for the transformer models, with a native decode-step kernel.

GPT and the Llama family call `attention` rather than `F.scaled_dot_product_attention`: it
handles grouped-query attention (fewer key/value heads than query heads) and sends a decode
step to shipyard's native kernel where generation loaded it (`shipyard.kernels`); GPT's MLP
calls `gelu_tanh` likewise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.kernels import native as native_kernels

NATIVE_MAX_QUERIES = 64
"""New tokens per row up to which the native kernel attends (a decode step, a short prompt or
prompt chunk through the traced prefill, with its mask); longer prefills keep SDPA."""
# SDPA's grouped-query flag (torch >= 2.5) reads shared key/value heads without copying them.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    native: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for q (B, H, T, hs) over k, v (B, G, S, hs), G dividing H
    (grouped-query attention: query head h reads key/value head h // (H / G)); (B, H, T, hs).

    native: the calling layer was prepared for generation (`NativeKernels.native_kernels`, set
    by `prepare_decoding`). Then a decode step or a short prefill (up to `NATIVE_MAX_QUERIES`
    new tokens, float32 on CPU, no autograd or dropout, a boolean mask; a decode step may
    have none) runs shipyard's native kernel (`shipyard.kernels`): it reads only the allowed
    slots' keys and values (not a batch's left padding or a cache's spare slots), ~1.5x
    faster than SDPA's CPU kernel at 16 rows and without its per-call cost on a short prompt;
    the same numbers up to float32 rounding. Otherwise SDPA, so a model's plain forward gives
    the same bits in every process, whatever generation loaded there.

    k and v may be stored in another dtype than q (a float16 KV cache, see
    `shipyard.generate.cache.BatchKVCache`): the native kernel reads them as they are, SDPA gets
    them converted to q's dtype.
    """
    if (
        native
        and q.size(2) <= NATIVE_MAX_QUERIES
        and not is_causal
        and dropout_p == 0.0
        and _native_decode(q, k, v, attn_mask)
    ):
        return torch.ops.shipyard.decode_attention(q, k, v, attn_mask, q.size(-1) ** -0.5)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    H, G = q.size(1), k.size(1)
    if G == H:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
        )
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            enable_gqa=True,
        )
    k = k.repeat_interleave(H // G, dim=1)  # (B, H, S, hs)
    v = v.repeat_interleave(H // G, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
    )


def native_inference(*tensors: torch.Tensor) -> bool:
    """Whether shipyard's native kernels may run on `tensors`: float32 on CPU (last dimension
    contiguous), no autograd, and the kernels loaded by generation (`prepare_decoding`): a
    forward never builds them."""
    if any(
        t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors
    ):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return native_kernels.loaded()


class NativeKernels:
    """Mixin of the layers whose forward can run shipyard's native kernels: only once
    `prepare_decoding` has set `native_kernels` on them (generation), never in a plain forward."""

    native_kernels: bool = False


def gelu_tanh(x: torch.Tensor, fallback: nn.Module, *, native: bool = False) -> torch.Tensor:
    """GELU with the tanh approximation: with `native` (a layer prepared for generation) the
    native kernel where it may run (~4x faster than PyTorch's on AVX2, within 1e-6), else
    `fallback` (an `nn.GELU(approximate="tanh")`)."""
    if native and native_inference(x):
        return torch.ops.shipyard.gelu_tanh(x)
    return fallback(x)


def _native_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> bool:
    if mask is not None and (
        mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.size(1) != 1
        or mask.size(2) not in (1, q.size(2))
    ):
        return False
    if mask is None and q.size(2) > 1:  # no mask means all slots: not causal, not a prefill
        return False
    if k.dtype == torch.float16 and v.dtype == torch.float16:  # a float16 cache: read as it is
        cached_ok = all(t.device.type == "cpu" and t.stride(-1) == 1 for t in (k, v))
        return cached_ok and native_inference(q)
    return native_inference(q, k, v)
