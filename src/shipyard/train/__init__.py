"""Training: `fit(config)` runs a whole training run and returns a RunResult."""

from __future__ import annotations

from shipyard.train.distill import DistillParams
from shipyard.train.trainer import (
    RunResult,
    StepInfo,
    best_checkpoint,
    build_data_and_model,
    evaluate_run,
    fit,
    load_run_config,
)

__all__ = [
    "DistillParams",
    "RunResult",
    "StepInfo",
    "best_checkpoint",
    "build_data_and_model",
    "evaluate_run",
    "fit",
    "load_run_config",
]
