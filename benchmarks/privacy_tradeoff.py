"""Privacy vs accuracy: the digits MLP trained with DP-SGD at several target ε, and without.

Each run is `examples/digits-private.yaml` (same data, model, optimizer, epochs and seed) with
`train.privacy.target_epsilon` set to each value, plus one run without `train.privacy`. The table
gives the test accuracy, the ε the accountant reports, the noise multiplier solved for, and the
training time per step (DP-SGD computes per-example gradients, so it costs more per step). The
claim: accuracy rises with ε towards the non-private run, and every run spends at most its target.

    python benchmarks/privacy_tradeoff.py                      # ε 0.5, 1, 2, 4, 8 and none
    python benchmarks/privacy_tradeoff.py --epsilons 1 8 --epochs 4 --out privacy.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shipyard.compress.measure import describe_machine, machine
from shipyard.config import load_config
from shipyard.train import fit

ROOT = Path(__file__).resolve().parents[1]


def run(epsilon: float | None, epochs: int, seed: int) -> dict[str, Any]:
    overrides = [f"train.epochs={epochs}", f"seed={seed}"]
    if epsilon is None:
        overrides.append("train.privacy=null")
    else:
        overrides.append(f"train.privacy.target_epsilon={epsilon}")
    config = load_config(ROOT / "examples" / "digits-private.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = fit(config, run_dir=Path(tmp) / "run")
        elapsed = time.perf_counter() - started
    privacy = result.summary.get("privacy") or {}
    return {
        "target_epsilon": epsilon,
        "epsilon": privacy.get("epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "test_accuracy": result.metrics["test"]["accuracy"],
        "steps": result.steps,
        "s_per_step": elapsed / max(result.steps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("privacy_tradeoff.json"))
    args = parser.parse_args()
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    rows = [run(eps, args.epochs, args.seed) for eps in args.epsilons]
    rows.append(run(None, args.epochs, args.seed))
    print(f"{'target ε':>9} {'spent ε':>8} {'noise σ':>8} {'test acc':>9} {'ms/step':>8}")
    for r in rows:
        target = "none" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        print(
            f"{target:>9} {spent:>8} {sigma:>8} {r['test_accuracy']:>9.3f} "
            f"{r['s_per_step'] * 1000:>8.1f}"
        )
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "privacy_tradeoff",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": host,
                "epochs": args.epochs,
                "seed": args.seed,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
