"""Shared helpers for the dashboard tests: two real digits runs (examples/digits-mlp.yaml, three
epochs, two learning rates) made once per session, and a run directory that is still growing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"lr-3e-3": "0.003", "lr-1e-2": "0.01"}  # run id under runs/digits-mlp → optim.lr


def digits_runs(base: Path) -> Path:
    """A runs folder with two finished digits runs: runs/digits-mlp/lr-3e-3 and .../lr-1e-2."""
    root = base / "ui-runs"
    done = root / ".done"
    if done.is_file():
        return root
    from shipyard.config import load_config
    from shipyard.train import fit

    for run_id, lr in RUNS.items():
        config = load_config(
            ROOT / "examples" / "digits-mlp.yaml",
            [f"optim.lr={lr}", "train.epochs=3", "train.batch_size=128", "schedule.warmup_steps=5"],
        )
        fit(config, run_dir=root / "digits-mlp" / run_id, progress=False)
    done.write_text("ok")
    return root


def start_live_run(root: Path, source: Path, name: str = "live") -> Path:
    """A run directory whose metrics.jsonl holds only the first records of `source` (a running
    run, as far as the dashboard can tell); the test appends the rest with `append_records`."""
    live = root / "digits-mlp" / name
    if live.exists():
        shutil.rmtree(live)
    live.mkdir(parents=True)
    shutil.copy(source / "config.yaml", live / "config.yaml")
    records = read_records(source)
    train = [r for r in records if r["kind"] == "train"]
    append_records(live, train[:2])
    return live


def read_records(run: Path) -> list[dict[str, object]]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def append_records(run: Path, records: list[dict[str, object]]) -> None:
    """Append records to a run's metrics.jsonl the way the trainer does (one line each)."""
    with open(run / "metrics.jsonl", "a") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def grouped_runs(base: Path) -> Path:
    """A runs folder with a real 2-fold cross-validation (`shipyard cv`) and a real 3-trial
    study (`shipyard tune`) of examples/digits-mlp.yaml, two short epochs each: what the runs and
    compare pages group. cv: digits-mlp/cv-test/fold-{0,1}; tune: digits-mlp/tune-lr/trial-000N."""
    root = base / "ui-grouped-runs"
    done = root / ".done"
    if done.is_file():
        return root
    import yaml

    from shipyard.config import load_config, load_raw_config
    from shipyard.tuning import cross_validate, tune

    short = ["train.epochs=2", "train.batch_size=128", "schedule.warmup_steps=2"]
    config = load_config(ROOT / "examples" / "digits-mlp.yaml", short)
    cross_validate(config, 2, out_dir=root / "digits-mlp" / "cv-test", runs_root=root)
    raw, _ = load_raw_config(ROOT / "examples" / "digits-mlp.yaml", short)
    raw["tune"] = {
        "study": "lr",
        "sampler": "random",
        "pruner": "none",
        "params": {"optim.lr": {"low": 0.0003, "high": 0.03, "log": True}},
    }
    (base / "digits-tune-ui.yaml").write_text(yaml.safe_dump(raw))
    tune(
        base / "digits-tune-ui.yaml",
        3,
        storage=f"sqlite:///{base / 'ui-study.db'}",
        runs_root=root,
    )
    done.write_text("ok")
    return root
