"""What a compression report measures: size, parameters and sparsity, latency and throughput
through `LoadedModel.predict_arrays`, and quality on the held-out test split.

Timing runs on this machine, at the current `torch.get_num_threads()`; parent and child are timed
in alternating rounds so a change in machine load affects both alike.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shipyard.compress.layers import DynamicInt8Linear, Int8Linear
from shipyard.config import RunConfig
from shipyard.data import PreparedData
from shipyard.kernels import cpu_flags
from shipyard.package import LoadedModel, manifest_sha256
from shipyard.train.evaluation import evaluate_model

QUALITY_METRICS = {
    "classification": ("accuracy", "f1_macro"),
    "regression": ("mse", "mae"),
    "language-modeling": ("perplexity", "loss"),
}


@dataclass(frozen=True)
class BenchParams:
    """How long to time each model: batch-1 calls for latency, batch calls for throughput."""

    latency_calls: int = 200
    throughput_calls: int = 30
    batch_size: int = 32
    warmup: int = 5
    rounds: int = 4
    threads: int | None = None  # torch (and ONNX Runtime) threads while timing; None = as set

    def __post_init__(self) -> None:
        if min(self.latency_calls, self.throughput_calls, self.batch_size, self.rounds) < 1:
            raise ValueError("bench counts must be >= 1")


# ------------------------------------------------------------------------------------ size


def package_bytes(path: Path) -> int:
    """Bytes of every file a package lists (what a registry stores and a server downloads)."""
    return sum((path / f).stat().st_size for f in os.listdir(path))


def weight_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weight matrices pruning and sparsity are about: Linear and Conv weights, int8 or not;
    a Linear whose weight is shared (a tied LM head) is left out, as pruning leaves it."""
    counts: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            counts[id(param)] = counts.get(id(param), 0) + 1
    out = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear | DynamicInt8Linear):
            out.append((name, module.weight_int8))
        elif (
            isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)
            and counts.get(id(module.weight), 0) == 1
        ):
            out.append((name, module.weight))
    return out


def model_stats(loaded: LoadedModel) -> dict[str, Any]:
    """Stored parameters (int8 weights count as parameters; scales don't) and weight sparsity."""
    model = loaded.model
    if loaded.manifest.backend == "onnxruntime":
        return _onnx_stats(loaded)
    params = sum(p.numel() for p in model.parameters())
    params += sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight_int8"))
    layers = weight_layers(model)
    total = sum(w.numel() for _, w in layers)
    zeros = sum(int((w == 0).sum()) for _, w in layers)
    return {"parameters": int(params), "sparsity": zeros / total if total else 0.0}


def _onnx_stats(loaded: LoadedModel) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string((loaded.path / "model.onnx").read_bytes())
    params = zeros = total = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        params += arr.size
        if arr.ndim >= 2:
            total += arr.size
            zeros += int((arr == 0).sum())
    return {"parameters": int(params), "sparsity": zeros / total if total else 0.0}


# ------------------------------------------------------------------------------------ speed


def _time_calls(loaded: LoadedModel, batches: list[np.ndarray]) -> list[float]:
    out = []
    for x in batches:
        start = time.perf_counter()
        loaded.predict_arrays(x)
        out.append(time.perf_counter() - start)
    return out


def time_models(
    models: dict[str, LoadedModel], x: np.ndarray, params: BenchParams
) -> dict[str, dict[str, float]]:
    """Latency p50/p99 (ms) at batch 1 and throughput (rows/s) at `batch_size` for each model,
    on rows of `x`, in alternating rounds."""
    if params.threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(params.threads)
        for loaded in models.values():
            session = getattr(loaded.model, "session", None)
            if session is not None:  # ONNX Runtime fixes its threads when the session is made
                loaded.model.set_threads(params.threads)  # type: ignore[operator]
        try:
            return time_models(models, x, replace(params, threads=None))
        finally:
            torch.set_num_threads(previous)
    n = len(x)
    singles = [x[i % n : i % n + 1] for i in range(params.latency_calls)]
    reps = -(-params.batch_size // n)
    big = np.concatenate([x] * reps)[: params.batch_size] if reps > 1 else x[: params.batch_size]
    lat: dict[str, list[float]] = {k: [] for k in models}
    thr: dict[str, list[float]] = {k: [] for k in models}
    for loaded in models.values():
        _time_calls(loaded, singles[: params.warmup] + [big] * params.warmup)
    per_round = max(1, params.latency_calls // params.rounds)
    per_round_big = max(1, params.throughput_calls // params.rounds)
    for r in range(params.rounds):
        for name, loaded in models.items():
            lat[name] += _time_calls(loaded, singles[r * per_round : (r + 1) * per_round])
            thr[name] += _time_calls(loaded, [big] * per_round_big)
    result = {}
    for name in models:
        ms = np.asarray(lat[name]) * 1e3
        result[name] = {
            "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p99_ms": float(np.percentile(ms, 99)),
            "throughput_rows_per_s": float(params.batch_size / np.median(thr[name])),
        }
        if x.ndim == 2 and x.dtype == np.int64:  # token rows: tokens per second too
            result[name]["throughput_tokens_per_s"] = (
                result[name]["throughput_rows_per_s"] * x.shape[1]
            )
    return result


# ------------------------------------------------------------------------------------ quality


def quality(model: nn.Module, data: PreparedData, config: RunConfig) -> dict[str, float]:
    """The task's quality metrics on the test split (the trainer's own evaluation code)."""
    metrics = evaluate_model(model, data, "test", config, device=torch.device("cpu"))
    keys = QUALITY_METRICS[config.task]
    return {k: float(metrics[k]) for k in keys if k in metrics}


# ------------------------------------------------------------------------------------ report


def build_report(
    *,
    parent: LoadedModel,
    child: LoadedModel,
    parent_quality: dict[str, float],
    child_quality: dict[str, float],
    timings: dict[str, dict[str, float]],
    derivation: dict[str, Any],
    bench: BenchParams,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict: one row per model, and the child's change relative to the parent."""
    rows = {}
    for key, loaded, q in (("parent", parent, parent_quality), ("child", child, child_quality)):
        m = loaded.manifest
        rows[key] = {
            "name": m.name,
            "version": m.version,
            "path": str(loaded.path),
            "manifest_sha256": manifest_sha256(loaded.path),  # which package was measured
            "backend": m.backend,
            "file_bytes": package_bytes(loaded.path),
            **model_stats(loaded),
            **timings[key],
            "quality": q,
        }
    p, c = rows["parent"], rows["child"]
    delta = {
        "size_ratio": c["file_bytes"] / p["file_bytes"],
        "speedup_batch1_p50": p["latency_p50_ms"] / c["latency_p50_ms"],
        f"speedup_batch{bench.batch_size}": c["throughput_rows_per_s"] / p["throughput_rows_per_s"],
        "quality": {k: c["quality"][k] - v for k, v in p["quality"].items() if k in c["quality"]},
    }
    return {
        "task": parent.manifest.task,
        "derivation": derivation,
        "parent": p,
        "child": c,
        "delta": delta,
        "bench": asdict(bench),
        "machine": machine(),
        **(extra or {}),
    }


# The instruction-set extensions PyTorch's CPU kernels (and hashing) can use, in report order.
REPORTED_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "sha_ni",
)


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo; else what `platform` knows (often just the arch)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU model and relevant flags, cores, threads, versions."""
    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": [f for f in REPORTED_CPU_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def describe_machine(m: dict[str, Any]) -> str:
    """`machine()` as one line, for the top of a benchmark's output and a report."""
    flags = " ".join(m["cpu_flags"]) or "no listed flags"
    return (
        f"{m['cpu_model']} ({flags}), {m['cpu_count']} CPUs, {m['torch_threads']} torch "
        f"threads, torch {m['torch']}, {m['date']}"
    )


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.4g}"


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """The report as table rows (header first): one row per model."""
    batch = report["bench"]["batch_size"]
    qkeys = list(report["parent"]["quality"])
    header = [
        "model",
        "size (KB)",
        "params",
        "sparsity",
        "p50 b1 (ms)",
        "p99 b1 (ms)",
        f"rows/s b{batch}",
        *qkeys,
    ]
    rows = [header]
    for key in ("parent", "child"):
        r = report[key]
        rows.append(
            [
                f"{key}: {r['version']}",
                f"{r['file_bytes'] / 1024:.1f}",
                f"{r['parameters']:,}",
                f"{r['sparsity']:.1%}",
                f"{r['latency_p50_ms']:.3f}",
                f"{r['latency_p99_ms']:.3f}",
                f"{r['throughput_rows_per_s']:.0f}",
                *(_fmt(r["quality"].get(k, math.nan)) for k in qkeys),
            ]
        )
    d = report["delta"]
    rows.append(
        [
            "change",
            f"x{d['size_ratio']:.2f}",
            "",
            "",
            f"x{1 / d['speedup_batch1_p50']:.2f}",
            "",
            f"x{d[f'speedup_batch{batch}']:.2f}",
            *(f"{d['quality'].get(k, math.nan):+.4g}" for k in qkeys),
        ]
    )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    """Rows (header first) as a Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m = report["machine"]
    text = (
        f"# Compression report: {report['derivation'].get('method')}\n\n"
        f"Parent `{report['parent']['path']}`, child `{report['child']['path']}`.\n\n"
        + markdown_table(report_rows(report))
        + f"\nLatency: batch 1 through `LoadedModel.predict_arrays`; throughput at batch "
        f"{report['bench']['batch_size']}. Quality: the test split. Measured on "
        f"{describe_machine(m)}.\n\n"
        f"Derivation: `{json.dumps(report['derivation'])}`\n"
    )
    (out / "report.md").write_text(text, encoding="utf-8")


__all__ = [
    "BenchParams",
    "build_report",
    "cpu_model",
    "describe_machine",
    "machine",
    "quality",
    "time_models",
    "write_report",
]
