"""What the generation engine and the server need from a language model, and nothing more.

A language model is an `nn.Module` that maps token ids (B, T) to next-token logits (B, T, V),
appending the keys and values of the new tokens to a `KVCache` when given one. GPT and the
Llama family both satisfy `LanguageModel`; `generate/` and `serve/` depend on this protocol only.
Both build their attention masks over cache slots with `window_attention_mask`.

A recurrent language model (the rnn) satisfies `RecurrentLanguageModel` instead: it carries a
fixed-size `RecurrentState` per sequence where a transformer keeps a growing KV cache, and has no
context limit. `DecodingModel` is either; decoding code (single-stream and the batching engine)
takes a `DecodingModel` and asks `context_limit` and `language_module` rather than the class.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self._n_layer = n_layer
        self._keys: list[torch.Tensor | None] = [None] * n_layer
        self._values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Each layer's cached keys, (B, n_kv, T_cached, hs), None before the first append."""
        return self._keys

    @property
    def values(self) -> list[torch.Tensor | None]:
        """Each layer's cached values, like `keys`."""
        return self._values

    @property
    def n_layer(self) -> int:
        """Number of layers the cache holds keys and values for."""
        return self._n_layer

    @property
    def seq_len(self) -> int:
        """Number of cached token slots (T_cached)."""
        k = self._keys[0]
        return 0 if k is None else k.size(2)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new (B, nh, T, hs) keys/values to `layer`; return all of them (B, nh, S, hs)."""
        past_k, past_v = self._keys[layer], self._values[layer]
        if past_k is not None and past_v is not None:
            k = torch.cat([past_k, k], dim=2)  # (B, nh, T_cached + T, hs)
            v = torch.cat([past_v, v], dim=2)  # (B, nh, T_cached + T, hs)
        self._keys[layer], self._values[layer] = k, v
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


def segment_runs(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(runs, positions) of packed rows: each maximal run of equal ids in `segments` (B, T) is one
    example; runs numbers them along the row and positions restart at 0 at each run's start.

    Runs, not raw ids, decide who attends whom, so a repeated id further along a row is another
    example and never sees the first.
    """
    if segments.dim() != 2:
        raise ModelError(f"segments must have shape (B, T), got {tuple(segments.shape)}")
    B, T = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    runs = starts.long().cumsum(dim=1)  # (B, T)
    slot = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    first = torch.where(starts, slot, torch.zeros_like(slot)).cummax(dim=1).values  # (B, T)
    return runs, slot - first


def segment_attention_mask(runs: torch.Tensor, window: int | None) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) of packed rows: a query attends earlier slots of
    its own run only (and, with a sliding `window`, only the last `window` of them)."""
    T = runs.size(1)
    q_slot = torch.arange(T, device=runs.device)[:, None]  # (T, 1)
    k_slot = torch.arange(T, device=runs.device)[None, :]  # (1, T)
    allowed = k_slot <= q_slot  # (T, T)
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    same = runs[:, :, None] == runs[:, None, :]  # (B, T, T)
    return (same & allowed)[:, None]  # (B, 1, T, T)


def check_segments(
    segments: torch.Tensor, idx: torch.Tensor, kv_cache: KVCache | None, key_mask: object
) -> None:
    """Refuse `segments` where they have no meaning: with a KV cache or an attention_mask."""
    if segments.shape != idx.shape:
        raise ModelError(
            f"segments must have the shape of idx {tuple(idx.shape)}, got {tuple(segments.shape)}"
        )
    if kv_cache is not None or key_mask is not None:
        raise ModelError(
            "segments (packed training rows) cannot be combined with a kv_cache or an "
            "attention_mask; decode one sequence per row instead"
        )


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
        last_only: bool = False,
    ) -> torch.Tensor: ...


def is_language_model(obj: object) -> TypeGuard[LanguageModel]:
    """True for a module that satisfies `LanguageModel` (not for an ONNX wrapper, say)."""
    return isinstance(obj, nn.Module) and isinstance(obj, LanguageModel)


def language_module(model: DecodingModel) -> nn.Module:
    """The `nn.Module` a language model (either protocol) is (to move, pack or put in eval mode)."""
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"a language model must be a torch nn.Module, got {type(model).__name__}; "
            "build it with shipyard.models.build_model"
        )
    return model


class RecurrentState:
    """The state a recurrent LM carries between calls for a batch of sequences (its KV cache).

    `hidden` is one tensor or a tuple of them (an LSTM's (h, c)), each (n_layer, B, H): the
    batch on dim 1, torch's layout for `nn.LSTM`/`nn.GRU` states; None before the first call.
    `seq_len` counts the tokens consumed (a batch: the longest row's). Unlike a KV cache, the
    state has the same size however long a sequence gets, and rows need no padding: `select`
    and `concat` gather and stack rows, which is how sequences leave and join a decode batch.
    """

    def __init__(self) -> None:
        self.hidden: torch.Tensor | tuple[torch.Tensor, ...] | None = None
        self.seq_len = 0

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        h = self.hidden
        return () if h is None else (h,) if isinstance(h, torch.Tensor) else h

    def _set(self, tensors: Sequence[torch.Tensor]) -> None:
        self.hidden = tensors[0] if isinstance(self.hidden, torch.Tensor) else tuple(tensors)

    @property
    def batch_size(self) -> int:
        """Rows (sequences) the state holds; 0 before the first call."""
        t = self._tensors()
        return 0 if not t else t[0].size(1)

    def select(self, rows: Sequence[int], drop_left: int = 0) -> None:
        """Keep `rows` (in that order). drop_left: accepted for the engine's KV-cache call; a
        recurrent state has no padding slots to drop."""
        t = self._tensors()
        if not t:
            return
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=t[0].device)
        self._set([x.index_select(1, idx) for x in t])  # (n_layer, len(rows), H) each

    @classmethod
    def concat(cls, states: Sequence[RecurrentState]) -> RecurrentState:
        """Stack non-empty states along the batch (rows in order), as the first one's class."""
        parts = [s for s in states if s.batch_size > 0]
        if not parts:
            raise ModelError("concat needs at least one non-empty recurrent state")
        out = type(parts[0])()
        out.hidden = parts[0].hidden
        out._set([torch.cat(ts, dim=1) for ts in zip(*(p._tensors() for p in parts), strict=True)])
        out.seq_len = max(p.seq_len for p in parts)
        return out


@runtime_checkable
class RecurrentLanguageModel(Protocol):
    """A causal LM with a recurrent state: `model(idx, kv_cache=state)` -> logits (B, T, V).

    The call reads `state` (or starts from zeros when it is empty) and replaces it with the
    state after the new tokens, so the next call continues every row. No context limit.
    """

    vocab_size: int

    def new_state(self) -> RecurrentState:
        """An empty state (no rows yet) to pass as `kv_cache`."""
        ...

    def __call__(
        self, idx: torch.Tensor, *, kv_cache: RecurrentState | None = None
    ) -> torch.Tensor: ...


DecodingModel = LanguageModel | RecurrentLanguageModel
"""What generation decodes from: a KV-cache language model or a recurrent one."""


def is_recurrent_language_model(obj: object) -> TypeGuard[RecurrentLanguageModel]:
    """True for a module that satisfies `RecurrentLanguageModel` (the rnn with head lm)."""
    return isinstance(obj, nn.Module) and isinstance(obj, RecurrentLanguageModel)


def is_decoding_model(obj: object) -> TypeGuard[DecodingModel]:
    """True for a module generation can decode from (either protocol)."""
    return is_language_model(obj) or is_recurrent_language_model(obj)


def context_limit(model: DecodingModel) -> int | None:
    """Most tokens one sequence may hold: the model's `max_context`, None for a recurrent one."""
    return None if isinstance(model, RecurrentLanguageModel) else model.max_context
