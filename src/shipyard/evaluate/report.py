"""Evaluation reports: `report.json`, a Markdown summary and PNG plots in a run directory.

Every file is written atomically (temp file in the same directory, fsync, rename), so a crash
never leaves a half-written report behind. Plots use matplotlib's object API with the Agg canvas:
no display, no global backend switch.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, TypeGuard

from shipyard.evaluate.metrics import EvaluateError
from shipyard.fileio import atomic_write

# Which split's confusion matrix to draw, in order of preference.
_CONFUSION_SPLITS = ("test", "val", "validation", "train")
# Above this many classes the cells are too small to print counts in.
_MAX_ANNOTATED_CLASSES = 30


def write_report(
    run_dir: Path,
    results: dict[str, dict[str, Any]],
    *,
    history: list[dict[str, Any]] | None = None,
    title: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `run_dir`; return {kind: path} of each file.

    results: metrics per split, e.g. {"val": {...}, "test": {...}} from `MetricSet.compute()`.
    history: metrics.jsonl records (see `read_history`) for the loss and learning-rate plots.
    extra: more top-level JSON sections, e.g. {"run": {"config": ..., "seconds": ...}}.
    The keys of the returned dict are "json", "markdown", and "loss", "lr", "confusion_matrix"
    for each plot that had data.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    clash = sorted(set(results) & set(extra))
    if clash:
        raise EvaluateError(f"extra sections {clash} clash with result splits of the same name")

    written: dict[str, Path] = {}
    plots: dict[str, bytes] = {}
    if history:
        loss_png = _plot_loss(history)
        if loss_png is not None:
            plots["loss"] = loss_png
        lr_png = _plot_lr(history)
        if lr_png is not None:
            plots["lr"] = lr_png
    confusion_split = _confusion_split(results)
    if confusion_split is not None:
        split_results = results[confusion_split]
        plots["confusion_matrix"] = _plot_confusion(
            split_results["confusion_matrix"],
            list(split_results.get("per_class", {})),
            f"Confusion matrix ({confusion_split})",
        )
    for kind, png in plots.items():
        written[kind] = atomic_write(run_dir / f"{kind}.png", png)

    document = _jsonable({**results, **extra})
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    written["json"] = atomic_write(run_dir / "report.json", text.encode())
    markdown = _markdown(results, extra, title, sorted(plots), confusion_split)
    written["markdown"] = atomic_write(run_dir / "report.md", markdown.encode())
    return written


def read_history(path: Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file, one record per line, skipping a truncated last line.

    A crash while the trainer was writing leaves a partial last line; it is dropped. A broken line
    anywhere else means the file is corrupt and raises `EvaluateError`.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"no metrics history at {path}; was the run started in that directory?")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # cut off mid-write
            message = f"{path}:{number} is not a JSON record ({err}); the file is corrupt"
            raise EvaluateError(message) from err
        if not isinstance(record, dict):
            raise EvaluateError(f"{path}:{number} is a JSON {type(record).__name__}, not a record")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------- files


def _jsonable(value: Any) -> Any:
    """Plain JSON values; tensors/arrays become lists and non-finite floats become null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(value.tolist())
    raise EvaluateError(f"cannot write {type(value).__name__} value {value!r} to report.json")


# ------------------------------------------------------------------------------------- markdown


def _is_scalar(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.4f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _markdown(
    results: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    title: str,
    plots: list[str],
    confusion_split: str | None,
) -> str:
    out = [f"# {title or 'Evaluation report'}", ""]
    splits = list(results)
    names: list[str] = []
    for split in splits:
        names += [k for k, v in results[split].items() if _is_scalar(v) and k not in names]
    if names:
        out += ["## Metrics", ""]
        rows = [
            [name] + [_fmt(results[s][name]) if name in results[s] else "" for s in splits]
            for name in names
        ]
        out += [*_table(["metric", *splits], rows), ""]
    elif not results:
        out += ["No evaluation results.", ""]

    for split in splits:
        per_class = results[split].get("per_class")
        if not isinstance(per_class, dict) or not per_class:
            continue
        out += [f"## Per class ({split})", ""]
        rows = [
            [name]
            + [_fmt(stats.get(k, math.nan)) for k in ("precision", "recall", "f1")]
            + [str(stats.get("support", ""))]
            for name, stats in per_class.items()
        ]
        out += [*_table(["class", "precision", "recall", "f1", "support"], rows), ""]

    if confusion_split is not None:
        matrix = results[confusion_split]["confusion_matrix"]
        labels = _class_labels(results[confusion_split], len(matrix))
        out += [f"## Confusion matrix ({confusion_split})", ""]
        if len(matrix) <= _MAX_ANNOTATED_CLASSES:
            out += ["Rows are true classes, columns predicted classes.", ""]
            rows = [[labels[i], *(str(v) for v in row)] for i, row in enumerate(matrix)]
            out += [*_table(["true \\ predicted", *labels], rows), ""]
        if "confusion_matrix" in plots:
            out += ["![confusion matrix](confusion_matrix.png)", ""]

    curves = [p for p in ("loss", "lr") if p in plots]
    if curves:
        out += ["## Training curves", ""]
        captions = {"loss": "loss", "lr": "learning rate"}
        out += [f"![{captions[p]}]({p}.png)" for p in curves] + [""]

    if extra:
        out += ["## Run", "", "```json", json.dumps(_jsonable(extra), indent=2), "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- plots


def _confusion_split(results: dict[str, dict[str, Any]]) -> str | None:
    candidates = [s for s in results if results[s].get("confusion_matrix")]
    for split in _CONFUSION_SPLITS:
        if split in candidates:
            return split
    return candidates[0] if candidates else None


def _class_labels(split_results: dict[str, Any], n: int) -> list[str]:
    names = list(split_results.get("per_class", {}))
    return names if len(names) == n else [str(i) for i in range(n)]


def _series(history: list[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in records of `kind`; a later record for a step wins (resume)."""
    by_step: dict[float, float] = {}
    for record in history:
        if record.get("kind") != kind:
            continue
        step, value = record.get("step"), record.get(key)
        if isinstance(value, list | tuple) and value:
            value = value[0]  # one learning rate per param group: plot the first
        if _is_scalar(step) and _is_scalar(value) and math.isfinite(value):
            by_step[float(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _new_figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plot_loss(history: list[dict[str, Any]]) -> bytes | None:
    train_steps, train_loss = _series(history, "train", "loss")
    val_steps, val_loss = _series(history, "val", "loss")
    if not train_steps and not val_steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    if train_steps:
        ax.plot(train_steps, train_loss, label="train", linewidth=1.2)
    if val_steps:
        ax.plot(val_steps, val_loss, "o-", label="validation", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def _plot_lr(history: list[dict[str, Any]]) -> bytes | None:
    steps, lrs = _series(history, "train", "lr")
    if not steps:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(steps, lrs, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _plot_confusion(matrix: list[list[int]], class_names: list[str], title: str) -> bytes:
    n = len(matrix)
    labels = class_names if len(class_names) == n else [str(i) for i in range(n)]
    side = min(4.0 + 0.35 * n, 20.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= _MAX_ANNOTATED_CLASSES:
        peak = max((max(row) for row in matrix if row), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if peak and count > peak / 2 else "black"
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=max(6, 14 - n // 2),
                )
    return _png(fig)
