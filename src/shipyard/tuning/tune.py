"""Hyperparameter search with Optuna: `tune(config_file, trials=N)`.

The search space is the config's `tune:` section (see `TuneConfig`); it is checked before the
first trial. Each trial samples values, writes them into the plain config and trains an ordinary
run in `runs/NAME/tune-STUDY/trial-NNNN` (or cross-validates it when `tune.cv_folds` is set). The
trainer reports every validation to Optuna, whose pruner can stop a hopeless trial. The study lives
in the registry's database (SQLite by default, PostgreSQL when the registry is), so running the
command again resumes the study and adds trials. Parallel workers are processes sharing the study.
At the end `best.yaml` (the best trial's config, without `tune:`) and `study.json` are written next
to the trials, and the best run's package can be registered.

Optuna is an optional dependency (`pip install 'shipyard[tune]'`); it is imported in `_optuna()`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from shipyard.config import RunConfig, TuneConfig, load_raw_config, validate_config
from shipyard.errors import ConfigError, DataError, RegistryError, ShipyardError, TrainError
from shipyard.package.registry import Registry, registry_database_url
from shipyard.train import StepInfo, fit
from shipyard.tuning.cv import FoldResult, cross_validate, fold_config
from shipyard.tuning.space import apply_values, check_search_space, metric_and_direction

SPACE_ATTR = "shipyard_space"


@dataclass
class TuneResult:
    """The outcome of `tune`: the study's best trial (over every invocation) and where it is."""

    study: str
    storage: str
    metric: str
    direction: str
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    best_run_dir: Path | None
    best_config: Path
    trials: list[dict[str, Any]]
    registered: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Trials by state (COMPLETE, PRUNED, FAIL, ...)."""
        out: dict[str, int] = {}
        for t in self.trials:
            out[t["state"]] = out.get(t["state"], 0) + 1
        return out


def tune(
    source: str | Path | Mapping[str, Any],
    trials: int,
    *,
    overrides: Sequence[str] = (),
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    runs_root: str | Path = "runs",
    register: bool = False,
    progress: bool = False,
) -> TuneResult:
    """Run `trials` more trials of the config's `tune:` study and return the best so far.

    storage: SQLAlchemy URL of the study database (default: the registry's).
    register: register the best run's package in the registry (under the run name).
    """
    raw, where = load_raw_config(source, overrides)
    config = validate_config(raw, where=where)
    if config.tune is None:
        raise ConfigError(
            f"{where} has no tune: section; add one, e.g. tune: {{params: {{optim.lr: "
            "{low: 0.0001, high: 0.1, log: true}}}}"
        )
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    check_search_space(raw, config.tune, where, config)
    optuna = _optuna()
    metric, direction = metric_and_direction(config)
    name = study_name or config.tune.study or config.name
    url = registry_database_url(storage)
    study = _open_study(url, name, config, metric, direction, seed_offset=0)
    out_dir = Path(runs_root) / config.name / f"tune-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = (raw, url, name, str(runs_root), progress)
    waiting = optuna.trial.TrialState.WAITING
    if workers > 1 and any(t.state == waiting for t in study.trials):
        # the enqueued baseline first, here: two workers may both pop one waiting trial (SQLite
        # has no row locks) and run it twice
        _optimize(*args, n_trials=1, seed_offset=len(study.trials))
        trials -= 1
    if workers == 1:
        _optimize(*args, n_trials=trials, seed_offset=len(study.trials))
    elif trials > 0:
        shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [
                pool.submit(_worker, *args, share, len(study.trials) + 1000 * (i + 1), threads)
                for i, share in enumerate(shares)
                if share
            ]
            for future in futures:
                future.result()
    study = optuna.load_study(study_name=name, storage=_storage(url))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary = [_trial_row(t) for t in study.trials]
    (out_dir / "study.json").write_text(
        json.dumps(
            {"study": name, "metric": metric, "direction": direction, "trials": summary}, indent=2
        ),
        encoding="utf-8",
    )
    if not complete:
        raise TrainError(
            f"study {name!r}: no trial completed ({len(study.trials)} trials: see "
            f"{out_dir / 'study.json'} for their errors); widen or fix the search space"
        )
    best = study.best_trial
    best_raw = best.user_attrs["config"]
    best_config = out_dir / "best.yaml"
    best_config.write_text(
        f"# best of study {name!r}: val {metric} = {best.value:.6g} (trial {best.number})\n"
        + yaml.safe_dump(best_raw, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    run_dir = Path(best.user_attrs["run_dir"]) if best.user_attrs.get("run_dir") else None
    result = TuneResult(
        study=name,
        storage=url,
        metric=metric,
        direction=direction,
        best_value=float(best.value),
        best_params=dict(best.params),
        best_trial=best.number,
        best_run_dir=run_dir,
        best_config=best_config,
        trials=summary,
    )
    if register:
        result.registered = _register_best(best_raw, run_dir, out_dir, config, runs_root)
    return result


# ------------------------------------------------------------------------------------------ optuna


def _optuna() -> Any:
    """The optuna module, or a one-line error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("shipyard tune needs Optuna: pip install 'shipyard[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _storage(url: str) -> Any:
    optuna = _optuna()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        kwargs = {"connect_args": {"timeout": 60}}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except (SQLAlchemyError, ImportError) as exc:
        raise RegistryError(
            f"cannot open the study database {_shown(url)}: {' '.join(str(exc).split())[:300]}; "
            "check --storage or SHIPYARD_REGISTRY_URL"
        ) from None


def _open_study(
    url: str, name: str, config: RunConfig, metric: str, direction: str, seed_offset: int
) -> Any:
    """Create the study, or load it and check it was made with the same search space."""
    optuna = _optuna()
    tune_cfg = config.tune
    assert tune_cfg is not None
    try:
        study = optuna.create_study(
            storage=_storage(url),
            study_name=name,
            direction=direction,
            sampler=_sampler(tune_cfg, config.seed + seed_offset),
            pruner=_pruner(tune_cfg),
            load_if_exists=True,
        )
    except ValueError as exc:  # e.g. an existing study with the other direction
        raise ConfigError(
            f"study {name!r}: {exc}; choose another name with tune.study or --study"
        ) from None
    space = json.dumps(
        {
            "params": {k: v.model_dump(mode="json") for k, v in tune_cfg.params.items()},
            "metric": metric,
            "direction": direction,
            "cv_folds": tune_cfg.cv_folds,
        },
        sort_keys=True,
    )
    saved = study.user_attrs.get(SPACE_ATTR)
    if saved is None:
        study.set_user_attr(SPACE_ATTR, space)
        if not study.trials:  # trial 0 is the config as written: the baseline to beat
            study.enqueue_trial(baseline_values(config), user_attrs={"baseline": True})
    elif saved != space:
        raise ConfigError(
            f"study {name!r} in {_shown(url)} was created with another search space or metric; "
            "resume it with the same tune: section, or start a new study with tune.study or --study"
        )
    return study


def _sampler(tune_cfg: TuneConfig, seed: int) -> Any:
    optuna = _optuna()
    if tune_cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune_cfg.startup_trials)


def _pruner(tune_cfg: TuneConfig) -> Any:
    optuna = _optuna()
    if tune_cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune_cfg.startup_trials)
    if tune_cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def _optimize(
    raw: dict[str, Any],
    url: str,
    name: str,
    runs_root: str,
    progress: bool,
    *,
    n_trials: int,
    seed_offset: int,
) -> None:
    config = validate_config(raw)
    metric, direction = metric_and_direction(config)
    study = _open_study(url, name, config, metric, direction, seed_offset)
    out_dir = Path(runs_root) / config.name / f"tune-{name}"
    objective = _Objective(raw, config, metric, out_dir, runs_root, progress)
    # a sampled combination the config rejects, or data too small for it, fails that trial only
    study.optimize(objective, n_trials=n_trials, catch=(ShipyardError,), gc_after_trial=True)


def _worker(
    raw: dict[str, Any],
    url: str,
    name: str,
    runs_root: str,
    progress: bool,
    n_trials: int,
    seed_offset: int,
    threads: int,
) -> None:
    """One parallel worker process: its share of the trials, on the shared study."""
    torch.set_num_threads(threads)
    _optimize(raw, url, name, runs_root, False, n_trials=n_trials, seed_offset=seed_offset)


class _Objective:
    """One trial: sample, build the config, train (or cross-validate), return the val metric."""

    def __init__(
        self,
        raw: dict[str, Any],
        config: RunConfig,
        metric: str,
        out_dir: Path,
        runs_root: str,
        progress: bool,
    ) -> None:
        assert config.tune is not None
        self.raw = raw
        self.tune = config.tune
        self.metric = metric
        self.out_dir = out_dir
        self.runs_root = runs_root
        self.progress = progress

    def __call__(self, trial: Any) -> float:
        values = sample(trial, self.tune)
        trial_raw = apply_values(self.raw, values)
        trial.set_user_attr("config", trial_raw)
        run_dir = self.out_dir / f"trial-{trial.number:04d}"
        try:
            # a combination of sampled values can be invalid even when each value alone is not
            config = validate_config(trial_raw, where=f"trial {trial.number}")
            trial.set_user_attr("run_dir", str(run_dir))
            if self.tune.cv_folds:
                return self._cross_validated(trial, config, run_dir)
            result = fit(
                config,
                run_dir=run_dir,
                runs_root=self.runs_root,
                callbacks=[PruningCallback(trial, self.metric)],
                progress=self.progress,
            )
            value = result.metrics.get("val", {}).get(self.metric)
            if value is None:
                raise DataError(
                    f"trial {trial.number}: no val {self.metric}; the config needs a val split"
                )
        except ShipyardError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        return float(value)

    def _cross_validated(self, trial: Any, config: RunConfig, run_dir: Path) -> float:
        optuna = _optuna()
        k = self.tune.cv_folds
        assert k is not None

        def report(_: FoldResult, done: list[FoldResult]) -> None:
            values = [f.metrics[self.metric] for f in done]
            trial.report(sum(values) / len(values), len(done))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {len(done) - 1}")

        cv = cross_validate(config, k, out_dir=run_dir, runs_root=self.runs_root, on_fold=report)
        trial.set_user_attr("cv_std", cv.std.get(self.metric))
        trial.set_user_attr("run_dir", None)
        trial.set_user_attr("cv_dir", str(run_dir))
        return cv.mean[self.metric]


class PruningCallback:
    """A `fit` callback: report each validation's metric to an Optuna trial (step = the n-th
    validation) and raise optuna.TrialPruned when its pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.evaluations = 0

    def __call__(self, info: StepInfo) -> None:
        if info.val is None or self.metric not in info.val:
            return
        self.evaluations += 1
        self.trial.report(info.val[self.metric], self.evaluations)
        if self.trial.should_prune():
            raise _optuna().TrialPruned(
                f"pruned at validation {self.evaluations} (step {info.step}): "
                f"val {self.metric} = {info.val[self.metric]:.4g}"
            )


def baseline_values(config: RunConfig) -> dict[str, Any]:
    """The config's own values of the searched keys (as Optuna params), where they lie in the
    space; trial 0 of a new study uses them, so the search starts from the config as written."""
    assert config.tune is not None
    plain = config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, p in config.tune.params.items():
        node: Any = plain
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        if p.choices is not None:
            primitive = all(c is None or isinstance(c, bool | int | float | str) for c in p.choices)
            if node in p.choices:
                out[key] = node if primitive else json.dumps(node)
        elif isinstance(node, int | float) and p.low <= node <= p.high:  # type: ignore[operator]
            out[key] = node
    return out


def sample(trial: Any, tune_cfg: TuneConfig) -> dict[str, Any]:
    """Values for one trial, in the order of `tune.params`; a key whose `when` fails is skipped."""
    values: dict[str, Any] = {}
    for key, p in tune_cfg.params.items():
        if not all(
            key_ in values and values[key_] in (cond if isinstance(cond, list) else [cond])
            for key_, cond in (p.when or {}).items()
        ):
            continue
        if p.choices is not None:
            if all(c is None or isinstance(c, bool | int | float | str) for c in p.choices):
                values[key] = trial.suggest_categorical(key, p.choices)
            else:  # lists and mappings: Optuna stores their JSON text
                text = trial.suggest_categorical(key, [json.dumps(c) for c in p.choices])
                values[key] = json.loads(text)
        elif p.is_int:
            assert isinstance(p.low, int) and isinstance(p.high, int)
            values[key] = trial.suggest_int(key, p.low, p.high, step=int(p.step or 1), log=p.log)
        else:
            assert p.low is not None and p.high is not None
            values[key] = trial.suggest_float(
                key, float(p.low), float(p.high), step=p.step, log=p.log
            )
    return values


def _register_best(
    best_raw: dict[str, Any],
    run_dir: Path | None,
    out_dir: Path,
    config: RunConfig,
    runs_root: str | Path,
) -> str:
    """Register the best run's package; a cross-validated best is first trained on every fold."""
    if run_dir is None:
        best = validate_config(best_raw)
        assert config.tune is not None and config.tune.cv_folds  # only CV trials have no run
        k = config.tune.cv_folds
        final = fit(fold_config(best, k, None), run_dir=out_dir / "best-final", runs_root=runs_root)
        run_dir = final.run_dir
    package = run_dir / "package"
    if not package.is_dir():
        raise TrainError(f"{run_dir} has no package; run `shipyard package {run_dir}` and register")
    with Registry() as registry:
        mv = registry.register(package, name=config.name)
    return mv.ref


def _trial_row(t: Any) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": t.params,
        "run_dir": t.user_attrs.get("run_dir") or t.user_attrs.get("cv_dir"),
        "error": t.user_attrs.get("error"),
        "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
    }


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
