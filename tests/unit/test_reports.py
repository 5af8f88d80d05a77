"""Reports: report.json round trip, Markdown contents, valid PNG plots, metrics.jsonl reading."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from shipyard.evaluate import EvaluateError, read_history, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CLASSIFIER = {
    "val": {
        "loss": 0.25,
        "accuracy": 0.95,
        "f1_macro": 0.9412,
        "per_class": {
            "cat": {"precision": 1.0, "recall": 0.9, "f1": 0.947368, "support": 10},
            "dog|wolf": {"precision": 0.9, "recall": 1.0, "f1": 0.947368, "support": 9},
        },
        "confusion_matrix": [[9, 1], [0, 9]],
    },
    "test": {
        "loss": 0.375,
        "accuracy": 0.875,
        "f1_macro": 0.8571,
        "per_class": {
            "cat": {"precision": 0.8, "recall": 1.0, "f1": 0.888889, "support": 4},
            "dog|wolf": {"precision": 1.0, "recall": 0.75, "f1": 0.857143, "support": 4},
        },
        "confusion_matrix": [[4, 0], [1, 3]],
    },
}


def history() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for step in range(10, 210, 10):
        lr = 1e-3 * min(1.0, step / 50) * (1 - step / 250)
        records.append(
            {"kind": "train", "step": step, "epoch": step // 100, "loss": 2.0 / step**0.5, "lr": lr}
        )
        if step % 100 == 0:
            records.append({"kind": "val", "step": step, "epoch": step // 100, "loss": 0.3})
    return records


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    pixels = imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.01  # not a blank canvas


def test_classifier_report_files_json_markdown_and_plots(tmp_path: Path) -> None:
    extra = {"run": {"name": "iris-mlp", "seconds": 12.5}}
    written = write_report(
        tmp_path / "run", CLASSIFIER, history=history(), title="iris mlp", extra=extra
    )
    run = tmp_path / "run"
    assert set(written) == {"json", "markdown", "loss", "lr", "confusion_matrix"}
    assert written["json"] == run / "report.json"
    for kind in ("loss", "lr", "confusion_matrix"):
        assert written[kind] == run / f"{kind}.png"
        assert_png(written[kind])
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in written.values())

    assert json.loads(written["json"].read_text()) == {**CLASSIFIER, **extra}

    md = written["markdown"].read_text()
    assert md.startswith("# iris mlp\n")
    assert "| metric | val | test |" in md
    assert "| accuracy | 0.9500 | 0.8750 |" in md
    assert "| f1_macro | 0.9412 | 0.8571 |" in md
    assert "## Per class (test)" in md
    assert "| dog\\|wolf | 1.0000 | 0.7500 | 0.8571 | 4 |" in md  # pipes escaped in tables
    assert "## Confusion matrix (test)" in md  # test is preferred over val
    assert "| cat | 4 | 0 |" in md
    for png in ("loss.png", "lr.png", "confusion_matrix.png"):
        assert f"({png})" in md
    assert '"iris-mlp"' in md


@pytest.mark.parametrize("empty", [None, []])
def test_regression_report_without_history_skips_plots(tmp_path: Path, empty: Any) -> None:
    results = {"test": {"mse": 0.0123, "mae": 0.0456, "rmse": 0.1109, "r2": math.nan}}
    written = write_report(tmp_path, results, history=empty)
    assert set(written) == {"json", "markdown"}
    assert not list(tmp_path.glob("*.png"))
    # non-finite floats are written as null so the file stays strict JSON
    assert json.loads(written["json"].read_text())["test"]["r2"] is None
    md = written["markdown"].read_text()
    assert md.startswith("# Evaluation report\n")
    assert "| mse | 0.0123 |" in md
    assert "| r2 | nan |" in md
    assert ".png" not in md


def test_history_without_train_or_lr_records_draws_what_it_can(tmp_path: Path) -> None:
    val_only = [r for r in history() if r["kind"] == "val"] + [{"kind": "note", "msg": "resumed"}]
    written = write_report(tmp_path, {}, history=val_only)
    assert set(written) == {"json", "markdown", "loss"}
    assert_png(written["loss"])


def test_rewrite_replaces_files_and_leaves_no_temp_files(tmp_path: Path) -> None:
    write_report(tmp_path, {"val": {"accuracy": 0.5}})
    write_report(tmp_path, {"val": {"accuracy": 0.75}})
    assert json.loads((tmp_path / "report.json").read_text()) == {"val": {"accuracy": 0.75}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_extra_section_may_not_shadow_a_split(tmp_path: Path) -> None:
    with pytest.raises(EvaluateError, match="clash"):
        write_report(tmp_path, {"val": {"accuracy": 0.5}}, extra={"val": {}})


def test_read_history_drops_a_truncated_last_line(tmp_path: Path) -> None:
    records = history()[:3]
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"kind": "train", "step": 40, "lo')  # crash mid-write
    assert read_history(path) == records
    path.write_text(text + "\n")  # blank lines are fine
    assert read_history(path) == records


def test_read_history_rejects_corruption_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(EvaluateError, match=r"metrics.jsonl:2 "):
        read_history(path)
    with pytest.raises(EvaluateError, match="no metrics history"):
        read_history(tmp_path / "missing.jsonl")
