"""The tune: search space: checked before any trial with did-you-mean errors; sampling."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.errors import ConfigError
from shipyard.tuning import apply_values, check_search_space, tune
from shipyard.tuning.tune import _Objective, baseline_values, sample

BASE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "digits-tune.yaml").read_text())


def _check(params: dict[str, Any], **extra: Any) -> None:
    raw = copy.deepcopy(BASE)
    raw["tune"] = {"params": params, **extra}
    config = load_config(raw)
    assert config.tune is not None
    check_search_space(raw, config.tune, "cfg.yaml", config)


def test_the_example_space_is_valid() -> None:
    _check(BASE["tune"]["params"])


@pytest.mark.parametrize(
    ("params", "extra", "message"),
    [
        (
            {"optim.lrr": {"low": 0.001, "high": 0.1}},
            {},
            r"tune.params\['optim.lrr'\] = 0.001 gives an invalid config: unknown key "
            r"'optim.lrr': did you mean 'lr'\?",
        ),
        (
            {"model.dropout": {"low": 0.0, "high": 1.5}},
            {},
            r"tune.params\['model.dropout'\] = 1.5 gives an invalid config: model.dropout",
        ),
        (
            {"optim.momentum": {"low": 0.0, "high": 0.9}},
            {},  # adamw has no momentum: it must be conditional on optim.name sgd
            r"unknown key 'optim.momentum'",
        ),
        (
            {
                "optim.momentum": {"low": 0.0, "high": 0.9, "when": {"optim.name": "sgd"}},
                "optim.name": {"choices": ["adamw", "sgd"]},
            },
            {},
            r"when refers to 'optim.name', which is not a searched key listed before it",
        ),
        (
            {
                "optim.name": {"choices": ["adamw", "sgd"]},
                "optim.momentum": {"low": 0.0, "high": 0.9, "when": {"optim.name": "sdg"}},
            },
            {},
            r'when optim.name = \'sdg\' can never hold \(its values: "adamw", "sgd"\)',
        ),
        (
            {"optim.lr": {"low": 0.001, "high": 0.1}},
            {"metric": "acuracy"},
            r"tune.metric 'acuracy' is not a validation metric of task classification; "
            r"choose one of .*accuracy",
        ),
        (
            {"optim.name": {"choices": ["adamw", "lbfgs"]}},
            {},
            r"= \"lbfgs\" gives an invalid config: optim.name: unknown name 'lbfgs'",
        ),
        ({"name": {"choices": ["a", "b"]}}, {}, r"name cannot be searched"),
    ],
)
def test_bad_spaces_fail_before_any_trial(
    params: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _check(params, **extra)


def test_structural_errors_come_from_the_config_with_did_you_mean() -> None:
    raw = copy.deepcopy(BASE)
    raw["tune"]["params"]["optim.lr"] = {"low": 0.1, "hihg": 0.2}
    with pytest.raises(
        ConfigError, match=r"unknown key \"tune.params\['optim.lr'\].hihg\": did you mean 'high'"
    ):
        load_config(raw)
    raw["tune"]["params"]["optim.lr"] = {"low": 0.0, "high": 0.2, "log": True}
    with pytest.raises(ConfigError, match=r"log needs low > 0, got low=0.0"):
        load_config(raw)
    raw["tune"]["params"]["optim.lr"] = {"low": 0.1, "high": 0.2, "choices": [1]}
    with pytest.raises(ConfigError, match="either low and high"):
        load_config(raw)
    raw["tune"] = {"params": {}, "sampler": "grid"}
    with pytest.raises(ConfigError, match=r"tune\.sampler"):
        load_config(raw)


def test_a_bad_space_fails_in_tune_before_a_study_exists(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    raw["tune"]["params"] = {"optim.lrr": {"low": 0.001, "high": 0.1}}
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        tune(raw, 2, storage=url, runs_root=tmp_path / "runs")
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "runs").exists()
    no_tune = {k: v for k, v in BASE.items() if k != "tune"}
    with pytest.raises(ConfigError, match="has no tune: section"):
        tune(no_tune, 2, storage=url)


def test_sampling_follows_conditions_and_json_choices() -> None:
    config = load_config(BASE)
    assert config.tune is not None
    sgd = optuna.trial.FixedTrial(
        {
            "optim.lr": 0.01,
            "model.hidden_sizes": "[128, 64]",
            "model.dropout": 0.2,
            "optim.name": "sgd",
            "optim.momentum": 0.9,
        }
    )
    values = sample(sgd, config.tune)
    assert values["model.hidden_sizes"] == [128, 64] and values["optim.momentum"] == 0.9
    adamw = optuna.trial.FixedTrial(
        {
            "optim.lr": 0.01,
            "model.hidden_sizes": "[64]",
            "model.dropout": 0.2,
            "optim.name": "adamw",
        }
    )
    values = sample(adamw, config.tune)
    assert "optim.momentum" not in values  # its condition (optim.name sgd) does not hold
    trial_config = load_config(apply_values(BASE, values))
    assert trial_config.optim.lr == 0.01 and trial_config.tune is None
    assert trial_config.model.hidden_sizes == [64]  # type: ignore[union-attr]


def test_a_trial_whose_sampled_combination_is_invalid_records_why(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    raw["tune"] = {
        "params": {
            "optim.name": {"choices": ["adamw", "gd"]},
            "train.grad_accum": {"choices": [1, 2]},
        }
    }
    config = load_config(raw)
    objective = _Objective(raw, config, "accuracy", tmp_path, str(tmp_path), progress=False)
    trial = optuna.trial.FixedTrial({"optim.name": "gd", "train.grad_accum": 2})
    with pytest.raises(ConfigError):
        objective(trial)
    assert "set grad_accum 1" in trial.user_attrs["error"]  # the study's trial row shows it
    assert "run_dir" not in trial.user_attrs  # no run was started


def test_baseline_is_the_config_as_written() -> None:
    config = load_config(BASE)
    assert baseline_values(config) == {
        "optim.lr": 0.0003,
        "model.hidden_sizes": "[64]",
        "model.dropout": 0.1,
        "optim.name": "adamw",
    }


def test_missing_optuna_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from shipyard.tuning.tune import _optuna

    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without it looks like
    with pytest.raises(
        ConfigError, match=r"^shipyard tune needs Optuna: pip install 'shipyard\[tune\]'$"
    ):
        _optuna()


def test_cli_bad_space_exits_2_with_one_line_and_no_trial(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    raw = copy.deepcopy(BASE)
    raw["tune"]["params"]["model.dropuot"] = {"low": 0.0, "high": 0.2}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "SHIPYARD_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shipyard", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )

    out = run("tune", "bad.yaml", "--trials", "2")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'dropout'" in lines[0], out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "home").exists()
    for verb in ("cv", "tune"):
        helped = run(verb, "--help")
        assert helped.returncode == 0 and "Example: shipyard " + verb in helped.stdout
