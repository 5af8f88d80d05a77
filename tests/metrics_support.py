"""Data and the per-process body of tests/unit/test_metrics.py's multi-process test, in a module
of their own: spawned processes import it (light: no scikit-learn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shipyard.evaluate import MetricSet, build_metrics


def classification_data(n: int = 100, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, c - 1, (n,), generator=g)  # class c-1 never occurs as a target
    logits = torch.randn(n, c, generator=g) + 1.5 * F.one_hot(targets, c)  # better than chance
    return logits, targets


def lm_data(pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    logits = 3.0 * torch.randn(12, 9, 17, generator=g)  # (B, T, V)
    targets = torch.randint(0, 17, (12, 9), generator=g)
    if pad:
        targets[3, 5:] = -100
        targets[7, 2:] = -100
    return logits, targets


def shared_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batch of every task's outputs and targets."""
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(40, 3, generator=g)
    return {
        "classification": classification_data(40),
        "regression": (targets + 0.3 * torch.randn(40, 3, generator=g), targets),
        "language-modeling": lm_data(pad=True),
    }


def task_metrics(task: str) -> MetricSet:
    if task == "classification":
        return build_metrics("classification", num_classes=5, top_k=2)
    return build_metrics(task)  # type: ignore[arg-type]


def rank_computes(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """One process: its share of every task's data (the last rank gets none), the metrics
    computed together with the other processes, written to out_dir/RANK.json."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world
    )
    try:
        results = {}
        for task, (outputs, targets) in shared_data().items():
            m = task_metrics(task)
            rows = torch.arange(len(outputs))
            mine = rows[rows % (world - 1) == rank] if rank < world - 1 else rows[:0]
            if len(mine):
                m.update(outputs[mine], targets[mine])
            results[task] = m.compute()
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
