"""LoRA trainer overhead: shipyard's `fit` vs a hand-written PyTorch LoRA loop on the same Llama.

A tiny Llama-family base (built with shipyard's `llama`, byte-level, trained one step and
packaged) is fine-tuned with the same LoRA adapters (shipyard's `LoRALinear`, same rank, alpha and
targets), the same data (random windows of the same token stream), AdamW with the same settings,
the same batch and the same number of steps, in one process:

- shipyard: `fit(config)` with `model: {name: pretrained}` and `finetune: {method: lora}`;
- hand-written: load the base package, `apply_lora`, AdamW over the adapters, then only sample
  windows, forward, cross-entropy, backward, step, zero_grad.

Throughput is tokens/s over the same steady-state steps (the first --warmup steps are dropped;
fit's final validation, checkpoint and package come after the last timed step). Rounds are
interleaved (hand-written, shipyard, hand-written, ...) so drift in machine speed hits both alike;
the table has each loop's median, the ratio of the medians and the median of the per-round ratios.
Three clocks are reported: wall-clock tokens/s over the window, tokens per CPU second of the
process over it (with --threads 1 it counts only this process's work, though neighbours still
slow it through shared caches and cores), and tokens/s of the median step's wall time (a burst of
load from other jobs moves the mean, not the median). The claim: shipyard ≥ 0.97 x the
hand-written loop.

    python benchmarks/lora_overhead.py                    # defaults (a few minutes on 2 CPU cores)
    python benchmarks/lora_overhead.py --steps 60 --repeats 7 --hidden-size 256
    python benchmarks/lora_overhead.py --threads 1 --batch-size 8   # a busy 2-core machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
from shipyard.models.lora import LoRAConfig, apply_lora
from shipyard.package import load_package
from shipyard.train import StepInfo, fit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA: dict[str, Any] = {
    "source": "builtin:python-stdlib",
    "max_chars": 400_000,
    "sampling": "random",
}


def make_base(args: argparse.Namespace, root: Path) -> Path:
    """A tiny Llama trained one step from scratch and packaged: the base to fine-tune."""
    raw: dict[str, Any] = {
        "name": "bench-llama-base",
        "seed": 0,
        "task": "language-modeling",
        "data": {**DATA, "tokenizer": {"kind": "byte"}},
        "model": {
            "name": "llama",
            "hidden_size": args.hidden_size,
            "intermediate_size": args.hidden_size * 11 // 4,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": args.block_size,
        },
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": {"epochs": None, "max_steps": 1, "batch_size": args.batch_size},
        "eval": {"every_steps": 10_000, "max_batches": 1},
    }
    return fit(load_config(raw), run_dir=root / "base").run_dir / "package"


def make_config(args: argparse.Namespace, base: Path) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "bench-lora",
        "seed": 0,
        "task": "language-modeling",
        "data": {**DATA, "block_size": args.block_size},
        "model": {"name": "pretrained", "path": str(base)},
        "finetune": {"method": "lora", "rank": args.rank, "alpha": 2 * args.rank},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "train": {
            "epochs": None,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "log_every": 10,
            "checkpoint": {"every_steps": 10_000, "keep_last": 1},
        },
        "eval": {"every_steps": 10_000, "max_batches": 1},
    }
    raw["finetune"]["targets"] = TARGETS
    return load_config(raw)


def now() -> tuple[float, float]:
    """(wall-clock, this process's CPU time) in seconds."""
    return time.perf_counter(), time.process_time()


def rates(tokens_per_step: int, stamps: list[tuple[float, float]]) -> dict[str, float]:
    """Tokens/s from `now()` stamps taken after each timed step (the first after the warm-up):
    over the whole window by the wall clock and by CPU time, and from the median step's wall
    time (a burst of load from other jobs moves the mean, not the median)."""
    steps = len(stamps) - 1
    tokens = steps * tokens_per_step
    walls = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    return {
        "wall": tokens / (stamps[-1][0] - stamps[0][0]),
        "cpu": tokens / (stamps[-1][1] - stamps[0][1]),
        "median step": tokens_per_step / statistics.median(walls),
    }


def shipyard_tokens_per_s(config: RunConfig, warmup: int) -> dict[str, float]:
    """Tokens/s (see `rates`) of fit() from the callback of step `warmup` to step `steps - 1`."""
    stamps: list[tuple[float, float]] = []
    last = (config.train.max_steps or 0) - 1

    def clock(info: StepInfo) -> None:
        if warmup <= info.step <= last:
            stamps.append(now())

    with tempfile.TemporaryDirectory() as tmp:
        fit(config, run_dir=Path(tmp) / "run", callbacks=[clock])
    return rates(config.train.batch_size * (config.data.block_size or 0), stamps)


def hand_written_tokens_per_s(config: RunConfig, base: Path, warmup: int) -> tuple[float, float]:
    """The LoRA loop one writes by hand: adapters on, base frozen, AdamW, and per step only
    sample windows, forward, loss, backward, step."""
    torch.manual_seed(config.seed)
    block = config.data.block_size or 0
    loaded = load_package(base)
    data = prepare_data(
        config.data, config.task, config.seed, block_size=block, tokenizer=loaded.tokenizer
    )
    model = loaded.model
    ft = config.finetune
    assert ft is not None
    apply_lora(model, LoRAConfig(rank=ft.rank, alpha=ft.alpha, targets=ft.targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=0.0)
    tokens = torch.from_numpy(data.train.tokens.astype("int64"))  # type: ignore[union-attr]
    batch = config.train.batch_size
    steps = config.train.max_steps or 0
    offsets = torch.arange(block)
    model.train()
    stamps: list[tuple[float, float]] = []
    for step in range(1, steps):
        starts = torch.randint(0, len(tokens) - block - 1, (batch,))
        x = tokens[starts[:, None] + offsets]  # (B, T)
        y = tokens[starts[:, None] + offsets + 1]  # (B, T)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            stamps.append(now())
    return rates(batch * block, stamps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_overhead.json"))
    args = parser.parse_args()
    if args.steps - 1 <= args.warmup:
        parser.error("--steps must be larger than --warmup + 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    load_before = os.getloadavg()

    hand, ours = "hand-written LoRA loop", "shipyard fit (lora)"
    clocks = ("wall", "cpu", "median step")
    results: dict[str, dict[str, list[float]]] = {c: {hand: [], ours: []} for c in clocks}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(args, Path(tmp))
        config = make_config(args, base)
        for i in range(args.repeats):  # interleaved, alternating which goes first
            for name in [hand, ours] if i % 2 == 0 else [ours, hand]:
                if name == hand:
                    got = hand_written_tokens_per_s(config, base, args.warmup)
                else:
                    got = shipyard_tokens_per_s(config, args.warmup)
                for clock in clocks:
                    results[clock][name].append(got[clock])
            line = ", ".join(
                f"{c} {results[c][hand][-1]:,.0f} vs {results[c][ours][-1]:,.0f}" for c in clocks
            )
            print(f"round {i + 1}/{args.repeats}: tokens/s hand vs shipyard: {line}", flush=True)
        n_params = sum(p.numel() for p in load_package(base).model.parameters())
    load_after = os.getloadavg()

    print(f"\nLlama base {n_params:,} parameters, LoRA rank {args.rank} on {', '.join(TARGETS)}")
    print("| clock | loop | tokens/s (median) | min | max | ratio of medians | median ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for clock in clocks:
        by_loop = results[clock]
        reference = statistics.median(by_loop[hand])
        paired = statistics.median(s / h for s, h in zip(by_loop[ours], by_loop[hand], strict=True))
        for name, values in by_loop.items():
            med = statistics.median(values)
            row = {
                "clock": clock,
                "loop": name,
                "tokens_per_s": med,
                "all": values,
                "ratio": med / reference,
                "median_paired_ratio": paired if name == ours else 1.0,
            }
            rows.append(row)
            print(
                f"| {clock} | {name} | {med:,.0f} | {min(values):,.0f} | {max(values):,.0f} | "
                f"{row['ratio']:.3f} | {row['median_paired_ratio']:.3f} |"
            )
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    payload = {
        "benchmark": "lora_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "load_average": {"before": load_before, "after": load_after},
        "args": {k: str(v) for k, v in vars(args).items()},
        "base_parameters": n_params,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"target: shipyard >= 0.97 x hand-written; wrote {args.out}")


if __name__ == "__main__":
    main()
