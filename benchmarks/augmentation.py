"""Augmentation on digits-cnn: test accuracy with and without `data.augmentation`, several seeds.

Both arms train examples/digits-cnn.yaml unchanged except for the augmentation section (and,
optionally, a smaller train split: augmentation matters most when training data is scarce). The
test split is the same in both arms for a seed. Reported: mean and per-seed test accuracy and
loss, and the difference (augmented - plain).

    python benchmarks/augmentation.py                          # 3 seeds, the full train split
    python benchmarks/augmentation.py --train 0.2 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shipyard.compress.measure import describe_machine, machine
from shipyard.config import load_config
from shipyard.train import fit

ROOT = Path(__file__).resolve().parents[1]
AUGMENTATION = {
    "crop_padding": 1,
    "rotation": 10,
    "brightness": 0.1,
    "contrast": 0.1,
    "noise_std": 0.05,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument(
        "--train", type=float, default=0.7, help="train fraction (val 0.15, test 0.15 fixed)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for arm, aug in (("plain", None), ("augmented", AUGMENTATION)):
                overrides = [
                    f"seed={seed}",
                    f"train.epochs={args.epochs}",
                    f"data.splits.train={args.train}",
                    f"data.splits.val={round(0.85 - args.train, 6)}",
                    "data.splits.test=0.15",
                ]
                if aug is not None:
                    overrides.append(f"data.augmentation={json.dumps(aug)}")
                config = load_config(ROOT / "examples" / "digits-cnn.yaml", overrides)
                result = fit(config, run_dir=Path(tmp) / f"{arm}-{seed}", runs_root=tmp)
                test = result.metrics["test"]
                rows.append(
                    {
                        "seed": seed,
                        "arm": arm,
                        "test_accuracy": test["accuracy"],
                        "test_loss": test["loss"],
                        "steps": result.steps,
                        "elapsed_s": round(result.elapsed_s, 1),
                    }
                )
                print(
                    f"seed {seed} {arm:9s} test accuracy {test['accuracy']:.4f} "
                    f"loss {test['loss']:.4f} ({result.elapsed_s:.0f} s)",
                    flush=True,
                )
    summary = {}
    for arm in ("plain", "augmented"):
        accs = [r["test_accuracy"] for r in rows if r["arm"] == arm]
        losses = [r["test_loss"] for r in rows if r["arm"] == arm]
        summary[arm] = {
            "accuracy_mean": statistics.mean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "loss_mean": statistics.mean(losses),
        }
    diff = summary["augmented"]["accuracy_mean"] - summary["plain"]["accuracy_mean"]
    print()
    print("| arm | test accuracy (mean ± std) | test loss (mean) |")
    print("| --- | --- | --- |")
    for arm, s in summary.items():
        print(
            f"| {arm} | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | {s['loss_mean']:.4f} |"
        )
    print(f"\naugmented - plain: {diff * 100:+.2f} accuracy points over {len(args.seeds)} seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "augmentation",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "args": {k: str(v) for k, v in vars(args).items()},
        "augmentation": AUGMENTATION,
        "rows": rows,
        "summary": summary,
        "difference": diff,
    }
    (args.out / "augmentation.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
