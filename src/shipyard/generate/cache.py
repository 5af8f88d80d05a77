"""A KV cache for continuous batching: preallocated, left-padded, rows can leave and join.

A language model treats it like the plain `KVCache` (it only calls `seq_len` and `append`), but
appends write into spare capacity instead of concatenating, so a decode step copies nothing.
Rows leave (`select`) and join (`concat`) between steps; both copy the cache once, which is
cheap next to the decode steps in between.

Layout: every row ends at the same slot (the batch's `seq_len`); a row with fewer tokens is
padded on the left. The engine keeps each row's padding and masks those slots.

The cache stores keys and values in the dtype the model computes them in, or in the one it is
given: float16 halves the bytes a decode step reads (at 16 rows the cache is most of them) at
an 11-bit mantissa; the engine uses it with int8 weights (`kv_cache_dtype`). Attention reads it
as it is (shipyard's native kernel) or converted back (SDPA).

A recurrent model's cache is its `RecurrentState` (one fixed-size state per row, no padding),
which has the same `select` / `concat` / `seq_len` / `batch_size`; `new_cache` picks by model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shipyard.errors import ModelError
from shipyard.models.protocol import (
    DecodingModel,
    KVCache,
    RecurrentLanguageModel,
    RecurrentState,
)

_ALIGN = 16  # capacity grows in multiples of this many slots
_HALF_MAX = 65504.0  # the largest finite float16


def cache_values(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as a cache of `dtype` stores it: converted, and into float16 saturated at +-65504
    (a key beyond float16's range stays finite instead of turning the softmax into NaN)."""
    if x.dtype == dtype:
        return x
    if dtype == torch.float16:
        x = x.clamp(-_HALF_MAX, _HALF_MAX)
    return x.to(dtype)


def _capacity(needed: int) -> int:
    """Slots to allocate for `needed` ones: an eighth (at least 16) spare, rounded up.

    Spare slots cost the traced step (it attends the whole capacity, masked: 64 spare slots made
    its 16-row step ~7% slower); growing costs one copy of the cache per ~16 steps.
    """
    spare = max(_ALIGN, needed // 8)
    return -(-(needed + spare) // _ALIGN) * _ALIGN


class BatchKVCache(KVCache):
    """Left-padded batch KV cache with spare capacity; keys/values are (B, nh, S, hs) views.

    All layers share one key and one value tensor, (n_layer, B, nh, capacity, hs) (`storage`),
    so a traced decode step can take the whole cache as two arguments (`reserve`, `advance`).
    dtype: what the storage holds (None: the dtype of the first keys appended).
    """

    def __init__(self, n_layer: int, dtype: torch.dtype | None = None) -> None:
        super().__init__(n_layer)
        self.dtype = dtype
        self._k: torch.Tensor | None = None  # (n_layer, B, nh, capacity, hs)
        self._v: torch.Tensor | None = None
        self._len = [0] * n_layer
        self._tail_zero = False  # slots past the length hold zeros (not uninitialised memory)

    @property
    def seq_len(self) -> int:
        """Number of cached slots (every row has this many, padding included)."""
        return self._len[0]

    @property
    def batch_size(self) -> int:
        """Number of rows (0 while empty)."""
        return 0 if self._k is None else self._k.size(1)

    @property
    def capacity(self) -> int:
        """Slots allocated per row."""
        return 0 if self._k is None else self._k.size(3)

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n_layer, B, nh, capacity, hs) key and value tensors of every layer."""
        if self._k is None or self._v is None:
            raise ModelError("the KV cache is empty")
        return self._k, self._v

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Each layer's cached keys, (B, nh, length, hs) views of `storage` (made on demand: a
        traced step advances the cache every token and never reads them)."""
        k = self._k
        return [None if k is None else k[layer, :, :, :n] for layer, n in enumerate(self._len)]

    @property
    def values(self) -> list[torch.Tensor | None]:
        """Each layer's cached values, like `keys`."""
        v = self._v
        return [None if v is None else v[layer, :, :, :n] for layer, n in enumerate(self._len)]

    def _adopt(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> None:
        self._k, self._v, self._len = k, v, lengths

    def _grow(self, needed: int, *, zero: bool) -> None:
        """Reallocate to hold `needed` slots per row, keeping what every layer has cached."""
        assert self._k is not None and self._v is not None
        n = max(self._len)
        shape = (*self._k.shape[:3], _capacity(needed), self._k.size(4))
        # Uninitialised unless asked: slots past the length are written before an eager step
        # reads them, and zeroing fresh buffers costs ~0.7 ms per prefill (page faults).
        new = self._k.new_zeros if zero else self._k.new_empty
        k, v = new(shape), new(shape)
        k[:, :, :, :n] = self._k[:, :, :, :n]
        v[:, :, :, :n] = self._v[:, :, :, :n]
        self._tail_zero = zero
        self._adopt(k, v, self._len)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new (B, nh, T, hs) keys/values after the cached ones; return all (B, nh, S, hs)."""
        n, T = self._len[layer], k.size(2)
        if self._k is None or self._v is None:
            B, nh, _, hs = k.shape
            shape = (self.n_layer, B, nh, _capacity(T), hs)
            dtype = self.dtype or k.dtype
            self._k, self._v = k.new_empty(shape, dtype=dtype), v.new_empty(shape, dtype=dtype)
            self._tail_zero = False
        elif self._k.size(1) != k.size(0):
            raise ModelError(f"KV cache holds {self._k.size(1)} rows but got {k.size(0)}")
        elif n + T > self._k.size(3):
            self._grow(n + T, zero=False)
        kbuf, vbuf = self._k[layer], self._v[layer]  # (B, nh, capacity, hs)
        kbuf[:, :, n : n + T] = cache_values(k, kbuf.dtype)
        vbuf[:, :, n : n + T] = cache_values(v, vbuf.dtype)
        self._len[layer] = n + T
        return kbuf[:, :, : n + T], vbuf[:, :, : n + T]

    def allocate(
        self,
        batch: int,
        kv_heads: int,
        head_size: int,
        needed: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Give an empty cache its storage for `batch` rows and `needed` slots, all zero (what a
        traced prefill writes into)."""
        if self._k is not None:
            raise ModelError("allocate needs an empty cache")
        shape = (self.n_layer, batch, kv_heads, _capacity(needed), head_size)
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        self._tail_zero = True

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots per row, every slot past the length zero (a step that
        attends the whole capacity, masked, must not meet NaNs in uninitialised memory)."""
        if self._k is None or self._v is None:
            raise ModelError("reserve needs a cache that holds at least one token")
        if needed > self._k.size(3):
            self._grow(needed, zero=True)
        elif not self._tail_zero:
            n = min(self._len)
            self._k[:, :, :, n:].zero_()
            self._v[:, :, :, n:].zero_()
            self._tail_zero = True

    def advance(self, T: int) -> None:
        """Count `T` slots that a step wrote into `storage` itself (after `reserve`)."""
        self._len = [n + T for n in self._len]

    def select(self, rows: Sequence[int], drop_left: int = 0) -> None:
        """Keep `rows` (in that order) and drop the first `drop_left` slots of every row.

        Only drop slots that are padding in every kept row.
        """
        if self._k is None or self._v is None:
            return
        n = max(self._len)
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self._k.device)
        length = n - drop_left
        shape = (self.n_layer, len(idx), self._k.size(2), _capacity(length), self._k.size(4))
        k, v = self._k.new_zeros(shape), self._v.new_zeros(shape)
        k[:, :, :, :length] = self._k[:, :, :, drop_left:n].index_select(1, idx)
        v[:, :, :, :length] = self._v[:, :, :, drop_left:n].index_select(1, idx)
        self._tail_zero = True
        self._adopt(k, v, [m - drop_left for m in self._len])

    @classmethod
    def concat(cls, caches: Sequence[BatchKVCache]) -> BatchKVCache:
        """Stack non-empty caches along the batch, each left-padded to the longest."""
        parts = [c for c in caches if c.batch_size > 0]
        if not parts:
            raise ModelError("concat needs at least one non-empty cache")
        out = cls(parts[0].n_layer, parts[0].dtype)
        S = max(c.seq_len for c in parts)
        B = sum(c.batch_size for c in parts)
        ref = parts[0].storage[0]
        shape = (out.n_layer, B, ref.size(2), _capacity(S), ref.size(4))
        k, v = ref.new_zeros(shape), ref.new_zeros(shape)
        row = 0
        for c in parts:
            ck, cv = c.storage
            n, b = c.seq_len, c.batch_size
            k[:, row : row + b, :, S - n : S] = ck[:, :, :, :n]
            v[:, row : row + b, :, S - n : S] = cv[:, :, :, :n]
            row += b
        out._tail_zero = True
        out._adopt(k, v, [S] * out.n_layer)
        return out


DecodeCache = BatchKVCache | RecurrentState
"""What a batch of sequences decodes with: a KV cache, or a recurrent model's state."""


def new_cache(model: DecodingModel, kv_dtype: torch.dtype | None = None) -> DecodeCache:
    """An empty decode cache for `model`: its own recurrent state, else a `BatchKVCache` storing
    `kv_dtype` (None: the model's own)."""
    if isinstance(model, RecurrentLanguageModel):
        return model.new_state()
    return BatchKVCache(model.n_layer, kv_dtype)


def concat_caches(caches: Sequence[DecodeCache]) -> DecodeCache:
    """Stack non-empty caches of one kind along the batch (see `BatchKVCache.concat`)."""
    if all(isinstance(c, BatchKVCache) for c in caches):
        return BatchKVCache.concat([c for c in caches if isinstance(c, BatchKVCache)])
    states = [c for c in caches if isinstance(c, RecurrentState)]
    if states and len(states) == len(caches):
        return type(states[0]).concat(states)
    raise ModelError("cannot concat KV caches with recurrent states")


def forward_cached(
    model: DecodingModel,
    idx: torch.Tensor,
    cache: DecodeCache,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    last_only: bool = False,
) -> torch.Tensor:
    """Logits (B, T, V) of `idx` continuing `cache` (which the call extends); (B, 1, V) of the
    last position with `last_only` (a recurrent model's (B, T, V) is cheap: sliced). positions
    and attention_mask: a KV cache's left padding; a recurrent state has none and ignores them."""
    if isinstance(model, RecurrentLanguageModel):
        if not isinstance(cache, RecurrentState):
            raise ModelError(f"a recurrent model decodes with its own state, not {cache!r}")
        logits = model(idx, kv_cache=cache)
        return logits[:, -1:] if last_only else logits
    if not isinstance(cache, KVCache):
        raise ModelError(f"a KV-cache language model cannot decode with {cache!r}")
    return model(
        idx,
        kv_cache=cache,
        positions=positions,
        attention_mask=attention_mask,
        last_only=last_only,
    )
