"""The training loop end to end on tiny real data: resume, crash safety, accumulation, stopping."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.errors import CheckpointError, TrainError
from shipyard.train import StepInfo, best_checkpoint, evaluate_run, fit
from shipyard.train import checkpoint as ckpt
from shipyard.train.checkpoint import list_checkpoints, read_checkpoint


def regression_config(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "tiny-reg",
        "seed": 3,
        "task": "regression",
        "data": {"source": "builtin:synthetic-regression", "n_samples": 400, "n_features": 4},
        "model": {"name": "mlp", "hidden_sizes": [16], "dropout": 0.1},
        "optim": {"name": "adam", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "train": {"epochs": None, "max_steps": 20, "batch_size": 16, "log_every": 5},
        "eval": {"every_steps": 10},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return raw


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_run_writes_config_metrics_checkpoints_and_report(tmp_path: Path) -> None:
    result = fit(load_config(regression_config()), run_dir=tmp_path / "run")
    run = result.run_dir
    assert result.steps == 20
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert all(r["loss"] > 0 and r["lr"] >= 0 and r["samples_per_s"] > 0 for r in train)
    assert train[0]["lr"] > train[-1]["lr"]  # cosine decay
    assert [r["step"] for r in records if r["kind"] == "val"] == [10, 20]
    report = json.loads((run / "report.json").read_text())
    assert set(report["test"]) >= {"mse", "mae", "rmse", "r2"}
    assert (run / "report.md").is_file()
    assert set(result.metrics) == {"val", "test"}
    again = evaluate_run(run, "test")
    assert again["metrics"]["mse"] == pytest.approx(result.metrics["test"]["mse"], rel=1e-6)


def test_exact_resume_after_kill_is_bitwise_identical(tmp_path: Path) -> None:
    cfg = regression_config(train__checkpoint={"every_steps": 10})
    reference = fit(load_config(cfg), run_dir=tmp_path / "ref")
    killed = tmp_path / "killed"
    out = run_script(
        f"""
        import os
        from shipyard.config import load_config
        from shipyard.train import fit

        def die(info):
            if info.step == 10:
                os._exit(137)  # no clean-up at all, like a kill -9

        fit(load_config({cfg!r}), run_dir={str(killed)!r}, callbacks=[die])
        """,
        tmp_path,
    )
    assert out.returncode == 137, out.stderr
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step-00000010"]
    resumed = fit(load_config(cfg), run_dir=killed, resume="auto")
    assert resumed.steps == 20
    assert resumed.resumed_from == 10
    a, b = weights(reference.run_dir, 20), weights(killed, 20)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the log continues without duplicated steps
    steps = [
        json.loads(line)["step"]
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == [5, 10, 15, 20]


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path: Path) -> None:
    cfg = regression_config(train__checkpoint={"every_steps": 5}, eval__every_steps=20)
    run = tmp_path / "run"
    out = run_script(
        f"""
        import os
        from shipyard.config import load_config
        from shipyard.train import checkpoint, fit

        calls = {{"n": 0}}
        real = checkpoint._fsync

        def dying_fsync(path):
            calls["n"] += 1
            if calls["n"] == 5:  # second checkpoint, after its weights file, mid-write
                os._exit(137)
            real(path)

        checkpoint._fsync = dying_fsync
        fit(load_config({cfg!r}), run_dir={str(run)!r})
        """,
        tmp_path,
    )
    assert out.returncode == 137, out.stderr
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step-00000005"]
    assert list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint stays temporary"
    assert read_checkpoint(run / "checkpoints" / "step-00000005").step == 5
    resumed = fit(load_config(cfg), run_dir=run, resume="auto")
    assert resumed.steps == 20
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_damaged_newest_checkpoint_is_skipped(tmp_path: Path) -> None:
    cfg = regression_config(train__checkpoint={"every_steps": 10, "keep_last": 3})
    run = fit(load_config(cfg), run_dir=tmp_path / "run").run_dir
    newest = run / "checkpoints" / "step-00000020" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    cfg["train"]["max_steps"] = 30
    resumed = fit(load_config(cfg), run_dir=run, resume="auto")
    assert resumed.steps == 30


def test_best_checkpoint_verifies_only_what_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "checkpoints"
    for step, best in ((1, 1), (2, 2), (3, 2)):
        ckpt.save_checkpoint(
            directory, step=step, model=torch.nn.Linear(1, 1), state={"best_step": best}, meta={}
        )
    hashed: list[str] = []
    sha256 = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: hashed.append(p.parent.name) or sha256(p))
    assert best_checkpoint(tmp_path).name == "step-00000002"
    assert set(hashed) == {"step-00000002"}  # the newest is only asked for its best step
    # a damaged best is not returned: the best that an older checkpoint recorded is
    weights = directory / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    assert best_checkpoint(tmp_path).name == "step-00000001"
    (directory / "step-00000001" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        best_checkpoint(tmp_path)


def test_grad_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    base = regression_config(model={"name": "mlp", "hidden_sizes": [8], "dropout": 0.0})
    big = fit(
        load_config(base, ["train.batch_size=32", "train.max_steps=6"]), run_dir=tmp_path / "big"
    )
    # batch_size is the global batch: accumulation only cuts it into micro-batches
    small = fit(
        load_config(base, ["train.batch_size=32", "train.grad_accum=4", "train.max_steps=6"]),
        run_dir=tmp_path / "small",
    )
    micro = fit(
        load_config(base, ["train.batch_size=32", "train.micro_batch_size=8", "train.max_steps=6"]),
        run_dir=tmp_path / "micro",
    )
    a = weights(big.run_dir, 6)
    for other in (weights(small.run_dir, 6), weights(micro.run_dir, 6)):
        for key in a:
            torch.testing.assert_close(a[key], other[key], rtol=1e-5, atol=1e-6)


def test_full_batch_gradient_descent_is_one_step_per_epoch(tmp_path: Path) -> None:
    cfg = regression_config(
        optim={"name": "gd", "lr": 0.1},
        schedule={"name": "constant"},
        model={"name": "mlp", "hidden_sizes": [4], "dropout": 0.0},
        train={"epochs": 3, "batch_size": 50},
        eval={},
    )
    result = fit(load_config(cfg), run_dir=tmp_path / "gd")
    assert result.steps == 3
    assert result.epochs == 3


def test_early_stopping_restores_best_weights(tmp_path: Path) -> None:
    # a learning rate that is far too high makes validation loss get worse after the start
    cfg = regression_config(
        optim={"name": "sgd", "lr": 0.5, "momentum": 0.9},
        schedule={"name": "constant"},
        train={
            "epochs": None,
            "max_steps": 200,
            "batch_size": 16,
            "early_stopping": {"metric": "loss", "mode": "min", "patience": 2},
        },
        eval={"every_steps": 2},
    )
    seen: list[int] = []
    result = fit(
        load_config(cfg), run_dir=tmp_path / "es", callbacks=[lambda i: seen.append(i.step)]
    )
    assert result.stopped_early
    assert result.steps < 200
    assert result.best_step is not None and result.best_step < result.steps
    history = [
        json.loads(line)
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "val"
    ]
    best = min(history, key=lambda r: r["loss"])
    assert best["step"] == result.best_step
    # the final validation metrics are those of the best weights, not of the last step
    assert result.metrics["val"]["loss"] == pytest.approx(best["loss"], rel=1e-5)


def test_resume_with_a_different_model_is_refused(tmp_path: Path) -> None:
    cfg = regression_config()
    run = fit(load_config(cfg), run_dir=tmp_path / "run").run_dir
    changed = load_config(cfg, ["model.hidden_sizes=[32]", "data.noise=0.5"])
    with pytest.raises(TrainError) as info:
        fit(changed, run_dir=run, resume="auto")
    assert "model.hidden_sizes: [16] -> [32]" in str(info.value)
    assert "data.noise" in str(info.value)


def test_existing_run_dir_needs_resume(tmp_path: Path) -> None:
    cfg = load_config(regression_config())
    run = fit(cfg, run_dir=tmp_path / "run").run_dir
    with pytest.raises(TrainError, match="--resume auto"):
        fit(cfg, run_dir=run)


def test_callbacks_see_every_step(tmp_path: Path) -> None:
    seen: list[StepInfo] = []
    fit(load_config(regression_config()), run_dir=tmp_path / "run", callbacks=[seen.append])
    assert [s.step for s in seen] == list(range(1, 21))
    assert seen[4].loss is not None and seen[3].loss is None


def test_tensorboard_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(load_config(regression_config(train__tensorboard=True)), run_dir=tmp_path / "run")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "val/mse" in scalars
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert result.summary["samples_per_s"] > 0


def test_train_mode_is_set_once_and_again_only_after_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout is back on after each validation (so validating changes no training loss), and
    the trainer walks the model's modules to set train mode only then, not on every step."""

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]

    plain = fit(
        load_config(regression_config(train__log_every=1, eval__every_steps=1000)),
        run_dir=tmp_path / "plain",
    )
    calls: list[str] = []
    original = torch.nn.Module.train

    def spy(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        if mode:
            calls.append(type(self).__name__)
        return original(self, mode)

    monkeypatch.setattr(torch.nn.Module, "train", spy)
    validated = fit(
        load_config(regression_config(train__log_every=1, eval__every_steps=5)),
        run_dir=tmp_path / "validated",
    )
    assert losses(validated.run_dir) == losses(plain.run_dir)  # dropout (0.1) on after each eval
    # a new model starts in train mode; it is set again after the validations at steps 5, 10
    # and 15 only (the one at 20 ends the run), not on each of the 20 steps
    assert calls.count("MLP") == 3, calls
