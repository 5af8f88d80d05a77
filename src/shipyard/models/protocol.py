"""What the generation engine and the server need from a language model, and nothing more.

A language model is an `nn.Module` that maps token ids (B, T) to next-token logits (B, T, V),
appending the keys and values of the new tokens to a `KVCache` when given one. GPT and the
Llama family both satisfy `LanguageModel`; `generate/` and `serve/` depend on this protocol only.
Both build their attention masks over cache slots with `window_attention_mask`.
"""

from __future__ import annotations

from typing import Protocol, TypeGuard, runtime_checkable

import torch
from torch import nn

from shipyard.errors import ModelError


class KVCache:
    """Keys and values of the tokens already processed, one (k, v) pair per layer.

    Each tensor has shape (B, n_kv, T_cached, hs) and grows along dim 2 as the model appends the
    keys and values of new tokens (n_kv: key/value heads, fewer than query heads under grouped-
    query attention). One cache serves one batch of sequences; slot t of every sequence is the
    t-th token fed for it (padding included).
    """

    def __init__(self, n_layer: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def n_layer(self) -> int:
        """Number of layers the cache holds keys and values for."""
        return len(self.keys)

    @property
    def seq_len(self) -> int:
        """Number of cached token slots (T_cached)."""
        k = self.keys[0]
        return 0 if k is None else k.size(2)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new (B, nh, T, hs) keys/values to `layer`; return all of them (B, nh, S, hs)."""
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None and past_v is not None:
            k = torch.cat([past_k, k], dim=2)  # (B, nh, T_cached + T, hs)
            v = torch.cat([past_v, v], dim=2)  # (B, nh, T_cached + T, hs)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def attention_mask(
        self,
        T: int,
        past: int,
        key_mask: torch.Tensor | None,
        window: int | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """The (attn_mask, is_causal) pair a model uses with this cache: `window_attention_mask`.

        A cache that lays out its slots differently (a fixed-size one, say) overrides it.
        """
        return window_attention_mask(T, past, key_mask, window, device)


def window_attention_mask(
    T: int, past: int, key_mask: torch.Tensor | None, window: int | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The (attn_mask, is_causal) pair for T new queries after `past` cached slots.

    Query i sits at slot past + i and may attend slot j when j <= past + i, j > past + i - window
    (sliding window) and key_mask[:, j] is True; a query always attends its own slot, so a row
    of padding never becomes all -inf. Returns (None, flag) when SDPA's causal flag is exact.
    window: None for plain causal attention (GPT, Llama's full-attention layers).
    """
    if window is not None and past + T <= window:
        window = None  # no query reaches back that far
    if key_mask is None and window is None:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token sees every cached slot
    S = past + T
    q_slot = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_slot <= q_slot  # (T, S)
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    if key_mask is not None:
        if key_mask.dim() != 2 or key_mask.size(1) != S:
            raise ModelError(
                f"attention_mask must have shape (B, {S}) = (batch, cached + new tokens), "
                f"got {tuple(key_mask.shape)}"
            )
        keys_ok = key_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        return allowed & (keys_ok | (k_slot == q_slot)), False  # (B, 1, T, S)
    return allowed, False


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM: `model(idx, kv_cache=..., positions=..., attention_mask=...)` -> logits.

    idx: (B, T) token ids. kv_cache: earlier tokens' keys/values; the call appends the new ones.
    positions: (B, T) position ids (left-padded batches: a row's first real token is 0).
    attention_mask: (B, T_cached + T), False for padding slots. Returns (B, T, vocab_size).
    """

    vocab_size: int

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        ...

    @property
    def n_layer(self) -> int:
        """Layers, i.e. the size of the KV cache it reads and writes."""
        ...

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache sized for this model."""
        ...

    def __call__(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def is_language_model(obj: object) -> TypeGuard[LanguageModel]:
    """True for a module that satisfies `LanguageModel` (not for an ONNX wrapper, say)."""
    return isinstance(obj, nn.Module) and isinstance(obj, LanguageModel)


def language_module(model: LanguageModel) -> nn.Module:
    """The `nn.Module` a language model is (to move, pack or put in eval mode)."""
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"a language model must be a torch nn.Module, got {type(model).__name__}; "
            "build it with shipyard.models.build_model"
        )
    return model
