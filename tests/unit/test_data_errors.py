"""Bad data gives a DataError with one clear line: what, why, and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shipyard.data import DataConfig, SplitRatios, prepare_data
from shipyard.errors import DataError


def prepare(tmp_path: Path, task: str = "classification", **config: object) -> None:
    prepare_data(DataConfig(**config), task, seed=0, cache_dir=tmp_path / "cache")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file '.*nope\.csv' does not exist"):
        prepare(tmp_path, source=str(tmp_path / "nope.csv"))


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"glob '.*\*\.csv' matches no files"):
        prepare(tmp_path, source=str(tmp_path / "*.csv"))


def test_missing_column_lists_available(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,x\n3,4,y\n")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, source=str(tmp_path / "d.csv"), target="kind")
    assert "target column 'kind' not found" in str(err.value)
    assert "available columns: a, b, label" in str(err.value)
    with pytest.raises(DataError, match="feature column 'c' not found; available columns: a, b"):
        prepare(tmp_path, source=str(tmp_path / "d.csv"), target="label", features=["a", "c"])


def test_target_required(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(DataError, match=r"data\.target is required.*available columns: a, b"):
        prepare(tmp_path, "regression", source=str(tmp_path / "d.csv"))


def test_non_numeric_feature_names_column_row_value(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,target\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, source=str(tmp_path / "d.csv"))
    msg = str(err.value)
    assert "'oops'" in msg and "column 'b'" in msg and "row 2 (line 3)" in msg


def test_non_numeric_in_jsonl(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"a": 1, "target": 0}\n{"a": null, "target": 1}\n')
    with pytest.raises(DataError, match=r"non-numeric value None in column 'a', row 2"):
        prepare(tmp_path, source=str(tmp_path / "d.jsonl"))


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes("a,target\n1,0\n2,café\n".encode("latin-1"))
    (tmp_path / "d.jsonl").write_bytes('{"a": 1, "target": 0}\n{"a": "é"}\n'.encode("latin-1"))
    for name in ("d.csv", "d.jsonl"):
        with pytest.raises(DataError, match=rf"{name}:[23]: not valid UTF-8 .*convert the"):
            prepare(tmp_path, source=str(tmp_path / name))
    chat = DataConfig(source=str(tmp_path / "d.jsonl"), format="chat", tokenizer={"kind": "byte"})
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        prepare_data(chat, "language-modeling", seed=0, block_size=8)


def test_a_line_that_is_not_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"a": 1, "target": 0}\n\n{"a": 2,\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        prepare(tmp_path, source=str(tmp_path / "d.jsonl"))


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,target\n1,0\n2,1\n")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, source=str(tmp_path / "d.csv"))
    msg = str(err.value)
    assert "split 'train' would be empty" in msg and "2 rows" in msg
    assert "train=0, val=1, test=1" in msg


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,target\n" + "".join(f"{i},same\n" for i in range(10)))
    with pytest.raises(DataError, match=r"at least 2 classes.*has 1 \(same\)"):
        prepare(tmp_path, source=str(tmp_path / "d.csv"))


def test_label_missing_from_train(tmp_path: Path) -> None:
    (tmp_path / "tr.csv").write_text("a,target\n1,x\n2,y\n")
    (tmp_path / "va.csv").write_text("a,target\n1,z\n")
    files = {"train": str(tmp_path / "tr.csv"), "val": str(tmp_path / "va.csv")}
    with pytest.raises(DataError, match="label 'z' in the val split does not occur in the train"):
        prepare(tmp_path, files=files)


def test_corpus_shorter_than_one_block(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("0123456789")
    config = DataConfig(
        source=str(tmp_path / "tiny.txt"),
        tokenizer={"kind": "byte"},
        splits=SplitRatios(train=1.0, val=0.0, test=0.0),
    )
    with pytest.raises(DataError) as err:
        prepare_data(config, "language-modeling", 0, block_size=64, cache_dir=tmp_path)
    assert str(err.value).startswith("the train split has 11 tokens")  # 10 bytes + eos
    assert "block_size 64 needs 65" in str(err.value)


def test_npz_without_arrays_lists_them(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", features=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="no feature array 'x' or 'X'; arrays found: features, y"):
        prepare(tmp_path, source=str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2)), labels=np.zeros(4))
    with pytest.raises(DataError, match="no target array 'y' or 'target'; arrays found: labels, x"):
        prepare(tmp_path, source=str(tmp_path / "b.npz"))


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.zeros(2))
    with pytest.raises(DataError, match="without pickle"):
        prepare(tmp_path, source=str(tmp_path / "o.npz"))


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, source=str(tmp_path / "d.xlsx"))
    msg = str(err.value)
    assert "unsupported file extension '.xlsx'" in msg
    assert ".csv" in msg and ".jsonl" in msg and ".npz" in msg and ".txt" in msg


def test_csv_without_header(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="has no header row"):
        prepare(tmp_path, source=str(tmp_path / "d.csv"))


def test_images_of_different_sizes(tmp_path: Path) -> None:
    from PIL import Image

    for cls, size in (("a", (4, 4)), ("b", (5, 4))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "imgs" / cls / "0.png")
    with pytest.raises(DataError, match=r"images differ in size.*set data\.image_size"):
        prepare(tmp_path, source=str(tmp_path / "imgs"))


def test_text_corpus_for_classification(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="only for task language-modeling"):
        prepare(tmp_path, source="builtin:python-stdlib")


def test_tabular_source_for_language_modeling(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="builtin:digits is not a text corpus"):
        prepare_data(
            DataConfig(source="builtin:digits", tokenizer={"kind": "byte"}),
            "language-modeling",
            0,
            block_size=8,
        )


def test_every_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,target\n1,0\n")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, source=str(tmp_path / "d.csv"))
    assert "\n" not in str(err.value)
