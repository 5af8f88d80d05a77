"""Training: `fit(config)` runs a whole training run and returns a RunResult."""

from __future__ import annotations

from shipyard.train.distill import DistillParams
from shipyard.train.evaluation import build_data_and_model, evaluate_model, evaluate_run
from shipyard.train.memory import MemoryEstimate, estimate_run_memory
from shipyard.train.rundir import PACKAGE_DIR, best_checkpoint, load_run_config, package_run
from shipyard.train.trainer import RunResult, StepInfo, fit

__all__ = [
    "PACKAGE_DIR",
    "DistillParams",
    "MemoryEstimate",
    "RunResult",
    "StepInfo",
    "best_checkpoint",
    "build_data_and_model",
    "estimate_run_memory",
    "evaluate_model",
    "evaluate_run",
    "fit",
    "load_run_config",
    "package_run",
]
