"""A KV cache for continuous batching: preallocated, left-padded, rows can leave and join.

A language model treats it like the plain `KVCache` (it only calls `seq_len` and `append`), but
appends write into spare capacity instead of concatenating, so a decode step copies nothing.
Rows leave (`select`) and join (`concat`) between steps; both copy the cache once, which is
cheap next to the decode steps in between.

Layout: every row ends at the same slot (the batch's `seq_len`); a row with fewer tokens is
padded on the left. The engine keeps each row's padding and masks those slots.

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

_ALIGN = 64  # capacity grows in multiples of this many slots


def _capacity(needed: int) -> int:
    """Slots to allocate for `needed` ones: a quarter (at least 64) spare, rounded up."""
    spare = max(_ALIGN, needed // 4)
    return -(-(needed + spare) // _ALIGN) * _ALIGN


class BatchKVCache(KVCache):
    """Left-padded batch KV cache with spare capacity; keys/values are (B, nh, S, hs) views."""

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self._kbuf: list[torch.Tensor | None] = [None] * n_layer  # (B, nh, capacity, hs)
        self._vbuf: list[torch.Tensor | None] = [None] * n_layer
        self._len = [0] * n_layer

    @property
    def seq_len(self) -> int:
        """Number of cached slots (every row has this many, padding included)."""
        return self._len[0]

    @property
    def batch_size(self) -> int:
        """Number of rows (0 while empty)."""
        k = self._kbuf[0]
        return 0 if k is None else k.size(0)

    @property
    def capacity(self) -> int:
        """Slots allocated per row."""
        k = self._kbuf[0]
        return 0 if k is None else k.size(2)

    def _set(self, layer: int, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
        self._kbuf[layer], self._vbuf[layer], self._len[layer] = kbuf, vbuf, length
        self.keys[layer] = kbuf[:, :, :length]  # (B, nh, length, hs)
        self.values[layer] = vbuf[:, :, :length]

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new (B, nh, T, hs) keys/values after the cached ones; return all (B, nh, S, hs)."""
        n, T = self._len[layer], k.size(2)
        kbuf, vbuf = self._kbuf[layer], self._vbuf[layer]
        if kbuf is None or vbuf is None or n + T > kbuf.size(2):
            B, nh, _, hs = k.shape
            # Uninitialised: slots past the length are written before anything reads them, and
            # zeroing a fresh buffer costs ~0.7 ms per prefill (page faults on 12 buffers).
            new_k = k.new_empty(B, nh, _capacity(n + T), hs)
            new_v = v.new_empty(B, nh, _capacity(n + T), hs)
            if kbuf is not None and vbuf is not None:
                new_k[:, :, :n] = kbuf[:, :, :n]
                new_v[:, :, :n] = vbuf[:, :, :n]
            kbuf, vbuf = new_k, new_v
        elif kbuf.size(0) != k.size(0):
            raise ModelError(f"KV cache holds {kbuf.size(0)} rows but got {k.size(0)}")
        kbuf[:, :, n : n + T] = k
        vbuf[:, :, n : n + T] = v
        self._set(layer, kbuf, vbuf, n + T)
        return kbuf[:, :, : n + T], vbuf[:, :, : n + T]  # (B, nh, S, hs)

    def select(self, rows: Sequence[int], drop_left: int = 0) -> None:
        """Keep `rows` (in that order) and drop the first `drop_left` slots of every row.

        Only drop slots that are padding in every kept row.
        """
        for layer in range(self.n_layer):
            kbuf, vbuf = self._kbuf[layer], self._vbuf[layer]
            if kbuf is None or vbuf is None:
                continue
            n = self._len[layer]
            idx = torch.as_tensor(list(rows), dtype=torch.long, device=kbuf.device)
            length = n - drop_left
            new_k = kbuf.new_zeros(len(idx), kbuf.size(1), _capacity(length), kbuf.size(3))
            new_v = torch.zeros_like(new_k)
            new_k[:, :, :length] = kbuf[:, :, drop_left:n].index_select(0, idx)
            new_v[:, :, :length] = vbuf[:, :, drop_left:n].index_select(0, idx)
            self._set(layer, new_k, new_v, length)

    @classmethod
    def concat(cls, caches: Sequence[BatchKVCache]) -> BatchKVCache:
        """Stack non-empty caches along the batch, each left-padded to the longest."""
        parts = [c for c in caches if c.batch_size > 0]
        if not parts:
            raise ModelError("concat needs at least one non-empty cache")
        out = cls(parts[0].n_layer)
        S = max(c.seq_len for c in parts)
        B = sum(c.batch_size for c in parts)
        for layer in range(out.n_layer):
            ref = parts[0]._kbuf[layer]
            assert ref is not None
            new_k = ref.new_zeros(B, ref.size(1), _capacity(S), ref.size(3))
            new_v = torch.zeros_like(new_k)
            row = 0
            for c in parts:
                kbuf, vbuf, n = c._kbuf[layer], c._vbuf[layer], c._len[layer]
                assert kbuf is not None and vbuf is not None
                b = kbuf.size(0)
                new_k[row : row + b, :, S - n : S] = kbuf[:, :, :n]
                new_v[row : row + b, :, S - n : S] = vbuf[:, :, :n]
                row += b
            out._set(layer, new_k, new_v, S)
        return out


DecodeCache = BatchKVCache | RecurrentState
"""What a batch of sequences decodes with: a KV cache, or a recurrent model's state."""


def new_cache(model: DecodingModel) -> DecodeCache:
    """An empty decode cache for `model`: its own recurrent state, else a `BatchKVCache`."""
    if isinstance(model, RecurrentLanguageModel):
        return model.new_state()
    return BatchKVCache(model.n_layer)


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
) -> torch.Tensor:
    """Logits (B, T, V) of `idx` continuing `cache` (which the call extends). positions and
    attention_mask: a KV cache's left padding; a recurrent state has none and ignores them."""
    if isinstance(model, RecurrentLanguageModel):
        if not isinstance(cache, RecurrentState):
            raise ModelError(f"a recurrent model decodes with its own state, not {cache!r}")
        return model(idx, kv_cache=cache)
    if not isinstance(cache, KVCache):
        raise ModelError(f"a KV-cache language model cannot decode with {cache!r}")
    return model(idx, kv_cache=cache, positions=positions, attention_mask=attention_mask)
