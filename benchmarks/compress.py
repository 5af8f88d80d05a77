"""Compression trade-offs: size, parameters/sparsity, latency, throughput and quality per method.

Trains three parents in a temp dir (the digits MLP [128, 64]; a larger MLP [1024, 1024] trained
briefly on digits; a tiny GPT, byte tokenizer), then derives a child per method with
`shipyard.compress` and prints each child's report row next to its parent's. Every number is
measured by the compression report itself: latency p50/p99 of batch-1 calls and throughput of
batch-32 calls through `LoadedModel.predict_arrays` (parent and child timed in alternating
rounds), quality on the held-out test split.

Claims (larger MLP): dynamic int8 ≥ 2x the fp32 throughput at batch 32 with ≤ 0.5 point accuracy
drop; ONNX Runtime at least as fast as eager PyTorch at batch 1; structured pruning of 50% of the
hidden units measurably faster with a smaller file.

    python benchmarks/compress.py                 # a few minutes on 2 CPU cores
    python benchmarks/compress.py --threads 2 --out benchmarks/results/compress.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shipyard.compress import BenchParams, compress, export
from shipyard.compress.measure import describe_machine, machine
from shipyard.config import load_config
from shipyard.train import fit

DIGITS = {
    "task": "classification",
    "data": {"source": "builtin:digits", "preprocessing": "standardize"},
    "optim": {"name": "adamw", "lr": 0.003},
    "train": {"epochs": None, "batch_size": 64},
    "eval": {"every_steps": 100},
}
PARENTS: dict[str, dict[str, Any]] = {
    "digits-mlp": {
        **DIGITS,
        "model": {"name": "mlp", "hidden_sizes": [128, 64]},
        "train": {**DIGITS["train"], "max_steps": 400},
    },
    "digits-mlp-1024": {
        **DIGITS,
        "model": {"name": "mlp", "hidden_sizes": [1024, 1024]},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": {**DIGITS["train"], "max_steps": 200},
    },
    "gpt-tiny": {
        "task": "language-modeling",
        "data": {
            "source": "builtin:python-stdlib",
            "max_chars": 200000,
            "tokenizer": {"kind": "byte"},
        },
        "model": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        "train": {"epochs": None, "max_steps": 150, "batch_size": 16},
        "eval": {"max_batches": 8},
    },
}
MLP_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("int8 dynamic", {"quantize": "int8"}),
    ("int8 weight-only", {"quantize": "int8-weight"}),
    ("prune 50% unstructured + ft", {"prune": 0.5, "finetune_steps": 100}),
    ("prune 50% structured + ft", {"prune": 0.5, "structured": True, "finetune_steps": 100}),
    ("onnx (onnxruntime)", {"export": "onnx"}),
    ("onnx + ort int8", {"export": "onnx", "quantize": "int8"}),
]
GPT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("int8 weight-only", {"quantize": "int8-weight"}),
    ("int8 dynamic", {"quantize": "int8"}),
    ("prune 30% unstructured", {"prune": 0.3}),
    (
        "prune 50% MLP neurons (structured) + ft",
        {"prune": 0.5, "structured": True, "finetune_steps": 50},
    ),
    ("onnx (onnxruntime)", {"export": "onnx"}),
]


def run(parent: Path, out: Path, method: dict[str, Any], bench: BenchParams) -> dict[str, Any]:
    method = dict(method)
    if method.pop("export", None):
        onnx_dir = out.with_name(out.name + "-pkg")
        export(parent, onnx_dir, format="onnx")
        if "quantize" in method:
            return compress(onnx_dir, out, bench=bench, **method).report
        # a plain export: time the ONNX package against its parent via a no-op "report"
        return compress_report_for_export(parent, onnx_dir, out, bench)
    return compress(parent, out, bench=bench, **method).report


def compress_report_for_export(
    parent: Path, child: Path, out: Path, bench: BenchParams
) -> dict[str, Any]:
    """The compression report's measurements for an exported package (no derivation step)."""
    from shipyard.compress.measure import build_report, quality, time_models
    from shipyard.compress.source import Parent, as_inputs, split_tensors
    from shipyard.package import load_package

    p = Parent.open(parent)
    c = load_package(child)
    x, _ = split_tensors(p.data, "test", limit=256)
    timings = time_models({"parent": p.loaded, "child": c}, as_inputs(x), bench)
    return build_report(
        parent=p.loaded,
        child=c,
        parent_quality=quality(p.loaded.model, p.data, p.config),
        child_quality=quality(c.model, p.data, p.config),
        timings=timings,
        derivation={"method": "export-onnx", "params": {}},
        bench=bench,
    )


def row(model: str, method: str, r: dict[str, Any], which: str) -> list[str]:
    m = r[which]
    q = m["quality"]
    key = "perplexity" if "perplexity" in q else "accuracy"
    delta = "" if which == "parent" else f"{r['delta']['quality'][key]:+.4f}"
    return [
        model,
        method if which == "child" else "fp32 parent",
        f"{m['file_bytes'] / 1024:.0f}",
        f"{m['parameters']:,}",
        f"{m['sparsity']:.0%}",
        f"{m['latency_p50_ms']:.3f}",
        f"{m['latency_p99_ms']:.3f}",
        f"{m['throughput_rows_per_s']:,.0f}",
        f"{key} {q[key]:.4f}",
        delta,
        "" if which == "parent" else f"x{r['delta']['speedup_batch32']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch/ORT threads while timing")
    parser.add_argument("--latency-calls", type=int, default=300)
    parser.add_argument("--throughput-calls", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compress.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = BenchParams(
        latency_calls=args.latency_calls,
        throughput_calls=args.throughput_calls,
        rounds=6,
        threads=args.threads,
    )
    header = [
        "model",
        "method",
        "size KB",
        "params",
        "sparsity",
        "p50 b1 ms",
        "p99 b1 ms",
        "rows/s b32",
        "quality",
        "Δ quality",
        "b32 speedup",
    ]
    rows: list[list[str]] = [header]
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    results: dict[str, Any] = {
        "machine": host,
        "bench": vars(args) | {"out": str(args.out)},
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, raw in PARENTS.items():
            started = time.perf_counter()
            fit(load_config({"name": name, **raw}), run_dir=Path(tmp) / name)
            parent = Path(tmp) / name / "package"
            print(f"trained {name} in {time.perf_counter() - started:.0f}s", flush=True)
            methods = GPT_METHODS if raw["task"] == "language-modeling" else MLP_METHODS
            first = True
            for label, method in methods:
                slug = label.replace(" ", "-").replace("%", "").replace("(", "").replace(")", "")
                report = run(parent, Path(tmp) / f"{name}-{slug}", method, bench)
                if first:
                    rows.append(row(name, label, report, "parent"))
                    first = False
                rows.append(row(name, label, report, "child"))
                results["runs"].append({"model": name, "method": label, "report": report})
                print(" | ".join(rows[-1]), flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"\nmachine: {describe_machine(host)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
