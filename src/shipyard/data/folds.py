"""Seeded k-fold assignment of rows: stratified by class, grouped by a column, or plain.

`fold_ids(n, k, seed, labels=..., groups=...)` gives every row a fold in 0..k-1. The same seed and
rows always give the same folds. Stratified: each class is spread over the folds as evenly as its
count allows (scikit-learn's StratifiedKFold). Grouped: rows sharing a group land in one fold
(whole groups are dealt out, largest first, to the fold with the fewest rows; ties broken by a
seeded shuffle); with labels too, scikit-learn's StratifiedGroupKFold balances classes as well.
"""

from __future__ import annotations

import numpy as np

from shipyard.errors import DataError


def fold_ids(
    n: int,
    k: int,
    seed: int,
    *,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """(n,) int64 fold of each row; `labels` (class ids) stratify, `groups` keep rows together."""
    # Imported here, not at the top: scikit-learn (with SciPy) takes ~1.5 s to import, and every
    # process that imports shipyard.data (each torchrun worker, each CLI verb) would pay it.
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    if k < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {k}")
    if n < k:
        raise DataError(f"{k} folds need at least {k} rows in train+val, but there are {n}")
    out = np.full(n, -1, dtype=np.int64)
    rows = np.zeros((n, 1))
    if groups is not None:
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise DataError(
                f"{k} folds need at least {k} distinct groups in data.group_column, but train+val "
                f"has {n_groups}; use --folds {max(n_groups, 2)} or a finer group column"
            )
        if labels is not None:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            for fold, (_, held) in enumerate(splitter.split(rows, labels, groups)):
                out[held] = fold
            return out
        return _group_folds(groups, k, seed)
    if labels is not None:
        counts = np.bincount(np.asarray(labels, dtype=np.int64))
        smallest = int(counts[counts > 0].min())
        if smallest < k:
            raise DataError(
                f"stratified {k}-fold cross-validation needs at least {k} rows of every class, but "
                f"one class has {smallest} in train+val; use fewer folds or --no-stratify"
            )
        strat = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for fold, (_, held) in enumerate(strat.split(rows, labels)):
            out[held] = fold
        return out
    for fold, (_, held) in enumerate(
        KFold(n_splits=k, shuffle=True, random_state=seed).split(rows)
    ):
        out[held] = fold
    return out


def _group_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, seeded tie-break
    fold_of_group = np.empty(len(names), dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for g in order:
        fold = int(np.argmin(load))
        fold_of_group[g] = fold
        load[fold] += sizes[g]
    return fold_of_group[inverse]
