"""FSDP2 vs DDP training throughput on CPU (torchrun + gloo) for the same GPT and global batch.

Each trial runs `shipyard train --nproc N` with `train.strategy` ddp or fsdp (interleaved, the
median of --repeats is reported). Throughput is tokens/s from metrics.jsonl over the steady-state
log windows (the first window, with start-up and warm-up, is dropped); memory is the run summary's
per-rank parameter + gradient + optimizer bytes (max over ranks). Both strategies take the same
optimizer steps, so the losses must agree too: the script exits with status 1 when the final
losses differ by more than LOSS_RTOL (relative), after writing its JSON.

    python benchmarks/fsdp_vs_ddp.py                          # defaults: 2 processes, 60 steps
    python benchmarks/fsdp_vs_ddp.py --nproc 2 --steps 100 --repeats 3 --n-embd 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from shipyard.compress.measure import describe_machine, machine

ROOT = Path(__file__).resolve().parents[1]


# Relative tolerance on the final losses: both strategies take the same optimizer steps, so only
# the order of floating-point reductions differs.
LOSS_RTOL = 1e-4


def losses_agree(rows: dict[str, dict[str, Any]]) -> bool:
    """True when DDP's and FSDP's final losses agree within LOSS_RTOL of DDP's."""
    ddp, fsdp = rows["ddp"]["final_loss"], rows["fsdp"]["final_loss"]
    return bool(abs(fsdp - ddp) <= LOSS_RTOL * abs(ddp))


def check_losses(rows: dict[str, dict[str, Any]]) -> None:
    """Exit with status 1 (one line on stderr) when the two strategies' final losses differ."""
    if not losses_agree(rows):
        ddp, fsdp = rows["ddp"]["final_loss"], rows["fsdp"]["final_loss"]
        raise SystemExit(
            f"final losses differ: ddp {ddp:.6f}, fsdp {fsdp:.6f} "
            f"(tolerance {LOSS_RTOL:g} relative); FSDP and DDP should take the same steps"
        )


def make_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "bench-fsdp",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": "builtin:python-stdlib",
            "max_chars": 400_000,
            "tokenizer": {"kind": "byte"},
            "sampling": "random",
        },
        "model": {
            "name": "gpt",
            "n_layer": args.n_layer,
            "n_head": 4,
            "n_embd": args.n_embd,
            "block_size": args.block_size,
            "dropout": 0.0,
        },
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": {
            "epochs": None,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "log_every": args.log_every,
            "checkpoint": {"every_steps": 100_000, "keep_last": 1},
        },
        "eval": {"every_steps": 100_000, "max_batches": 1},
    }


def one_run(config: Path, strategy: str, nproc: int, run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "shipyard", "train", str(config), "--nproc", str(nproc)]
    cmd += ["--set", f"train.strategy={strategy}", "--run-dir", str(run_dir), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{strategy} run failed:\n{out.stderr[-3000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    steady = train[1:] or train
    report = json.loads((run_dir / "report.json").read_text())["run"]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "final_loss": train[-1]["loss"],
        "max_rank_state_bytes": report["memory"]["max_bytes"],
        "parameters": report["parameters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp_vs_ddp.json"))
    args = parser.parse_args()
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(make_config(args)))
        for i in range(args.repeats):
            for strategy in ("ddp", "fsdp"):
                run = Path(tmp) / f"{strategy}-{i}"
                results[strategy].append(one_run(config, strategy, args.nproc, run))
    rows = {}
    for strategy, runs in results.items():
        rows[strategy] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "max_rank_state_bytes": runs[0]["max_rank_state_bytes"],
            "final_loss": runs[0]["final_loss"],
            "parameters": runs[0]["parameters"],
        }
    ratio = rows["fsdp"]["tokens_per_s"] / rows["ddp"]["tokens_per_s"]
    same = losses_agree(rows)
    print(f"\n{args.nproc} processes, GPT {rows['ddp']['parameters']:,} parameters")
    print("| strategy | tokens/s | max-rank param+grad+optim MiB | final loss |")
    print("| --- | ---: | ---: | ---: |")
    for strategy, row in rows.items():
        mib = row["max_rank_state_bytes"] / 2**20
        print(f"| {strategy} | {row['tokens_per_s']:,.0f} | {mib:.2f} | {row['final_loss']:.5f} |")
    print(f"\nfsdp / ddp throughput: {ratio:.2f}x; same losses: {same}")
    payload = {
        "benchmark": "fsdp_vs_ddp",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "args": vars(args),
        "results": rows,
        "fsdp_over_ddp": ratio,
        "same_losses": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")
    check_losses(rows)


if __name__ == "__main__":
    main()
