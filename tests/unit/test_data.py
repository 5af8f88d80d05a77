"""Data layer: sources, seeded splits, preprocessing fitted on train only, DataInfo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shipyard.data import (
    ArrayDataset,
    DataConfig,
    DataInfo,
    Preprocessor,
    SplitRatios,
    TokenWindows,
    prepare_data,
)
from shipyard.data.sources import load_python_stdlib, stdlib_files
from shipyard.data.splits import split_documents, split_indices


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- builtins -------------------------------------------------------------------------------------


def test_digits_shapes_and_classes() -> None:
    data = prepare_data(DataConfig(source="builtin:digits"), "classification", seed=0)
    info = data.info
    assert info.input_shape == (1, 8, 8)
    assert info.num_outputs == 10
    assert info.class_names == [str(i) for i in range(10)]
    assert info.split_sizes == {"train": 1437, "val": 180, "test": 180}
    assert sum(info.split_sizes.values()) == 1797
    assert isinstance(data.train, ArrayDataset)
    x, y = data.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y) < 10
    assert data.train.x.shape == (1437, 1, 8, 8)
    assert data.train.y.shape == (1437,)
    xb, yb = data.train.get_batch([0, 5, 7])
    assert torch.equal(xb[1], data.train[5][0]) and torch.equal(yb, data.train.y[[0, 5, 7]])
    # Standardized on train: mean 0, std 1 over the train pixels (one channel).
    assert abs(float(data.train.x.mean())) < 1e-4
    assert abs(float(data.train.x.std()) - 1) < 1e-3


def test_data_info_json_round_trip() -> None:
    info = prepare_data(DataConfig(source="builtin:digits"), "classification", seed=0).info
    text = json.dumps(info.to_dict())
    assert DataInfo.from_dict(json.loads(text)) == info
    assert len(info.fingerprint) == 64


def test_synthetic_regression_deterministic() -> None:
    config = DataConfig(source="builtin:synthetic-regression", n_samples=200, n_features=3)
    a = prepare_data(config, "regression", seed=7)
    b = prepare_data(config, "regression", seed=7)
    c = prepare_data(config, "regression", seed=8)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert a.info.fingerprint == b.info.fingerprint != c.info.fingerprint
    assert not torch.equal(a.train.y, c.train.y)
    assert a.train.y.shape == (160, 1) and a.train.y.dtype == torch.float32
    assert a.info.input_shape == (3,) and a.info.num_outputs == 1
    assert a.info.feature_names == ["x0", "x1", "x2"]


def test_python_stdlib_deterministic_and_filtered() -> None:
    files = stdlib_files()
    rel = [p.as_posix() for p in files]
    assert files and all(p.suffix == ".py" for p in files)
    assert not any("/site-packages/" in p or "/test/" in p or "/tests/" in p for p in rel)
    assert not any("/idle_test/" in p or "_sysconfigdata" in p for p in rel)
    first = load_python_stdlib(max_documents=None, max_chars=20_000)
    second = load_python_stdlib(max_documents=None, max_chars=20_000)
    assert first == second
    assert sum(len(d) for d in first) == 20_000
    assert len(load_python_stdlib(max_documents=3, max_chars=None)) == 3


# -- splits ---------------------------------------------------------------------------------------


def test_splits_reproducible_per_seed() -> None:
    ratios = SplitRatios(train=0.6, val=0.2, test=0.2)
    a = split_indices(100, ratios, seed=1)
    b = split_indices(100, ratios, seed=1)
    c = split_indices(100, ratios, seed=2)
    for name in ("train", "val", "test"):
        assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a["train"], c["train"])
    assert {k: len(v) for k, v in a.items()} == {"train": 60, "val": 20, "test": 20}
    together = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(together.tolist()) == list(range(100))  # a partition: no row in two splits


def test_prepared_splits_reproducible_per_seed() -> None:
    config = DataConfig(source="builtin:digits")
    a = prepare_data(config, "classification", seed=3)
    b = prepare_data(config, "classification", seed=3)
    c = prepare_data(config, "classification", seed=4)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.val.x, c.val.x)


def test_split_without_shuffle_is_contiguous() -> None:
    idx = split_indices(10, SplitRatios(train=0.8, val=0.2, test=0.0), seed=5, shuffle=False)
    assert idx["train"].tolist() == list(range(8))
    assert idx["val"].tolist() == [8, 9]
    assert "test" not in idx


def test_text_split_by_documents_or_characters() -> None:
    ratios = SplitRatios(train=0.5, val=0.25, test=0.25)
    docs = [f"doc{i}" for i in range(8)]
    by_doc = split_documents(docs, ratios, seed=0)
    assert sorted(d for split in by_doc.values() for d in split) == sorted(docs)
    assert {k: len(v) for k, v in by_doc.items()} == {"train": 4, "val": 2, "test": 2}
    assert by_doc == split_documents(docs, ratios, seed=0)
    by_chars = split_documents(["abcdefgh"], ratios, seed=0)
    assert by_chars == {"train": ["abcd"], "val": ["ef"], "test": ["gh"]}


# -- preprocessing fitted on train only -----------------------------------------------------------


def test_preprocessing_statistics_come_from_train_rows_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(50, 3)).astype(np.float32)
    y = np.arange(50) % 2
    ratios = SplitRatios(train=0.6, val=0.2, test=0.2)
    split = split_indices(50, ratios, seed=11)
    poisoned = x.copy()
    poisoned[split["val"]] = 1e6  # any leak of val/test rows would wreck mean and std
    poisoned[split["test"]] = -1e6
    np.savez(tmp_path / "d.npz", x=poisoned, y=y)

    data = prepare_data(
        DataConfig(source=str(tmp_path / "d.npz"), splits=ratios), "classification", seed=11
    )
    pre = data.preprocessor
    assert pre is not None and pre.offset is not None and pre.scale is not None
    train_rows = x[split["train"]].astype(np.float64)
    np.testing.assert_allclose(pre.offset, train_rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(pre.scale, train_rows.std(axis=0), rtol=1e-6)
    assert torch.allclose(data.train.x.mean(0), torch.zeros(3), atol=1e-5)
    assert float(data.val.x.min()) > 1e4


def test_preprocessing_with_explicit_split_files_fits_train_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["a", "target"], [[1, 0], [3, 1], [5, 0], [7, 1]])
    write_csv(tmp_path / "val.csv", ["a", "target"], [[1000, 0], [3000, 1]])
    config = DataConfig(
        files={"train": str(tmp_path / "train.csv"), "val": str(tmp_path / "val.csv")},
        preprocessing="minmax",
    )
    data = prepare_data(config, "classification", seed=0)
    assert data.preprocessor is not None
    assert data.preprocessor.offset.tolist() == [1.0]
    assert data.preprocessor.scale.tolist() == [6.0]
    assert data.train.x[:, 0].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert data.val.x[:, 0].tolist() == pytest.approx([999 / 6, 2999 / 6])
    assert data.test is None and data.info.split_sizes == {"train": 4, "val": 2}


def test_target_scaling_and_inverse(tmp_path: Path) -> None:
    rows = [[i, 10.0 * i + 100] for i in range(20)]
    write_csv(tmp_path / "r.csv", ["a", "y"], rows)
    config = DataConfig(
        source=str(tmp_path / "r.csv"),
        target="y",
        target_scaling="standardize",
        splits=SplitRatios(train=0.5, val=0.5, test=0.0),
        shuffle=False,
    )
    data = prepare_data(config, "regression", seed=0)
    pre = data.preprocessor
    assert pre is not None
    train_y = np.array([10.0 * i + 100 for i in range(10)])
    assert pre.target_mean.tolist() == pytest.approx([train_y.mean()])
    assert pre.target_std.tolist() == pytest.approx([train_y.std()])
    restored = pre.inverse_transform_target(data.val.y)
    assert restored[:, 0].tolist() == pytest.approx([10.0 * i + 100 for i in range(10, 20)])


def test_preprocessor_dict_round_trip() -> None:
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]], dtype=np.float32)
    pre = Preprocessor("standardize", class_names=["a", "b"], feature_names=["f", "g"]).fit(x)
    assert pre.scale is not None and pre.scale[1] == 1.0  # constant column: std 0 → 1
    d = json.loads(json.dumps(pre.to_dict()))
    again = Preprocessor.from_dict(d)
    np.testing.assert_array_equal(again.transform(x), pre.transform(x))
    assert torch.equal(again.transform(torch.from_numpy(x)), torch.from_numpy(pre.transform(x)))
    assert again.class_names == ["a", "b"] and again.feature_names == ["f", "g"]


# -- user files -----------------------------------------------------------------------------------


def test_csv_string_labels_are_encoded(tmp_path: Path) -> None:
    rows = [[i, i * 2, "dog" if i % 3 else "cat"] for i in range(12)]
    write_csv(tmp_path / "pets.csv", ["a", "b", "kind"], rows)
    config = DataConfig(
        source=str(tmp_path / "pets.csv"),
        target="kind",
        preprocessing="none",
        shuffle=False,
        splits=SplitRatios(train=0.5, val=0.25, test=0.25),
    )
    data = prepare_data(config, "classification", seed=0)
    assert data.info.class_names == ["cat", "dog"]
    assert data.info.feature_names == ["a", "b"]
    assert data.train.x[:3].tolist() == [[0, 0], [1, 2], [2, 4]]
    assert data.train.y.tolist() == [0, 1, 1, 0, 1, 1]


def test_numeric_labels_sort_by_value(tmp_path: Path) -> None:
    write_csv(tmp_path / "n.csv", ["a", "target"], [[i, [2, 10, 1][i % 3]] for i in range(9)])
    data = prepare_data(DataConfig(source=str(tmp_path / "n.csv")), "classification", seed=0)
    assert data.info.class_names == ["1", "2", "10"]


def test_jsonl_regression_with_feature_subset(tmp_path: Path) -> None:
    lines = [json.dumps({"a": i, "b": -i, "note": "x", "price": 2.5 * i}) for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    config = DataConfig(
        source=str(tmp_path / "d.jsonl"),
        features=["a", "b"],
        target="price",
        preprocessing="none",
        shuffle=False,
    )
    data = prepare_data(config, "regression", seed=0)
    assert data.info.feature_names == ["a", "b"] and data.info.input_shape == (2,)
    assert data.train.x[:2].tolist() == [[0, 0], [1, -1]]
    assert data.train.y[:2].tolist() == [[0.0], [2.5]]


def test_npz_source_with_multi_output_target(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    np.savez(tmp_path / "d.npz", X=x, target=np.stack([x[:, 0], x[:, 1] * 2], axis=1))
    data = prepare_data(DataConfig(source=str(tmp_path / "d.npz")), "regression", seed=0)
    assert data.info.num_outputs == 2 and data.train.y.shape == (16, 2)
    assert data.train.x.dtype == torch.float32


def test_text_column_sequence_classification(tmp_path: Path) -> None:
    rows = [["hi", "pos"], ["a much longer sentence", "neg"], ["ok", "pos"], ["no!", "neg"]]
    write_csv(tmp_path / "t.csv", ["text", "label"], rows)
    config = DataConfig(
        source=str(tmp_path / "t.csv"),
        text_column="text",
        target="label",
        tokenizer={"kind": "byte"},
        splits=SplitRatios(train=0.5, val=0.5, test=0.0),
        shuffle=False,
    )
    data = prepare_data(config, "classification", seed=0, block_size=6)
    tok = data.tokenizer
    assert tok is not None and data.info.input_shape == (6,) and data.info.vocab_size == 258
    assert data.train.x.dtype == torch.int64
    assert data.train.x[0].tolist() == [*tok.encode("hi"), 0, 0, 0, 0]  # padded with id 0
    assert data.train.x[1].tolist() == tok.encode("a much")  # truncated to block_size
    assert data.info.class_names == ["neg", "pos"] and data.train.y.tolist() == [1, 0]


def _write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)  # size is (width, height)


def test_image_folder(tmp_path: Path) -> None:
    for i in range(4):
        _write_image(tmp_path / "imgs" / "red" / f"{i}.png", (4, 6), (255, 0, 0))
        _write_image(tmp_path / "imgs" / "blue" / f"{i}.png", (4, 6), (0, 0, 255))
    config = DataConfig(
        source=str(tmp_path / "imgs"),
        preprocessing="none",
        splits=SplitRatios(train=0.5, val=0.5, test=0.0),
    )
    data = prepare_data(config, "classification", seed=0)
    assert data.info.input_shape == (3, 6, 4) and data.info.class_names == ["blue", "red"]
    for x, y in (data.train[i] for i in range(len(data.train))):
        channel = 2 if int(y) == 0 else 0
        assert torch.all(x[channel] == 1.0) and float(x.sum()) == 24.0
    gray = prepare_data(
        config.model_copy(update={"grayscale": True, "image_size": (5, 5)}), "classification", 0
    )
    assert gray.info.input_shape == (1, 5, 5) and gray.train.x.shape[1:] == (1, 5, 5)


# -- text corpora ---------------------------------------------------------------------------------


def test_text_glob_corpus_for_language_modeling(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}: " + "héllo wörld " * 5)
    config = DataConfig(
        source=str(tmp_path / "doc*.txt"),
        tokenizer={"kind": "byte"},
        splits=SplitRatios(train=0.6, val=0.2, test=0.2),
    )
    data = prepare_data(config, "language-modeling", seed=0, block_size=8, cache_dir=tmp_path)
    assert data.info.input_shape == (8,) and data.info.num_outputs == 258
    assert data.info.class_names is None and data.preprocessor is None
    assert isinstance(data.train, TokenWindows) and data.train.stride == 1  # random sampling
    assert isinstance(data.val, TokenWindows) and data.val.stride == 8
    per_doc = len(("document number 0: " + "héllo wörld " * 5).encode()) + 1  # bytes + eos
    assert data.info.split_sizes == {"train": 3 * per_doc, "val": per_doc, "test": per_doc}
    sequential = config.model_copy(update={"sampling": "sequential"})
    seq = prepare_data(sequential, "language-modeling", 0, block_size=8, cache_dir=tmp_path)
    assert isinstance(seq.train, TokenWindows) and seq.train.stride == 8


def test_python_stdlib_language_modeling_is_deterministic(tmp_path: Path) -> None:
    config = DataConfig(
        source="builtin:python-stdlib", max_chars=30_000, tokenizer={"kind": "byte"}
    )
    a = prepare_data(config, "language-modeling", seed=0, block_size=32, cache_dir=tmp_path)
    b = prepare_data(config, "language-modeling", seed=0, block_size=32, cache_dir=tmp_path)
    assert a.info == b.info
    assert torch.equal(a.train[100][0], b.train[100][0])
    assert isinstance(a.train, TokenWindows) and a.train.tokens.dtype == np.uint16
