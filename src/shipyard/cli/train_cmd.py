"""`shipyard train` and `shipyard eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from shipyard.config import load_config
from shipyard.errors import TrainError

console = Console()


def train(
    config_file: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a key: section.key=value (repeatable)."
    ),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="Where to write the run (default runs/NAME/TIMESTAMP)."
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="'auto' (newest valid checkpoint of the run) or a checkpoint path."
    ),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Data-parallel processes on this machine (wraps torchrun)."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the estimated memory per process (for --nproc) and exit; allocates nothing.",
    ),
) -> None:
    """Train a model from a config; write checkpoints, metrics and a report.

    Example: shipyard train examples/digits-mlp.yaml --set train.epochs=5

    Resume:  shipyard train examples/digits-mlp.yaml --resume auto

    Two CPU processes (gloo): shipyard train examples/gpt-tiny.yaml --nproc 2

    FSDP2, memory first:
    shipyard train examples/gpt-tiny.yaml --set train.strategy=fsdp --nproc 2 --dry-run
    """
    config = load_config(config_file, overrides)
    if dry_run:
        _print_estimate(config, nproc)
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(config_file, overrides, run_dir, resume, nproc, config.name, progress)
        return
    from shipyard.train import fit

    show = progress if progress is not None else sys.stderr.isatty()
    result = fit(config, run_dir=run_dir, resume=resume, progress=show)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title=f"{config.name}: {result.steps} steps in {result.elapsed_s:.1f}s")
    table.add_column("metric")
    splits = list(result.metrics)
    for split in splits:
        table.add_column(split, justify="right")
    keys: list[str] = []
    for metrics in result.metrics.values():
        keys += [k for k, v in metrics.items() if _is_number(v) and k not in keys]
    for key in keys:
        table.add_row(key, *(_fmt(result.metrics[s].get(key)) for s in splits))
    for key, label in (("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s")):
        if result.summary.get(key) is not None:
            table.add_row(f"train {label}", *(f"{result.summary[key]:,.0f}" for _ in splits))
    if result.summary.get("unigram_loss") is not None:
        table.add_row(
            "unigram baseline loss", *(_fmt(result.summary["unigram_loss"]) for _ in splits)
        )
    console.print(table)
    trainable = result.summary.get("trainable_parameters")
    if trainable is not None and trainable != result.parameters:
        share = 100.0 * trainable / max(result.parameters, 1)
        console.print(
            f"trained {trainable:,} of {result.parameters:,} parameters ({share:.2f}%)",
            highlight=False,
        )
    console.print(f"run directory: {result.run_dir}", highlight=False)


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/NAME/TIMESTAMP)."),
    split: str = typer.Option("test", "--split", help="val or test."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Re-evaluate a run's best checkpoint on a split.

    Example: shipyard eval runs/digits-mlp/20261124-101500 --split val --json
    """
    from shipyard.train import evaluate_run

    result = evaluate_run(run_dir, split)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{split} metrics of {result['checkpoint']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        if _is_number(value):
            table.add_row(key, _fmt(value))
    console.print(table)


def _launch_torchrun(
    config_file: Path,
    overrides: list[str],
    run_dir: Path | None,
    resume: str | None,
    nproc: int,
    name: str,
    progress: bool | None,
) -> None:
    """Re-run this command under torchrun with `nproc` processes on this machine."""
    if run_dir is None and resume is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / name / stamp
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "shipyard",
        "train",
        str(config_file),
    ]
    for item in overrides:
        cmd += ["--set", item]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    if resume is not None:
        cmd += ["--resume", resume]
    if progress is not None:
        cmd.append("--progress" if progress else "--no-progress")
    code = subprocess.call(cmd)
    if code != 0:
        raise TrainError(f"torchrun with {nproc} processes failed (exit code {code})")


def _print_estimate(config: Any, nproc: int) -> None:
    from shipyard.train.memory import estimate_run_memory, format_bytes

    est = estimate_run_memory(config, nproc)
    t = config.train
    title = (
        f"{config.name}: estimated memory per process ({est.strategy}, {nproc} process(es), "
        f"{est.compute_dtype}, micro-batch {est.micro_batch}, activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}, cpu offload "
        f"{'on' if t.fsdp.cpu_offload else 'off'})"
    )
    table = Table(title=title)
    table.add_column("item")
    table.add_column("device", justify="right")
    table.add_column("host", justify="right")
    for key, value in est.items.items():
        table.add_row(key, format_bytes(value), "-")
    for key, value in est.host_items.items():
        table.add_row(key, "-", format_bytes(value))
    table.add_row("total", format_bytes(est.device_total), format_bytes(est.host_total))
    console.print(table)
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)
    typer.echo(json.dumps(est.to_dict()))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
