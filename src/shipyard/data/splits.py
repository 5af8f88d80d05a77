"""Seeded, reproducible train/val/test splits of rows and of text documents.

Sizes: val and test get round(n × ratio) items, at least one when their ratio is > 0; train gets the
rest. A split with ratio > 0 that would still be empty is a DataError.

Text corpora: with ≥ 3 documents the split is by whole documents (seeded shuffle when
`data.shuffle`), so no file is shared between splits. With fewer, the documents are joined with a
newline and cut into contiguous character ranges (train first, then val, then test).
"""

from __future__ import annotations

import numpy as np

from shipyard.data.config import SplitRatios
from shipyard.errors import DataError

SPLITS = ("train", "val", "test")
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 3


def split_sizes(n: int, ratios: SplitRatios, what: str = "rows") -> dict[str, int]:
    """How many of `n` items go to each split; DataError if a requested split would be empty."""
    sizes = {}
    for name in ("val", "test"):
        ratio = getattr(ratios, name)
        sizes[name] = max(1, round(n * ratio)) if ratio > 0 else 0
    sizes = {"train": n - sizes["val"] - sizes["test"], **sizes}
    for name in SPLITS:
        if getattr(ratios, name) > 0 and sizes[name] <= 0:
            raise DataError(
                f"split {name!r} would be empty: {n} {what} with ratios train={ratios.train:g}, "
                f"val={ratios.val:g}, test={ratios.test:g} give train={max(sizes['train'], 0)}, "
                f"val={sizes['val']}, test={sizes['test']}; add {what} or set data.splits"
            )
    return sizes


def split_indices(
    n: int, ratios: SplitRatios, seed: int, shuffle: bool = True, what: str = "rows"
) -> dict[str, np.ndarray]:
    """Row indices of each non-empty split; the same `seed` always gives the same split."""
    sizes = split_sizes(n, ratios, what)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name in SPLITS:
        if sizes[name] > 0:
            out[name] = order[start : start + sizes[name]]
        start += sizes[name]
    return out


def split_documents(
    docs: list[str], ratios: SplitRatios, seed: int, shuffle: bool = True
) -> dict[str, list[str]]:
    """Documents of each non-empty split (by document, or by character range; see module doc)."""
    if len(docs) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
        idx = split_indices(len(docs), ratios, seed, shuffle, what="documents")
        return {name: [docs[i] for i in ix.tolist()] for name, ix in idx.items()}
    text = "\n".join(docs)
    sizes = split_sizes(len(text), ratios, what="characters")
    out: dict[str, list[str]] = {}
    start = 0
    for name in SPLITS:
        if sizes[name] > 0:
            out[name] = [text[start : start + sizes[name]]]
        start += sizes[name]
    return out
