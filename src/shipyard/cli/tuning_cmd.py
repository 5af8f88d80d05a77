"""`shipyard cv` and `shipyard tune`: model selection over ordinary runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from shipyard.cli.tables import print_rows
from shipyard.config import apply_override, load_config, load_raw_config, validate_config

if TYPE_CHECKING:
    from shipyard.tuning.cv import CVResult
    from shipyard.tuning.tune import TuneResult

console = Console()


def cv(
    config_file: Path = typer.Argument(..., help="Run config (YAML)."),
    folds: int = typer.Option(5, "--folds", "-k", min=2, help="Number of folds (K runs)."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: section.key=value (repeatable)."
    ),
    group_column: str | None = typer.Option(
        None, "--group-column", help="CSV/JSONL column: rows of one group stay in one fold."
    ),
    stratify: bool = typer.Option(
        True, "--stratify/--no-stratify", help="Classification: same class mix in every fold."
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Folds trained at once (processes)."),
    final: bool = typer.Option(
        False, "--final", help="Then train on every fold and report on the untouched test split."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output directory (default runs/NAME/cv-TIMESTAMP)."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars (default: when stderr is a terminal)."
    ),
) -> None:
    """Cross-validate a config: K ordinary runs on train+val, metrics as mean ± std.

    Example: shipyard cv examples/digits-mlp.yaml --folds 5 --set train.epochs=10

    Grouped, in 2 processes, then a final model: shipyard cv my.yaml -k 5 --group-column
    patient_id --workers 2 --final
    """
    from shipyard.tuning import cross_validate

    raw, where = load_raw_config(config_file, overrides)
    if group_column is not None:
        apply_override(raw, f"data.group_column={group_column}")
    config = validate_config(raw, where=where)
    show = progress if progress is not None else sys.stderr.isatty()
    result = cross_validate(
        config,
        folds,
        stratify=stratify,
        workers=workers,
        final=final,
        out_dir=out,
        progress=show,
    )
    header, rows = cv_table(result)
    title = f"{config.name}: {folds}-fold cross-validation (val)"
    print_rows(console, header, rows, title=title, right=header[1:])
    if result.final is not None:
        test = ", ".join(f"{k} {v:.4f}" for k, v in result.final["test"].items())
        console.print(f"final model: {result.final['run_dir']} (test: {test})", highlight=False)
    console.print(f"report: {result.out_dir / 'cv.md'} (cv.json, cv.png)", highlight=False)


def tune(
    config_file: Path = typer.Argument(..., help="Run config (YAML) with a tune: section."),
    trials: int = typer.Option(..., "--trials", "-n", min=1, help="Trials to add to the study."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: section.key=value (repeatable)."
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Parallel worker processes."),
    study: str | None = typer.Option(
        None, "--study", help="Study name (default: tune.study, else the run name)."
    ),
    storage: str | None = typer.Option(
        None, "--storage", help="Study database URL (default: the registry's database)."
    ),
    register: bool = typer.Option(
        False, "--register", help="Register the best run's package in the registry."
    ),
) -> None:
    """Search hyperparameters with Optuna; rerunning resumes the study and adds trials.

    Example: shipyard tune examples/digits-tune.yaml --trials 8

    Four worker processes, then register the best: shipyard tune examples/digits-tune.yaml
    --trials 32 --workers 4 --register
    """
    from shipyard.tuning import tune as run_tune

    load_config(config_file, overrides)  # a bad config fails here, before Optuna is touched
    result = run_tune(
        config_file,
        trials,
        overrides=overrides,
        workers=workers,
        storage=storage,
        study_name=study,
        register=register,
    )
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.counts.items()))
    header, rows = trials_table(result)
    title = f"study {result.study}: {len(result.trials)} trials ({counts})"
    print_rows(console, header, rows, title=title, right=header[:2])
    console.print(
        f"best: trial {result.best_trial}, val {result.metric} {result.best_value:.4f}; "
        f"config: {result.best_config}",
        highlight=False,
    )
    if result.registered:
        console.print(f"registered: {result.registered}", highlight=False)


def cv_table(result: CVResult) -> tuple[list[str], list[list[str]]]:
    """A row per validation metric: its value in each fold, then mean ± std."""
    header = ["metric", *(f"fold {f.fold}" for f in result.folds), "mean ± std"]
    rows = [
        [
            key,
            *(f"{f.metrics[key]:.4f}" for f in result.folds),
            f"{result.mean[key]:.4f} ± {result.std[key]:.4f}",
        ]
        for key in result.mean
    ]
    return header, rows


def trials_table(result: TuneResult, top: int = 10) -> tuple[list[str], list[list[str]]]:
    """The `top` finished trials, best first: number, value, parameters."""
    done = [t for t in result.trials if t["value"] is not None]
    done.sort(key=lambda t: t["value"], reverse=result.direction == "maximize")
    rows = [
        [
            str(t["number"]),
            f"{t['value']:.4f}",
            ", ".join(f"{k}={_short(v)}" for k, v in t["params"].items()),
        ]
        for t in done[:top]
    ]
    return ["trial", f"val {result.metric}", "params"], rows


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
