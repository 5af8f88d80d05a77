"""The run directory: train writes it, and this module owns its layout.

    runs/NAME/RUN-ID/
      config.yaml      the resolved run config (CONFIG_FILE)
      data.json        DataInfo + fitted preprocessing, written at the start (DATA_FILE)
      tokenizer.json   the tokenizer, for token models (TOKENIZER_FILE; an imported model's
                       settings and chat template in tokenizer_config.json)
      metrics.jsonl    one JSON line per logging step (METRICS_FILE)
      checkpoints/     step-N/ directories (CHECKPOINTS_DIR; see checkpoint.py)
      report.json/md   final metrics and plots (REPORT_FILE; written by shipyard.evaluate.report)
      package/         the packaged best checkpoint (PACKAGE_DIR)

Readers of a run (`load_run_config`, `best_checkpoint`, `package_run`, the dashboard) use these
names instead of spelling them out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from shipyard.config import PretrainedConfig, RunConfig, validate_config
from shipyard.data import DataInfo, Preprocessor, Tokenizer
from shipyard.errors import CheckpointError, PackageError, ShipyardError, TrainError
from shipyard.evaluate.report import read_history
from shipyard.fileio import atomic_write
from shipyard.models.lora import merge_lora
from shipyard.package import write_package
from shipyard.package.hf_checkpoint import (
    HFCheckpointError,
    checkpoint_fingerprint,
    is_hf_checkpoint,
)
from shipyard.package.loading import build_empty_model
from shipyard.train import checkpoint as ckpt
from shipyard.train.checkpoint import load_weights, read_checkpoint
from shipyard.train.finetune import lora_spec, prepare_for_finetune

CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # beside it, for an HF checkpoint's tokenizer
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
CHECKPOINTS_DIR = "checkpoints"
PACKAGE_DIR = "package"
TENSORBOARD_DIR = "tensorboard"


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run was started with."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise TrainError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return validate_config(yaml.safe_load(path.read_text()), where=str(path))


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a finished run reports on, verified: its best one, else its newest valid
    one. A damaged checkpoint is passed over for the best one an older checkpoint recorded."""
    directory = run_dir / CHECKPOINTS_DIR
    for path in reversed(ckpt.list_checkpoints(directory)):
        # only best_step is read from this one, so it is not verified (that hashes every file)
        try:
            best = ckpt.load_state(path).get("best_step")
        except CheckpointError:
            continue
        best_path = directory / ckpt.checkpoint_name(int(best)) if best is not None else None
        candidate = best_path if best_path is not None and best_path.is_dir() else path
        try:
            return ckpt.read_checkpoint(candidate).path
        except CheckpointError:
            continue
    raise CheckpointError(f"{run_dir}: no valid checkpoint in {directory}")


def newest_run_with_checkpoints(root: Path) -> Path | None:
    """The newest run under `root` (run ids sort by start time) that has a checkpoint."""
    if not root.is_dir():
        return None
    runs = sorted(
        (p for p in root.iterdir() if p.is_dir() and ckpt.list_checkpoints(p / CHECKPOINTS_DIR)),
        key=lambda p: p.name,
    )
    return runs[-1] if runs else None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences in the parts of a config that a checkpoint depends on."""
    diffs: list[str] = []
    for section in ("task", "model", "data", "seed"):
        for key, (old, new) in _diff(saved.get(section), current.get(section), section).items():
            diffs.append(f"{key}: {old!r} -> {new!r}")
    return diffs


def _diff(old: Any, new: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            out.update(_diff(old.get(key), new.get(key), f"{prefix}.{key}"))
        return out
    return {} if old == new else {prefix: (old, new)}


class JsonlLog:
    """Append-only metrics.jsonl, one flushed line per record (rank 0 only)."""

    def __init__(self, path: Path, *, enabled: bool, tensorboard: bool = False) -> None:
        self.path = path
        self.enabled = enabled
        self.last: dict[str, dict[str, Any]] = {}
        self._tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the module imports the tensorboard package
                raise TrainError(
                    "train.tensorboard needs the tensorboard package: "
                    "pip install 'shipyard[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(log_dir=str(path.parent / TENSORBOARD_DIR))

    def write(self, record: dict[str, Any]) -> None:
        self.last[str(record.get("kind"))] = record
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self._tb is not None:
            kind, step = record.get("kind"), int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "epoch", "time"):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_history(self.path) if int(r.get("step", 0)) <= step]
        keep = [r for r in keep if r.get("kind") != "final"]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def package_run(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Package a training run's best checkpoint (default output: RUN_DIR/package)."""
    run = Path(run_dir)
    try:
        config = load_run_config(run)
        data = json.loads((run / DATA_FILE).read_text(encoding="utf-8"))
        info = DataInfo.from_dict(data["info"])
        pre = data.get("preprocessing")
        preprocessor = Preprocessor.from_dict(pre) if pre is not None else None
        tok_file = run / TOKENIZER_FILE
        tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
        checkpoint = best_checkpoint(run)
        step = read_checkpoint(checkpoint, verify=False).step
        model = build_empty_model(config.model, info)
        prepare_for_finetune(model, config)
        load_weights(checkpoint, model)
        if config.finetune is not None and config.finetune.merge:
            merge_lora(model)
        lora = lora_spec(model, config)
    except FileNotFoundError as exc:
        raise PackageError(
            f"{run}: not a complete run directory ({exc.filename} missing)"
        ) from None
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise PackageError(f"{run}: cannot read the run ({exc})") from None
    except PackageError:
        raise
    except ShipyardError as exc:
        raise PackageError(f"{run}: cannot package this run: {exc}") from None
    report_file = run / REPORT_FILE
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    metrics = {
        split: report[split] for split in ("val", "test") if isinstance(report.get(split), dict)
    }
    lineage_extra: dict[str, Any] = {"run_dir": str(run.resolve()), "checkpoint_step": step}
    run_summary = report.get("run")
    if isinstance(run_summary, dict) and isinstance(run_summary.get("privacy"), dict):
        lineage_extra["privacy"] = run_summary["privacy"]  # the (ε, δ) the training spent
    parent: str | None = None
    if isinstance(config.model, PretrainedConfig):
        if is_hf_checkpoint(config.model.path):  # no package to point at: its fingerprint
            try:
                fingerprint = checkpoint_fingerprint(config.model.path)
            except HFCheckpointError as exc:
                raise PackageError(f"{run}: cannot package this run: {exc}") from None
            lineage_extra["pretrained_from"] = {
                "hf_checkpoint": str(Path(config.model.path).resolve()),
                "source_fingerprint": fingerprint,
            }
        else:
            parent = config.model.path
    return write_package(
        Path(out_dir) if out_dir is not None else run / PACKAGE_DIR,
        model=model,
        config=config,
        data_info=info,
        preprocessor=preprocessor,
        tokenizer=tokenizer,
        metrics=metrics,
        version=run.resolve().name,
        lineage_extra=lineage_extra,
        lora=lora,
        parent=parent,
    )
