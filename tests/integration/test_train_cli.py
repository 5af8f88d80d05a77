"""End to end through the real CLI: the quickstart example, DDP on 2 CPU processes, LM training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def shipyard(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "shipyard", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def test_quickstart_digits_mlp_reaches_97_percent(tmp_path: Path) -> None:
    run = tmp_path / "digits"
    out = shipyard("train", str(ROOT / "examples" / "digits-mlp.yaml"), "--run-dir", str(run))
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["test"]["accuracy"] >= 0.97
    assert "accuracy" in out.stdout  # the summary table
    for name in ("report.md", "loss.png", "lr.png", "confusion_matrix.png", "config.yaml"):
        assert (run / name).is_file(), name
    again = shipyard("eval", str(run), "--split", "test", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["metrics"]["accuracy"] == pytest.approx(
        report["test"]["accuracy"]
    )


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    common = [
        "--set",
        "train.epochs=null",
        "--set",
        "train.max_steps=12",
        "--set",
        "train.log_every=1",
        "--set",
        "model.dropout=0.0",
        "--set",
        "eval.every_steps=6",
        "--set",
        "schedule.warmup_steps=2",
        "--no-progress",
    ]
    cfg = str(ROOT / "examples" / "digits-mlp.yaml")
    one = shipyard(
        "train", cfg, "--run-dir", str(tmp_path / "one"), "--set", "train.batch_size=32", *common
    )
    assert one.returncode == 0, one.stderr
    two = shipyard(
        "train",
        cfg,
        "--nproc",
        "2",
        "--run-dir",
        str(tmp_path / "two"),
        "--set",
        "train.batch_size=32",  # the global batch: two processes take 16 rows each
        *common,
    )
    assert two.returncode == 0, two.stderr + two.stdout

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000012" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000012" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["run"]["processes"] == 2


def test_gpt_tiny_learns_below_unigram_baseline(tmp_path: Path) -> None:
    run = tmp_path / "gpt"
    out = shipyard(
        "train",
        str(ROOT / "examples" / "gpt-tiny.yaml"),
        "--run-dir",
        str(run),
        "--set",
        "train.max_steps=150",
        "--set",
        "data.max_chars=200000",
        "--set",
        "data.tokenizer.kind=byte",
        "--set",
        "model.n_layer=2",
        "--set",
        "model.n_embd=64",
        "--set",
        "model.block_size=64",
        "--set",
        "schedule.warmup_steps=10",
        "--set",
        "eval.every_steps=75",
        "--set",
        "optim.lr=0.003",
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["val"]["loss"] < report["run"]["unigram_loss"] - 0.3
    assert report["val"]["perplexity"] > 1.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in lines if r["kind"] == "train")
