"""Cross-validation folds: stratified, grouped, seeded, disjoint; the test split never moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shipyard.data import DataConfig, prepare_data
from shipyard.data.config import FoldsConfig
from shipyard.data.folds import fold_ids
from shipyard.errors import ConfigError, DataError
from shipyard.tuning import summarize


def test_stratified_folds_keep_each_class_share_and_repeat_for_a_seed() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    folds = fold_ids(100, 5, seed=3, labels=labels)
    assert sorted(np.bincount(folds).tolist()) == [20] * 5  # every row in exactly one fold
    for f in range(5):  # 10 / 6 / 4 of each class per fold: the exact shares
        assert np.bincount(labels[folds == f], minlength=3).tolist() == [10, 6, 4]
    assert np.array_equal(folds, fold_ids(100, 5, seed=3, labels=labels))
    assert not np.array_equal(folds, fold_ids(100, 5, seed=4, labels=labels))


def test_grouped_folds_never_split_a_group() -> None:
    groups = np.array([f"g{i % 13}" for i in range(200)], dtype=object)
    folds = fold_ids(200, 4, seed=0, groups=groups)
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1
    assert set(folds.tolist()) == {0, 1, 2, 3}
    assert np.array_equal(folds, fold_ids(200, 4, seed=0, groups=groups))
    # with labels too (StratifiedGroupKFold): still whole groups
    labels = np.array([i % 2 for i in range(200)])
    both = fold_ids(200, 4, seed=0, labels=labels, groups=groups)
    for g in np.unique(groups):
        assert len(set(both[groups == g].tolist())) == 1


def test_fold_errors_name_the_fix() -> None:
    with pytest.raises(DataError, match="at least 3 distinct groups"):
        fold_ids(10, 3, seed=0, groups=np.array(["a", "b"] * 5, dtype=object))
    with pytest.raises(DataError, match="at least 5 rows of every class"):
        fold_ids(20, 5, seed=0, labels=np.array([0] * 17 + [1] * 3))
    with pytest.raises(DataError, match="need at least 4 rows"):
        fold_ids(3, 4, seed=0)
    with pytest.raises(ConfigError, match="out of range for k=3"):
        from shipyard.config import load_config

        load_config(
            {
                "name": "x",
                "task": "classification",
                "data": {"source": "builtin:digits", "folds": {"k": 3, "index": 3}},
                "model": {"name": "mlp"},
            }
        )


def test_digits_folds_partition_train_val_and_never_touch_test() -> None:
    raw = prepare_data(
        DataConfig(source="builtin:digits", preprocessing="none"), "classification", 0
    )
    pooled = np.concatenate([raw.train.x.numpy(), raw.val.x.numpy()])  # type: ignore[union-attr]
    pool_counts = np.bincount(np.concatenate([raw.train.y.numpy(), raw.val.y.numpy()]))  # type: ignore[union-attr]
    seen: list[bytes] = []
    for i in range(5):
        cfg = DataConfig(
            source="builtin:digits", preprocessing="none", folds=FoldsConfig(k=5, index=i)
        )
        fold = prepare_data(cfg, "classification", seed=0)
        assert fold.test is None  # a fold run never loads the test split
        val = fold.val.x.numpy()  # type: ignore[union-attr]
        train = fold.train.x.numpy()  # type: ignore[union-attr]
        assert len(val) + len(train) == len(pooled)
        counts = np.bincount(fold.val.y.numpy(), minlength=10)  # type: ignore[union-attr]
        # stratified: each digit's count is its train+val count / 5, rounded down or up
        assert np.all(np.abs(counts - pool_counts / 5) < 1), (counts, pool_counts / 5)
        seen += [r.tobytes() for r in val.reshape(len(val), -1)]
    # the five validation folds are disjoint and cover exactly the rows of train+val, none of
    # test (compared as multisets of raw rows: digits has duplicate images)
    assert sorted(seen) == sorted(r.tobytes() for r in pooled.reshape(len(pooled), -1))
    # the final run trains on the whole pool and keeps the very same test rows
    final = prepare_data(
        DataConfig(
            source="builtin:digits", preprocessing="none", folds=FoldsConfig(k=5, index=None)
        ),
        "classification",
        0,
    )
    assert final.val is None and len(final.train) == len(pooled)  # type: ignore[arg-type]
    assert np.array_equal(final.test.x.numpy(), raw.test.x.numpy())  # type: ignore[union-attr]
    assert np.array_equal(final.test.y.numpy(), raw.test.y.numpy())  # type: ignore[union-attr]


def test_group_column_comes_from_the_csv_and_is_not_a_feature(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    lines = ["patient,a,b,target"]
    for i in range(60):
        lines.append(f"p{i % 12},{i},{i * 2},{'yes' if i % 3 else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    patients = {f"p{i}" for i in range(12)}
    held: list[set[str]] = []
    for i in range(3):
        cfg = DataConfig(
            source=str(path),
            target="target",
            group_column="patient",
            preprocessing="none",
            folds=FoldsConfig(k=3, index=i),
        )
        data = prepare_data(cfg, "classification", seed=1)
        assert data.info.feature_names == ["a", "b"]
        val_a = data.val.x[:, 0].numpy().astype(int)  # type: ignore[union-attr]
        train_a = data.train.x[:, 0].numpy().astype(int)
        val_patients = {f"p{a % 12}" for a in val_a}
        assert not val_patients & {f"p{a % 12}" for a in train_a}  # no patient on both sides
        held.append(val_patients)
    assert set().union(*held) <= patients and sum(len(h) for h in held) == len(set().union(*held))
    with pytest.raises(DataError, match="group_column 'patient' needs a CSV"):
        prepare_data(
            DataConfig(
                source="builtin:digits", group_column="patient", folds=FoldsConfig(k=3, index=0)
            ),
            "classification",
            0,
        )


def test_summarize_mean_and_sample_std_by_hand() -> None:
    folds = [
        {"accuracy": 0.9, "loss": 0.3, "per_class": {}},
        {"accuracy": 0.8, "loss": 0.5},
        {"accuracy": 1.0, "loss": 0.1},
    ]
    mean, std = summarize(folds)
    assert mean == pytest.approx({"accuracy": 0.9, "loss": 0.3})
    # sample std: sqrt(((0)^2 + 0.1^2 + 0.1^2) / 2) = 0.1 ; loss: sqrt((0 + .04 + .04) / 2) = 0.2
    assert std == pytest.approx({"accuracy": 0.1, "loss": 0.2})
    assert summarize([{"accuracy": 0.5}]) == ({"accuracy": 0.5}, {"accuracy": 0.0})


def test_instruction_data_refuses_folds(tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = DataConfig(source=str(chats), format="chat", folds=FoldsConfig(k=3, index=0))
    with pytest.raises(DataError, match=r"data\.folds\) works for classification"):
        prepare_data(config, "language-modeling", 0, block_size=8)
