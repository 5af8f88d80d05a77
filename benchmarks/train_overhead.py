"""Trainer overhead: shipyard's `fit` vs a minimal hand-written PyTorch loop on the same GPT.

Both train the same model (same init, same data, AdamW, same batch) in one process; throughput is
measured over the same steady-state steps (after warm-up), trials are interleaved, and the median
is reported. The claim: shipyard ≥ 0.97 × the hand-written loop in eager mode. With --compile it
also shows what `torch.compile` adds to shipyard's loop.

    python benchmarks/train_overhead.py                 # defaults (about 2 minutes on 2 CPU cores)
    python benchmarks/train_overhead.py --steps 60 --repeats 5 --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shipyard.compress.measure import describe_machine, machine
from shipyard.config import RunConfig, load_config
from shipyard.data import prepare_data
from shipyard.models import build_model
from shipyard.train import StepInfo, fit


def make_config(args: argparse.Namespace, compile_: bool) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "bench-gpt",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": "builtin:python-stdlib",
            "max_chars": 400_000,
            "tokenizer": {"kind": "byte"},
        },
        "model": {
            "name": "gpt",
            "n_layer": args.n_layer,
            "n_head": 4,
            "n_embd": args.n_embd,
            "block_size": args.block_size,
        },
        "optim": {"name": "adamw", "lr": 1e-3, "decay_exclude": "none"},
        "train": {
            "epochs": None,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "log_every": 10,
            "compile": compile_,
            "checkpoint": {"every_steps": 10_000, "keep_last": 1},
        },
        "eval": {"every_steps": 10_000, "max_batches": 1},
    }
    return load_config(raw)


def shipyard_tokens_per_s(config: RunConfig, warmup: int) -> float:
    """Tokens/s of fit() between the callbacks of step `warmup` and step `steps - 1`."""
    stamps: dict[int, float] = {}
    last = config.train.max_steps - 1  # type: ignore[operator]

    def clock(info: StepInfo) -> None:
        if info.step in (warmup, last):
            stamps[info.step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        fit(config, run_dir=Path(tmp) / "run", callbacks=[clock])
    steps = last - warmup
    tokens = steps * config.train.batch_size * config.model.block_size  # type: ignore[union-attr]
    return tokens / (stamps[last] - stamps[warmup])


def hand_written_tokens_per_s(config: RunConfig, warmup: int) -> float:
    """The loop everyone writes first: sample windows, forward, loss, backward, step."""
    torch.manual_seed(config.seed)
    block = config.model.block_size  # type: ignore[union-attr]
    data = prepare_data(config.data, config.task, config.seed, block_size=block)
    model = build_model(config.model, vocab_size=data.info.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    tokens = torch.from_numpy(data.train.tokens.astype("int64"))  # type: ignore[union-attr]
    batch = config.train.batch_size
    steps = config.train.max_steps or 0
    offsets = torch.arange(block)
    model.train()
    start = 0.0
    for step in range(1, steps):
        starts = torch.randint(0, len(tokens) - block - 1, (batch,))
        x = tokens[starts[:, None] + offsets]
        y = tokens[starts[:, None] + offsets + 1]
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == warmup:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    return (steps - 1 - warmup) * batch * block / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_overhead.json"))
    args = parser.parse_args()
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)

    eager = make_config(args, compile_=False)
    results: dict[str, list[float]] = {"hand-written loop (eager)": [], "shipyard fit (eager)": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
        results["hand-written loop (eager)"].append(hand_written_tokens_per_s(eager, args.warmup))
        results["shipyard fit (eager)"].append(shipyard_tokens_per_s(eager, args.warmup))
    if args.compile:
        compiled = make_config(args, compile_=True)
        results["shipyard fit (compile)"] = [
            shipyard_tokens_per_s(compiled, args.warmup) for _ in range(args.repeats)
        ]

    base = statistics.median(results["hand-written loop (eager)"])
    rows = []
    print(f"{'loop':<28} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'ratio':>7}")
    for name, values in results.items():
        med = statistics.median(values)
        rows.append({"loop": name, "tokens_per_s": med, "all": values, "ratio": med / base})
        print(
            f"{name:<28} {med:>18,.0f} {min(values):>10,.0f} {max(values):>10,.0f} "
            f"{med / base:>7.3f}"
        )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"target: shipyard eager >= 0.97 x hand-written; wrote {args.out}")


if __name__ == "__main__":
    main()
