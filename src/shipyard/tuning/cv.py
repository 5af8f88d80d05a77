"""k-fold cross-validation: K ordinary runs on the pooled train+val rows, then mean ± std.

`cross_validate(config, folds=5)` runs `fit` once per fold, each with `data.folds` set so the
fold's rows are its validation split and the other folds its training split (stratified for
classification, grouped by `data.group_column` when set, seeded by `config.seed`). A fold run has
no test split at all, so the test rows never influence a fold. With `final=True` one more run
trains on every fold and reports on the untouched test split.

Writes into `out_dir`: `fold-<i>/` (normal run directories), `cv.json` (per-fold metrics, means,
standard deviations), `cv.md` (a table) and `cv.png` (each fold's value of the primary metric with
the mean ± std band), and `final/` when asked.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from shipyard.config import RunConfig, validate_config
from shipyard.errors import ConfigError
from shipyard.evaluate.metrics import primary_metric
from shipyard.train import fit


@dataclass
class FoldResult:
    """One fold's run: its directory, validation metrics (scalars) and split sizes."""

    fold: int
    run_dir: Path
    metrics: dict[str, float]
    sizes: dict[str, int]


@dataclass
class CVResult:
    """The outcome of `cross_validate`."""

    out_dir: Path
    k: int
    metric: str
    folds: list[FoldResult]
    mean: dict[str, float]
    std: dict[str, float]
    final: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (what cv.json holds)."""
        return {
            "k": self.k,
            "metric": self.metric,
            "mean": self.mean,
            "std": self.std,
            "folds": [
                {"fold": f.fold, "run_dir": str(f.run_dir), "sizes": f.sizes, "val": f.metrics}
                for f in self.folds
            ],
            "final": self.final,
            **self.extra,
        }


FoldCallback = Callable[[FoldResult, list[FoldResult]], None]


def fold_config(
    config: RunConfig, k: int, index: int | None, *, stratify: bool = True
) -> RunConfig:
    """`config` for fold `index` of `k` (None: the final run on every fold); no tune section."""
    raw = config.model_dump(mode="json")
    raw["data"]["folds"] = {"k": k, "index": index, "stratify": stratify}
    raw["tune"] = None
    return validate_config(raw, where=f"{config.name} (fold {index} of {k})")


def summarize(
    fold_metrics: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (n - 1; 0 for one fold) of every scalar metric that
    every fold reports."""
    if not fold_metrics:
        return {}, {}
    keys = [
        k
        for k, v in fold_metrics[0].items()
        if _is_number(v) and all(_is_number(m.get(k)) for m in fold_metrics)
    ]
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    n = len(fold_metrics)
    for key in keys:
        values = [float(m[key]) for m in fold_metrics]
        mu = sum(values) / n
        mean[key] = mu
        std[key] = math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def cross_validate(
    config: RunConfig,
    folds: int = 5,
    *,
    stratify: bool = True,
    workers: int = 1,
    final: bool = False,
    out_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
    on_fold: FoldCallback | None = None,
    progress: bool = False,
) -> CVResult:
    """Run k-fold cross-validation of `config` (see the module docstring); returns the summary.

    workers: folds trained at once in separate processes (each gets cores/workers threads).
    on_fold: called after each fold with its result and all results so far (in sequence mode it
        may raise to stop, e.g. to prune a hyperparameter trial).
    """
    if config.task == "language-modeling":
        raise ConfigError(
            "cross-validation works for classification and regression, not language-modeling"
        )
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    configs = [fold_config(config, folds, i, stratify=stratify) for i in range(folds)]
    if out_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out_dir = Path(runs_root) / config.name / f"cv-{stamp}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[FoldResult] = []
    if workers == 1:
        for i, cfg in enumerate(configs):
            result = fit(cfg, run_dir=out / f"fold-{i}", runs_root=runs_root, progress=progress)
            results.append(_fold_result(i, result.run_dir, result.metrics.get("val", {})))
            if on_fold is not None:
                on_fold(results[-1], list(results))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, folds), mp_context=ctx) as pool:
            futures = [
                pool.submit(
                    _run_fold_process,
                    cfg.model_dump(mode="json"),
                    str(out / f"fold-{i}"),
                    str(runs_root),
                    threads,
                )
                for i, cfg in enumerate(configs)
            ]
            for i, future in enumerate(futures):
                results.append(_fold_result(i, out / f"fold-{i}", future.result()))
                if on_fold is not None:
                    on_fold(results[-1], list(results))
    mean, std = summarize([r.metrics for r in results])
    metric = primary_metric(config.task)[0]
    cv = CVResult(
        out, folds, metric, results, mean, std, extra={"seed": config.seed, "name": config.name}
    )
    if final:
        result = fit(
            fold_config(config, folds, None, stratify=stratify),
            run_dir=out / "final",
            runs_root=runs_root,
            progress=progress,
        )
        cv.final = {"run_dir": str(result.run_dir), "test": _scalars(result.metrics.get("test"))}
    write_cv_report(cv)
    return cv


def write_cv_report(cv: CVResult) -> None:
    """cv.json, cv.md and cv.png in `cv.out_dir`."""
    (cv.out_dir / "cv.json").write_text(json.dumps(cv.to_dict(), indent=2), encoding="utf-8")
    (cv.out_dir / "cv.md").write_text(cv_markdown(cv), encoding="utf-8")
    (cv.out_dir / "cv.png").write_bytes(_plot(cv))


def cv_markdown(cv: CVResult) -> str:
    """A Markdown table: one row per metric, one column per fold, then mean ± std."""
    keys = list(cv.mean)
    head = ["metric", *(f"fold {f.fold}" for f in cv.folds), "mean ± std"]
    lines = [
        f"# {cv.extra.get('name', 'run')}: {cv.k}-fold cross-validation (validation metrics)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for key in keys:
        cells = [f"{f.metrics[key]:.4f}" for f in cv.folds]
        lines.append(
            f"| {key} | " + " | ".join(cells) + f" | {cv.mean[key]:.4f} ± {cv.std[key]:.4f} |"
        )
    if cv.final is not None:
        lines += ["", f"Final model on every fold: {cv.final['run_dir']}", ""]
        for key, value in cv.final["test"].items():
            lines.append(f"- test {key}: {value:.4f}")
    return "\n".join(lines) + "\n"


def _plot(cv: CVResult) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    key = cv.metric if cv.metric in cv.mean else next(iter(cv.mean), None)
    if key is not None:
        xs = [f.fold for f in cv.folds]
        ax.bar(xs, [f.metrics[key] for f in cv.folds], color="#4c72b0", label="fold")
        mu, sd = cv.mean[key], cv.std[key]
        ax.axhline(mu, color="black", label=f"mean {mu:.4f}")
        ax.axhspan(mu - sd, mu + sd, color="gray", alpha=0.3, label=f"± std {sd:.4f}")
        low = min(f.metrics[key] for f in cv.folds)
        ax.set_ylim(max(0.0, low - 3 * sd - 0.05 * abs(low)), None)
        ax.set_xticks(xs)
        ax.set_xlabel("fold")
        ax.set_ylabel(f"val {key}")
        ax.legend(loc="best")
    ax.set_title(f"{cv.k}-fold cross-validation")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _run_fold_process(
    raw: dict[str, Any], run_dir: str, runs_root: str, threads: int
) -> dict[str, float]:
    """One fold in a worker process (spawned; returns only plain data)."""
    torch.set_num_threads(threads)
    config = validate_config(raw)
    result = fit(config, run_dir=run_dir, runs_root=runs_root)
    return _scalars(result.metrics.get("val"))


def _fold_result(fold: int, run_dir: Path, metrics: Mapping[str, Any]) -> FoldResult:
    data_file = Path(run_dir) / "data.json"
    sizes: dict[str, int] = {}
    if data_file.is_file():
        sizes = json.loads(data_file.read_text())["info"]["split_sizes"]
    return FoldResult(fold, Path(run_dir), _scalars(metrics), sizes)


def _scalars(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
