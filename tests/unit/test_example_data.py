"""examples/make_data.py writes the CSVs the privacy and rnn examples read, and they prepare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.data import prepare_data


def test_example_csvs_feed_their_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / "examples" / "make_data.py"
    out = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--rows", "300"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    monkeypatch.setenv("SHIPYARD_ANONYMIZE_SALT", "0123456789abcdef0123456789abcdef")
    people = load_config(
        ROOT / "examples" / "people-private.yaml", [f"data.source={tmp_path / 'people.csv'}"]
    )
    data = prepare_data(people.data, people.task, people.seed)
    assert data.info.feature_names == ["age", "income"]  # name/zip are text, email dropped
    assert sorted(data.info.class_names or []) == ["high", "low"]
    messages = load_config(
        ROOT / "examples" / "rnn-messages.yaml", [f"data.source={tmp_path / 'messages.csv'}"]
    )
    data = prepare_data(messages.data, messages.task, messages.seed, block_size=64)
    assert data.info.class_names == ["account", "billing", "delivery"]
    assert data.tokenizer is not None
    x, _ = data.train[0]
    text = data.tokenizer.decode([int(i) for i in x if int(i) != 0])
    assert not any(ch.isdigit() for ch in text) and "@" not in text
