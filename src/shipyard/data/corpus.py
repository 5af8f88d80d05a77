"""Language-model corpora: tokenize once into a memory-mapped token file, then serve windows.

The token file of a split lives in the cache directory under a name that is the SHA-256 of (the
split's documents + the tokenizer JSON), so the same text with the same tokenizer is tokenized once
and reused. Files are written to a temporary name and renamed, so a crash never leaves a partial
file under the final name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import DataError
from shipyard.fileio import atomic_write


def default_cache_dir() -> Path:
    """`$SHIPYARD_HOME/cache/tokens` (SHIPYARD_HOME defaults to ~/.shipyard)."""
    home = Path(os.environ.get("SHIPYARD_HOME", "~/.shipyard")).expanduser()
    return home / "cache" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 - 1 else np.dtype(np.uint32)


def corpus_key(docs: Sequence[str], tokenizer: Tokenizer) -> str:
    """SHA-256 of the documents and the tokenizer: the token file's name."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(tokenizer.to_json().encode("utf-8")).digest())
    for doc in docs:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()


def tokenize_to_file(docs: Sequence[str], tokenizer: Tokenizer, cache_dir: Path) -> np.ndarray:
    """Token ids of `docs` (each followed by eos) as a read-only memmap, cached in `cache_dir`."""
    dtype = token_dtype(tokenizer.vocab_size)
    path = Path(cache_dir) / f"{corpus_key(docs, tokenizer)}.{dtype.name}"
    if not path.exists():
        tokens = tokenizer.encode_documents(docs).astype(dtype)
        atomic_write(path, tokens.tobytes())
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of a token stream: item i = (tokens[s : s+T], tokens[s+1 : s+T+1]), s = i·stride.

    Both are int64 tensors of shape (T,) with T = block_size; `len` counts full windows only.
    A memmap is re-opened (not copied) when the dataset is pickled into DataLoader workers.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int | None = None) -> None:
        if block_size < 1:
            raise DataError(f"block_size must be ≥ 1, got {block_size}")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = block_size if stride is None else stride
        if self.stride < 1:
            raise DataError(f"stride must be ≥ 1, got {self.stride}")

    def __len__(self) -> int:
        n = len(self.tokens) - self.block_size - 1
        return 0 if n < 0 else n // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        s = i * self.stride
        chunk = torch.from_numpy(np.asarray(self.tokens[s : s + self.block_size + 1], np.int64))
        return chunk[:-1], chunk[1:]

    def get_batch(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at `indices`, stacked: x and y of shape (B, block_size), int64."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"window index out of range for {n} windows")
        starts = np.where(idx < 0, idx + n, idx) * self.stride
        rows = starts[:, None] + np.arange(self.block_size + 1)[None, :]  # (B, T+1)
        chunk = torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        tokens = self.tokens
        if isinstance(tokens, np.memmap) and tokens.filename is not None:
            state["tokens"] = ("memmap", str(tokens.filename), tokens.dtype.str, tokens.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, shape = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape)
        self.__dict__.update(state)
