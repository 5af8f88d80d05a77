"""The `tune:` search space: checked against the run config before any trial, then sampled.

`check_search_space(raw, tune, where)` raises a ConfigError naming the bad key or value when a
searched key does not exist in the config (with the config's own did-you-mean message), when a
value from its range or choices makes the config invalid, when a `when` condition refers to a key
that is not searched earlier, or when the metric is not one the task reports. `apply_values(raw,
values)` writes sampled values into a copy of the plain config.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from shipyard.config import RunConfig, TuneConfig, TuneParam, set_dotted, validate_config
from shipyard.errors import ConfigError
from shipyard.evaluate.metrics import build_metrics, primary_metric

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MAXIMIZE = ("accuracy", "precision", "recall", "f1", "r2")


def apply_values(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the plain config `raw` with dotted keys set to `values`; no tune section."""
    out = copy.deepcopy(dict(raw))
    out.pop("tune", None)
    for key, value in values.items():
        set_dotted(out, key, copy.deepcopy(value), label=f"tune.params[{key!r}]")
    return out


def candidate_values(param: TuneParam) -> list[Any]:
    """Values that stand for a parameter when checking the space: its ends and a middle, or
    every choice."""
    if param.choices is not None:
        return list(param.choices)
    assert param.low is not None and param.high is not None
    middle = (param.low + param.high) / 2
    if param.is_int:
        middle = int(middle)
    return [param.low, middle, param.high]


def metric_and_direction(config: RunConfig) -> tuple[str, str]:
    """The metric a study optimises and "maximize"/"minimize" (from tune, else the task's)."""
    assert config.tune is not None
    metric = config.tune.metric or primary_metric(config.task)[0]
    direction = config.tune.direction
    if direction == "auto":
        direction = "maximize" if any(w in metric for w in _MAXIMIZE) else "minimize"
    return metric, direction


def scalar_metric_names(config: RunConfig) -> list[str]:
    """The scalar validation metrics a run of this config reports (computed on a dummy batch)."""
    if config.task == "classification":
        k = config.eval.top_k
        metrics = build_metrics("classification", num_classes=k + 1, top_k=k)
        out = torch.zeros(2, k + 1)
        metrics.update(out, torch.tensor([0, 1]), loss_sum=torch.tensor(1.0), count=2)
    else:
        metrics = build_metrics(config.task)
        metrics.update(torch.zeros(2, 1), torch.ones(2, 1), loss_sum=torch.tensor(1.0), count=2)
    return sorted(
        k for k, v in metrics.compute().items() if isinstance(v, int | float | torch.Tensor)
    )


def check_search_space(
    raw: Mapping[str, Any], tune: TuneConfig, where: str, config: RunConfig
) -> None:
    """Raise ConfigError if the search space cannot run (see the module docstring)."""
    metric, _ = metric_and_direction(config)
    names = scalar_metric_names(config)
    if metric not in names:
        raise ConfigError(
            f"{where}: tune.metric {metric!r} is not a validation metric of task {config.task}; "
            f"choose one of {', '.join(names)}"
        )
    if config.task == "language-modeling" and tune.cv_folds:
        raise ConfigError(f"{where}: tune.cv_folds does not work for language-modeling")
    keys = list(tune.params)
    for i, (key, param) in enumerate(tune.params.items()):
        label = f"{where}: tune.params[{key!r}]"
        if not _KEY.match(key):
            raise ConfigError(
                f"{label}: a key is a dotted config path such as optim.lr or model.dropout"
            )
        if key.split(".")[0] in ("name", "tune"):
            raise ConfigError(f"{label}: {key.split('.')[0]} cannot be searched")
        for cond_key, cond in (param.when or {}).items():
            if cond_key not in keys[:i]:
                raise ConfigError(
                    f"{label}: when refers to {cond_key!r}, which is not a searched key listed "
                    f"before it (searched before it: {', '.join(keys[:i]) or 'none'})"
                )
            allowed = candidate_values(tune.params[cond_key])
            for value in cond if isinstance(cond, list) else [cond]:
                other = tune.params[cond_key]
                ok = (
                    value in allowed
                    if other.choices is not None
                    else (isinstance(value, int | float) and other.low <= value <= other.high)  # type: ignore[operator]
                )
                if not ok:
                    raise ConfigError(
                        f"{label}: when {cond_key} = {value!r} can never hold (its values: "
                        f"{_show(other)})"
                    )
        base = _condition_values(tune, key)
        for value in candidate_values(param):
            trial_raw = apply_values(raw, {**base, key: value})
            try:
                validate_config(trial_raw, where="config")
            except ConfigError as exc:
                detail = str(exc).removeprefix("config: ")
                raise ConfigError(
                    f"{label} = {json.dumps(value)} gives an invalid config: {detail}"
                ) from None


def _condition_values(tune: TuneConfig, key: str) -> dict[str, Any]:
    """Values of the keys `key` depends on (transitively) that make its `when` hold."""
    out: dict[str, Any] = {}
    for cond_key, cond in (tune.params[key].when or {}).items():
        out.update(_condition_values(tune, cond_key))
        out[cond_key] = cond[0] if isinstance(cond, list) else cond
    return out


def _show(param: TuneParam) -> str:
    if param.choices is not None:
        return ", ".join(json.dumps(c) for c in param.choices)
    return f"{param.low}..{param.high}"
