"""In-memory datasets of (x, y) tensors, cheap to index by single rows or by batches of indices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Rows of `x` (N, *input_shape) and `y` (N,) class ids or (N, k) regression targets.

    x is float32 for features/pixels, int64 for token sequences (padded with id 0); y is int64 for
    classification and float32 (N, k) for regression — k = 1 still gives (N, 1).
    `x` and `y` are public so a trainer can index whole batches: `ds.x[idx]` or `ds.get_batch(idx)`.
    """

    def __init__(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> None:
        self.x = torch.as_tensor(x)
        self.y = torch.as_tensor(y)
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def get_batch(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at `indices`, stacked: (B, *input_shape) and (B,) / (B, k)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.x[idx], self.y[idx]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype}, "
            f"y={tuple(self.y.shape)} {self.y.dtype})"
        )


class PackedDataset(ArrayDataset):
    """Token rows that each hold several whole examples (`data.packing`): `segments` (N, T)
    numbers the examples along each row (padding after the last one is its own run), so a model
    called with `segments=` keeps attention and positions inside each example."""

    def __init__(
        self,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray,
        segments: torch.Tensor | np.ndarray,
    ) -> None:
        super().__init__(x, y)
        self.segments = torch.as_tensor(segments)
        if self.segments.shape != self.x.shape:
            raise ValueError(
                f"segments {tuple(self.segments.shape)} must have the shape of x "
                f"{tuple(self.x.shape)}"
            )


def segments_of(dataset: Any, idx: torch.Tensor) -> torch.Tensor | None:
    """The segment ids of rows `idx` of a packed dataset, or None for one example per row."""
    segments = getattr(dataset, "segments", None)
    return None if segments is None else segments[idx]


def gather(dataset: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `idx` of a dataset as one (x, y) batch: direct tensor indexing where the dataset
    allows it (ArrayDataset, TokenWindows), else stacking its items."""
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        return dataset.x[idx], dataset.y[idx]
    get_batch = getattr(dataset, "get_batch", None)
    if get_batch is not None:
        x, y = get_batch(idx)
        return x, y
    items = [dataset[int(i)] for i in idx]
    return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
