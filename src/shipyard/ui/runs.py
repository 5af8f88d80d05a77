"""Reading run directories for the dashboard: summaries, downsampled series, tails, config diffs.

A run directory (written by `shipyard.train`) holds `config.yaml`, an append-only
`metrics.jsonl` (records of kind `train`, `val` and, at the end, `final`), and after a finished
run `report.json`, plots, `checkpoints/` and `package/`. Everything here only reads them.

Parsed records are cached per file and keyed by (inode, size, mtime): a listing of thousands of
runs re-reads only the runs that changed, a growing metrics.jsonl is parsed from where the last
read stopped, not from the start, and one replaced by a resume (a new file) is read afresh.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from shipyard.config import EarlyStoppingConfig
from shipyard.errors import ShipyardError
from shipyard.evaluate.metrics import EvaluateError, primary_metric
from shipyard.package import MANIFEST
from shipyard.train.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PACKAGE_DIR,
    REPORT_FILE,
)

RUNNING_WINDOW_S = 120.0  # a run without a final record that wrote this recently is "running"
X_AXES = ("step", "epoch", "time")
_MAX_DEPTH = 4  # runs/<name>/<timestamp> sits at depth 2; allow some nesting (cv folds, trials)
_SKIP_DIRS = {CHECKPOINTS_DIR, PACKAGE_DIR, "__pycache__", ".git"}
# libyaml's safe loader when present (same safety, ~10x faster on thousands of configs)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UIError(ShipyardError):
    """A dashboard request named something that does not exist or is not allowed."""


class RunNotFound(UIError):
    """A run id that names no run under the runs folder (or is not a valid id)."""


# ------------------------------------------------------------------------------ records


@dataclass
class _Parsed:
    """The records of one metrics.jsonl read so far (appended to as the file grows)."""

    inode: int = 0
    offset: int = 0
    mtime: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)


class RunStore:
    """The runs under `root`, read on demand and cached; safe to share between threads."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()
        self._parsed: dict[Path, _Parsed] = {}
        self._summaries: dict[Path, tuple[tuple[float, int, float, int], dict[str, Any]]] = {}
        self._configs: dict[Path, tuple[float, dict[str, Any]]] = {}
        self._series: dict[tuple[Any, ...], tuple[tuple[int, int], dict[str, Any]]] = {}

    # -- finding runs ------------------------------------------------------------------

    def run_dirs(self) -> list[Path]:
        """Every directory under root (depth <= 4) that has a config and metrics file."""
        found: list[Path] = []
        if not self.root.is_dir():
            return found

        def walk(path: Path, depth: int) -> None:
            try:
                entries = list(os.scandir(path))
            except OSError:
                return
            names = {e.name for e in entries}
            if CONFIG_FILE in names and METRICS_FILE in names:
                found.append(path)
                return
            if depth >= _MAX_DEPTH:
                return
            for entry in entries:
                if entry.name in _SKIP_DIRS or entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), depth + 1)

        walk(self.root, 0)
        return found

    def resolve(self, run_id: str) -> Path:
        """The run directory for `run_id` (its path relative to root); RunNotFound if not a run."""
        if not run_id or "\x00" in run_id or run_id.startswith("/") or "\\" in run_id:
            raise RunNotFound(f"invalid run id {run_id[:200]!r}: use an id from /ui/api/runs")
        parts = run_id.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RunNotFound(f"invalid run id {run_id[:200]!r}: use an id from /ui/api/runs")
        path = (self.root / run_id).resolve()
        if not path.is_relative_to(self.root) or not (path / METRICS_FILE).is_file():
            raise RunNotFound(
                f"no run {run_id[:200]!r} under {self.root}; list runs at /ui/api/runs"
            )
        return path

    def run_id(self, path: Path) -> str:
        """The id of a run directory: its path relative to root, with '/'."""
        return path.relative_to(self.root).as_posix()

    # -- reading ------------------------------------------------------------------------

    def records(self, run: Path) -> list[dict[str, Any]]:
        """All records of a run's metrics.jsonl (a cached list; do not modify it)."""
        path = run / METRICS_FILE
        try:
            stat = path.stat()
        except OSError:
            return []
        with self._lock:
            parsed = self._parsed.get(path)
            # a resume truncates the file or replaces it (a new inode, possibly already longer)
            if parsed is None or stat.st_size < parsed.offset or stat.st_ino != parsed.inode:
                parsed = self._parsed[path] = _Parsed(inode=stat.st_ino)
            if stat.st_size == parsed.offset and stat.st_mtime == parsed.mtime:
                return parsed.records
            with open(path, "rb") as fh:
                fh.seek(parsed.offset)
                chunk = fh.read(stat.st_size - parsed.offset)
            end = chunk.rfind(b"\n") + 1  # a line being written is read next time
            for line in chunk[:end].splitlines():
                record = _parse_line(line)
                if record is not None:
                    parsed.records.append(record)
            parsed.offset += end
            parsed.mtime = stat.st_mtime
            return parsed.records

    def config(self, run: Path) -> dict[str, Any]:
        """The run's resolved config as a dict."""
        path = run / CONFIG_FILE
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return {}
        with self._lock:
            cached = self._configs.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        try:
            data = yaml.load(path.read_text(), Loader=_YAML_LOADER) or {}
        except (OSError, yaml.YAMLError):
            data = {}
        data = data if isinstance(data, dict) else {}
        with self._lock:
            self._configs[path] = (mtime, data)
        return data

    def report(self, run: Path) -> dict[str, Any] | None:
        """The report (report.json) of a finished run, or None."""
        try:
            data = json.loads((run / REPORT_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- summaries ------------------------------------------------------------------------

    def summary(self, run: Path) -> dict[str, Any]:
        """One row of the runs table (cached until the metrics or the report change)."""
        metrics = run / METRICS_FILE
        try:
            st = metrics.stat()
        except OSError:
            st = None
        report_mtime = _mtime(run / REPORT_FILE)
        key = (
            st.st_mtime if st else 0.0,
            st.st_size if st else 0,
            report_mtime,
            st.st_ino if st else 0,
        )
        now = time.time()
        with self._lock:
            cached = self._summaries.get(run)
        if cached is not None and cached[0] == key:
            row = dict(cached[1])
            row["status"] = _status(row["finished"], key[0], now)
            return row
        row = self._summarise(run, key[0])
        with self._lock:
            self._summaries[run] = (key, row)
        row = dict(row)
        row["status"] = _status(row["finished"], key[0], now)
        return row

    def _summarise(self, run: Path, mtime: float) -> dict[str, Any]:
        records = self.records(run)
        config = self.config(run)
        train = [r for r in records if r.get("kind") == "train"]
        vals = [r for r in records if r.get("kind") == "val"]
        final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
        metric, mode = watched_metric(config)
        best = best_point(vals, metric, mode)
        times = [float(r["time"]) for r in train if _number(r.get("time"))]
        started = _mtime(run / CONFIG_FILE) or None
        if times and (started is None or times[0] < started):
            started = times[0]
        ended = mtime or (times[-1] if times else None)
        losses = [float(r["loss"]) for r in train if _number(r.get("loss"))]
        steps = [float(r["step"]) for r in train if _number(r.get("loss"))]
        spark = downsample(np.array(steps), np.array(losses), 48) if losses else ([], [])
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        return {
            "id": self.run_id(run),
            "name": str(config.get("name") or run.name),
            "task": config.get("task"),
            "model": (model or {}).get("name"),
            "finished": final is not None,
            "started": started,
            "duration_s": (ended - started) if (ended and started and ended >= started) else None,
            "updated": mtime,
            "steps": int(records[-1].get("step", 0)) if records else 0,
            "metric": metric,
            "mode": mode,
            "best": best,
            "final_loss": losses[-1] if losses else None,
            "spark": [float(f"{v:.4g}") for v in spark[1]],
            "has_package": (run / PACKAGE_DIR / MANIFEST).is_file(),
        }

    def list_runs(self) -> list[dict[str, Any]]:
        """Summaries of every run under root, newest first."""
        rows = [self.summary(p) for p in self.run_dirs()]
        rows.sort(key=lambda r: r["started"] or 0.0, reverse=True)
        return rows

    # -- series ---------------------------------------------------------------------------

    def series(
        self,
        run: Path,
        keys: list[str] | None = None,
        x: str = "step",
        max_points: int = 1000,
    ) -> dict[str, Any]:
        """Curves of a run: {key: {x: [...], y: [...], points, best}} for train and val keys.

        Each curve is downsampled to at most `max_points` (min/max per bucket, so spikes stay);
        `best` is computed on the full data. x is step, epoch or time (seconds since the first
        record). Train keys are named as logged (`loss`, `lr`); validation keys get `val_`.
        """
        if x not in X_AXES:
            raise UIError(f"unknown x axis {x!r}; use one of: {', '.join(X_AXES)}")
        if not 2 <= max_points <= 100_000:
            raise UIError(f"max_points={max_points} is out of range; use 2..100000")
        records = self.records(run)
        cache_key = (run, tuple(keys or ()), x, max_points)
        version = self._version(run)
        with self._lock:
            cached = self._series.get(cache_key)
        if cached is not None and cached[0] == version:
            return cached[1]
        out = self._series_uncached(run, records, keys, x, max_points)
        with self._lock:
            if len(self._series) > 256:  # a few pages' worth; old entries are cheap to redo
                self._series.clear()
            self._series[cache_key] = (version, out)
        return out

    def _series_uncached(
        self,
        run: Path,
        records: list[dict[str, Any]],
        keys: list[str] | None,
        x: str,
        max_points: int,
    ) -> dict[str, Any]:
        config = self.config(run)
        columns = collect_columns(records)
        metric, mode = watched_metric(config)
        wanted = keys if keys else default_keys(columns, metric)
        unknown = [k for k in wanted if k not in columns]
        if unknown:
            shown = ", ".join(sorted(columns)) or "none yet"
            raise UIError(f"unknown series {unknown[0]!r}; this run has: {shown}")
        t0, clock = _clock(records)
        out: dict[str, Any] = {}
        for key in wanted:
            kind, field_name = ("val", key[4:]) if key.startswith("val_") else ("train", key)
            rows = [r for r in records if r.get("kind") == kind and _number(r.get(field_name))]
            xs = np.array([_x_of(r, x, t0, clock) for r in rows], dtype=np.float64)
            ys = np.array([float(r[field_name]) for r in rows], dtype=np.float64)
            keep = np.isfinite(xs) & np.isfinite(ys)
            xs, ys = xs[keep], ys[keep]
            lower = _lower_is_better(field_name) if field_name != metric else mode == "min"
            best = None
            if len(ys):
                i = int(np.argmin(ys) if lower else np.argmax(ys))
                best = {"x": float(xs[i]), "y": float(ys[i]), "mode": "min" if lower else "max"}
            dx, dy = downsample(xs, ys, max_points)
            out[key] = {"x": dx, "y": dy, "points": len(ys), "best": best}
        return {"x_axis": x, "series": out, "columns": columns, "offset": self._offset(run)}

    def _offset(self, run: Path) -> int:
        return self._version(run)[1]

    def _version(self, run: Path) -> tuple[int, int]:
        """(inode, offset) of the parsed metrics file: what the series cache is valid for."""
        with self._lock:
            parsed = self._parsed.get(run / METRICS_FILE)
            return (parsed.inode, parsed.offset) if parsed else (0, 0)

    def tail(self, run: Path, offset: int, limit: int = 5000) -> dict[str, Any]:
        """Records appended after byte `offset` (from a previous answer), at most `limit`."""
        if offset < 0:
            raise UIError(f"offset={offset} must be >= 0 (use the offset of the last answer)")
        records = self.records(run)
        now = self._offset(run)
        if offset > now:  # the file was truncated (a resumed run): start over
            offset = 0
        with open(run / METRICS_FILE, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read(now - offset)
        new = [r for r in (_parse_line(line) for line in chunk.splitlines()) if r is not None]
        truncated = len(new) > limit
        t0, _ = _clock(records)
        return {
            "offset": now if not truncated else offset,
            "records": new[:limit] if not truncated else [],
            "reload": truncated,
            "t0": t0,
            "finished": any(r.get("kind") == "final" for r in new),
        }


# ------------------------------------------------------------------------------ helpers


def _parse_line(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _status(finished: bool, mtime: float, now: float) -> str:
    if finished:
        return "finished"
    return "running" if now - mtime < RUNNING_WINDOW_S else "stopped"


def _lower_is_better(name: str) -> bool:
    return any(word in name for word in ("loss", "error", "perplexity", "mse", "mae", "rmse"))


def watched_metric(config: dict[str, Any]) -> tuple[str, str]:
    """The validation metric a run's trainer watches (best checkpoint, early stopping) and its
    direction: the early-stopping metric when set, else the task's primary metric."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    es = (train or {}).get("early_stopping")
    if isinstance(es, dict):
        try:
            stopping = EarlyStoppingConfig.model_validate(es)
        except ValidationError:
            return "loss", "min"
        return stopping.metric, stopping.mode
    try:
        return primary_metric(config.get("task"))  # type: ignore[arg-type]
    except EvaluateError:  # not a run config shipyard knows (an old or hand-written one)
        return "loss", "min"


def best_point(vals: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best validation record for `metric`: {metric, value, step}."""
    scored = [r for r in vals if _number(r.get(metric))]
    if not scored:
        return None
    pick = min if mode == "min" else max
    best = pick(scored, key=lambda r: float(r[metric]))
    return {"metric": metric, "value": float(best[metric]), "step": best.get("step")}


def collect_columns(records: list[dict[str, Any]]) -> list[str]:
    """Plottable series names: train fields as logged, validation fields prefixed `val_`."""
    seen: dict[str, None] = {}
    for r in records:
        kind = r.get("kind")
        if kind not in ("train", "val"):
            continue
        for k, v in r.items():
            if k in ("kind", "step", "epoch", "time") or not _number(v):
                continue
            seen[k if kind == "train" else f"val_{k}"] = None
    return list(seen)


def default_keys(columns: list[str], metric: str = "loss") -> list[str]:
    """The curves a run page shows first: the losses and the watched validation metric."""
    return [c for c in dict.fromkeys(("loss", "val_loss", f"val_{metric}")) if c in columns]


def _clock(records: list[dict[str, Any]]) -> tuple[float | None, tuple[np.ndarray, np.ndarray]]:
    """Start time, and (steps, times) of train records to place val records in time."""
    pts = [
        (float(r["step"]), float(r["time"]))
        for r in records
        if r.get("kind") == "train" and _number(r.get("time")) and _number(r.get("step"))
    ]
    if not pts:
        return None, (np.zeros(0), np.zeros(0))
    steps, times = np.array(pts).T
    return float(times[0]), (steps, times)


def _x_of(
    r: dict[str, Any], x: str, t0: float | None, clock: tuple[np.ndarray, np.ndarray]
) -> float:
    if x == "step":
        return float(r.get("step", math.nan))
    if x == "epoch":
        return float(r.get("epoch", math.nan))
    if t0 is None:
        return math.nan
    if _number(r.get("time")):
        return float(r["time"]) - t0
    steps, times = clock
    if not _number(r.get("step")) or not len(steps):
        return math.nan
    return float(np.interp(float(r["step"]), steps, times)) - t0


def downsample(xs: np.ndarray, ys: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    """At most `max_points` points of (xs, ys): the first and last point, and each bucket's
    minimum and maximum in x order, so the shape and its spikes survive."""
    n = len(xs)
    if n <= max_points:
        return xs.tolist(), ys.tolist()
    buckets = max(1, (max_points - 2) // 2)
    inner = np.arange(1, n - 1)
    edges = np.linspace(0, len(inner), buckets + 1).astype(np.int64)
    keep = [0]
    for lo, hi in itertools.pairwise(edges.tolist()):
        if hi <= lo:
            continue
        idx = inner[lo:hi]
        seg = ys[idx]
        a, b = int(idx[int(np.argmin(seg))]), int(idx[int(np.argmax(seg))])
        keep.extend(sorted({a, b}))
    keep.append(n - 1)
    sel = np.array(keep)
    return xs[sel].tolist(), ys[sel].tolist()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.key: value} (lists kept as values)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not data and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: data}


def config_diff(configs: list[dict[str, Any]], *, full: bool = False) -> dict[str, list[Any]]:
    """{dotted key: [value per run]} for keys whose values differ (all keys with `full`)."""
    flats = [flatten(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    missing = object()
    out: dict[str, list[Any]] = {}
    for key in keys:
        values = [f.get(key, missing) for f in flats]
        differ = any(
            json.dumps(v, default=str) != json.dumps(values[0], default=str) for v in values
        )
        if full or differ:
            out[key] = [None if v is missing else v for v in values]
    return out
