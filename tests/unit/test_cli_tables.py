"""Wide tables stay readable at 80 columns: every value whole, no "…", no line past 80."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from shipyard.cli.compress_cmd import report_table
from shipyard.cli.tables import print_rows, table_width
from shipyard.cli.tuning_cmd import cv_table, trials_table
from shipyard.compress.measure import report_rows


def _render(header: list[str], rows: list[list[str]], width: int = 80) -> str:
    out = io.StringIO()
    print_rows(Console(file=out, width=width, color_system=None), header, rows, title="t")
    return out.getvalue()


def _report() -> dict:
    side = {
        "file_bytes": 285_000,
        "parameters": 70_410,
        "sparsity": 0.0,
        "latency_p50_ms": 0.081,
        "latency_p99_ms": 0.213,
        "throughput_rows_per_s": 812_345,
        "quality": {"accuracy": 0.9611, "macro_f1": 0.9608, "log_loss": 0.1432},
    }
    return {
        "bench": {"batch_size": 256},
        "parent": {**side, "version": "20261201-071300"},
        "child": {**side, "version": "20261201-071300-int8", "sparsity": 0.5},
        "delta": {
            "size_ratio": 0.27,
            "speedup_batch1_p50": 1.4,
            "speedup_batch256": 2.1,
            "quality": {"accuracy": -0.0011, "macro_f1": -0.0009, "log_loss": 0.0021},
        },
    }


def test_compress_report_turned_fits_80_columns() -> None:
    rows = report_rows(_report())
    assert table_width(rows[0], rows[1:]) > 80  # as the CLI used to print it: cut to "…"
    text = _render(*report_table(_report()))  # what `shipyard compress` prints
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "┃             ┃ parent " in text  # still a table: a column per model
    for word in ("20261201-071300-int8", "sparsity", "50.0%", "x2.10"):
        assert word in text, word
    assert "rows/s b256" in text and "x0.27" in text


def test_too_wide_rows_go_vertical_and_keep_every_value() -> None:
    header = ["name", "latest", "versions", "aliases", "description"]
    long = "a description that is far too long to share a line with four other columns"
    rows = [["digits-mlp", "3", "3", "production=3, staging=2", long]]
    text = _render(header, rows)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "production=3, staging=2" in text and "description" in text
    assert long.split()[-1] in text  # folded onto more lines, not cut


def test_narrow_rows_stay_a_table() -> None:
    header = ["id", "name", "scope", "created", "status"]
    rows = [["4e93078e", "billing", "infer", "2026-12-01T07:44:31+00:00", "active"]]
    text = _render(header, rows)
    assert "┃ id " in text and "│ 4e93078e │" in text  # one header line, one row line
    assert max(len(line) for line in text.splitlines()) <= 80


def test_cv_and_tune_tables_fit_80_columns() -> None:
    folds = [
        SimpleNamespace(fold=i, metrics={"accuracy": 0.9 + i / 1000, "macro_f1": 0.8})
        for i in range(10)
    ]
    cv = SimpleNamespace(
        folds=folds,
        mean={"accuracy": 0.9045, "macro_f1": 0.8},
        std={"accuracy": 0.0029, "macro_f1": 0.0},
    )
    header, rows = cv_table(cv)  # type: ignore[arg-type]
    assert table_width(header, rows) > 80  # ten folds: a plain table would cut cells to "…"
    text = _render(header, rows)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "fold 9" in text and "0.9090" in text and "0.9045 ± 0.0029" in text

    params = {"optim.lr": 0.0031622776, "model.hidden": 256, "optim.weight_decay": 1e-4}
    trials = [
        {"number": n, "value": v, "params": params}
        for n, v in ((0, 0.91), (1, None), (2, 0.95), (3, 0.93))
    ]
    study = SimpleNamespace(trials=trials, direction="maximize", metric="accuracy")
    header, rows = trials_table(study)  # type: ignore[arg-type]
    assert [r[0] for r in rows] == ["2", "3", "0"]  # best first, unfinished left out
    text = _render(header, rows)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "optim.weight_decay=0.0001" in text and "0.9500" in text
