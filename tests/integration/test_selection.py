"""Model selection end to end on real runs: `shipyard cv` and `shipyard tune` (Optuna, SQLite)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.package.registry import Registry
from shipyard.train import fit
from shipyard.tuning import cross_validate, tune
from shipyard.tuning.tune import PruningCallback

pytestmark = pytest.mark.integration

TUNE_EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "digits-tune.yaml").read_text())


def shipyard(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "shipyard", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env=env,
    )


def test_cli_cv_five_folds_on_digits_then_final_model(tmp_path: Path) -> None:
    out_dir = tmp_path / "cv"
    out = shipyard(
        "cv",
        str(ROOT / "examples" / "digits-mlp.yaml"),
        "--folds",
        "5",
        "--set",
        "train.epochs=8",
        "--final",
        "--out",
        str(out_dir),
    )
    assert out.returncode == 0, out.stderr
    assert "mean ± std" in out.stdout
    report = json.loads((out_dir / "cv.json").read_text())
    folds = report["folds"]
    accuracies = [f["val"]["accuracy"] for f in folds]
    assert len(accuracies) == 5
    assert report["mean"]["accuracy"] == pytest.approx(sum(accuracies) / 5)
    assert report["mean"]["accuracy"] >= 0.95
    assert 0 < report["std"]["accuracy"] < 0.05
    # the val folds partition train+val (1527 of 1797 rows at 0.7/0.15/0.15); no fold sees test
    assert sum(f["sizes"]["val"] for f in folds) == 1527
    assert all(set(f["sizes"]) == {"train", "val"} for f in folds)
    for i, f in enumerate(folds):
        run = Path(f["run_dir"])
        assert run == out_dir / f"fold-{i}" and (run / "package" / "manifest.json").is_file()
        assert "test" not in json.loads((run / "report.json").read_text())
    # the final model trained on all 1527 rows and is the only one to see the test split (270)
    final = Path(report["final"]["run_dir"])
    sizes = json.loads((final / "data.json").read_text())["info"]["split_sizes"]
    assert sizes == {"train": 1527, "test": 270}
    assert report["final"]["test"]["accuracy"] >= 0.95
    assert (out_dir / "cv.png").read_bytes()[:4] == b"\x89PNG"
    assert "| accuracy |" in (out_dir / "cv.md").read_text()


def test_parallel_folds_match_sequential_folds(tmp_path: Path) -> None:
    config = load_config(
        ROOT / "examples" / "digits-mlp.yaml",
        ["train.epochs=2", "train.early_stopping=null", "model.hidden_sizes=[32]"],
    )
    seq = cross_validate(config, 2, out_dir=tmp_path / "seq", runs_root=tmp_path)
    par = cross_validate(config, 2, workers=2, out_dir=tmp_path / "par", runs_root=tmp_path)
    for a, b in zip(seq.folds, par.folds, strict=True):
        assert a.sizes == b.sizes
        assert a.metrics["accuracy"] == pytest.approx(b.metrics["accuracy"], abs=0.01)
        assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-3)


def _space(**tune: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TUNE_EXAMPLE)
    raw["train"]["epochs"] = 2
    raw["tune"] = {
        "params": {"optim.lr": {"low": 0.0001, "high": 0.03, "log": True}},
        "startup_trials": 2,
        **tune,
    }
    return raw


def test_tune_study_in_sqlite_resumes_adds_trials_and_registers_the_best(
    tmp_path: Path, home: Path
) -> None:
    raw = _space()
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    runs = tmp_path / "runs"
    first = tune(raw, 3, storage=url, runs_root=runs)
    assert len(first.trials) == 3 and first.trials[0]["params"] == {"optim.lr": 0.0003}
    second = tune(raw, 2, storage=url, runs_root=runs, register=True)
    assert second.study == first.study == "digits-tune"
    assert [t["number"] for t in second.trials] == [0, 1, 2, 3, 4]  # the same study, grown
    assert second.trials[:3] == first.trials[:3]
    values = [t["value"] for t in second.trials if t["state"] == "COMPLETE"]
    assert second.best_value == max(values)
    # trial 0 is the config as written: a normal run of it reproduces its value exactly
    default = fit(
        load_config({k: v for k, v in raw.items() if k != "tune"}),
        run_dir=tmp_path / "default",
        runs_root=runs,
    )
    assert second.trials[0]["value"] == pytest.approx(default.metrics["val"]["accuracy"])
    assert second.best_value >= default.metrics["val"]["accuracy"]
    # every trial is a normal run directory; best.yaml is a plain config of the best trial
    for t in second.trials:
        if t["state"] == "COMPLETE":
            assert (Path(t["run_dir"]) / "report.json").is_file()
    best = load_config(second.best_config)
    assert best.tune is None and best.optim.lr == pytest.approx(second.best_params["optim.lr"])
    with Registry() as registry:
        assert second.registered == "digits-tune:1"
        version = registry.get("digits-tune:1")
        assert version.metrics is not None
    # the study lives in the database: Optuna itself sees the five trials
    assert len(optuna.load_study(study_name="digits-tune", storage=url).trials) == 5


def test_tune_refuses_to_resume_with_another_space(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    tune(_space(study="s1"), 1, storage=url, runs_root=tmp_path)
    other = _space(study="s1")
    other["tune"]["params"]["optim.lr"]["high"] = 0.1
    with pytest.raises(Exception, match="created with another search space"):
        tune(other, 1, storage=url, runs_root=tmp_path)


def test_pruning_stops_a_hopeless_trial_at_its_first_validation(tmp_path: Path) -> None:
    base = {k: v for k, v in _space()["train"].items()}
    raw = {k: v for k, v in _space().items() if k != "tune"}
    raw["train"] = {**base, "epochs": 4}
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )
    good = study.ask()
    result = fit(
        load_config({**raw, "optim": {"name": "adamw", "lr": 0.01}}),
        run_dir=tmp_path / "good",
        callbacks=[PruningCallback(good, "accuracy")],
    )
    study.tell(good, result.metrics["val"]["accuracy"])
    hopeless = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at validation 1"):
        fit(
            load_config({**raw, "optim": {"name": "adamw", "lr": 1e-7}}),
            run_dir=tmp_path / "hopeless",
            callbacks=[PruningCallback(hopeless, "accuracy")],
        )
    records = [json.loads(line) for line in (tmp_path / "hopeless" / "metrics.jsonl").open()]
    assert [r["kind"] for r in records].count("val") == 1  # stopped after 1 of 4 epochs
    assert not (tmp_path / "hopeless" / "report.json").exists()


def test_tune_with_cross_validated_objective_in_two_workers(tmp_path: Path) -> None:
    raw = _space(cv_folds=2, study="cv", pruner="none")
    raw["train"]["epochs"] = 1
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    result = tune(raw, 3, storage=url, runs_root=tmp_path / "runs", workers=2)
    # the baseline (trial 0, enqueued) runs once, before the workers start: two workers popping
    # the one waiting trial at once ran it twice and crashed the study
    assert [t["state"] for t in result.trials] == ["COMPLETE"] * 3
    assert len({t["run_dir"] for t in result.trials}) == 3
    for t in result.trials:
        cv = json.loads((Path(t["run_dir"]) / "cv.json").read_text())
        assert t["value"] == pytest.approx(cv["mean"]["accuracy"])
        assert cv["k"] == 2
