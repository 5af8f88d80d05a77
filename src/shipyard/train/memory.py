"""Memory per rank: what a run holds (measured on every rank) and what it will hold (estimated
before anything is allocated, for `shipyard train CONFIG --dry-run`).

Measured, on CPU: the bytes of this rank's parameters, gradients and optimizer state (its shards
under FSDP), counted from the tensors themselves. On CUDA: the caching allocator's peaks. The
estimate builds the model on the meta device, counts the same three items for the chosen
strategy, and measures activations by running one meta-device forward pass with a hook that
adds up every tensor autograd saves for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shipyard.config import RunConfig
from shipyard.data.datasets import gather
from shipyard.train.evaluation import build_data_and_model
from shipyard.train.optim import build_optimizer
from shipyard.train.sharding import apply_activation_checkpointing, find_blocks, local


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards only)."""
    params = grads = 0
    for p in model.parameters():  # shared parameters once
        params += _nbytes(local(p))
        if p.grad is not None:
            grads += _nbytes(local(p.grad))
    optim = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                optim += _nbytes(local(value))
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def summarize_ranks(per_rank: list[float], kind: str) -> dict[str, Any]:
    """The run summary's memory entry: every rank's bytes, the largest and which rank has it."""
    peak = max(per_rank)
    return {
        "kind": kind,
        "per_rank_bytes": [int(v) for v in per_rank],
        "max_bytes": int(peak),
        "max_rank": per_rank.index(peak),
    }


@dataclass
class MemoryEstimate:
    """Estimated bytes per rank, by item, on the device and in host memory."""

    strategy: str
    processes: int
    micro_batch: int
    compute_dtype: str
    items: dict[str, int] = field(default_factory=dict)
    host_items: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return sum(self.items.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_items.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "processes": self.processes,
            "micro_batch": self.micro_batch,
            "compute_dtype": self.compute_dtype,
            "device_bytes": dict(self.items),
            "device_total_bytes": self.device_total,
            "host_bytes": dict(self.host_items),
            "host_total_bytes": self.host_total,
            "notes": list(self.notes),
        }


def estimate_memory(
    config: RunConfig,
    model: nn.Module,
    example: torch.Tensor,
    *,
    processes: int,
    cuda: bool,
) -> MemoryEstimate:
    """Per-rank memory of training `model` (built on the meta device) as `config` says.

    example: one input row (meta or real) with the model's input shape and dtype.
    """
    t = config.train
    fsdp = t.strategy == "fsdp"
    n = processes
    precision = t.precision
    compute = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and cuda)) else None
    if precision == "fp16":
        compute = torch.float16
    cbytes = 2 if compute is not None else 4
    share = math.ceil(t.batch_size / n)
    micro = (
        min(share, t.micro_batch_size)
        if t.micro_batch_size is not None
        else math.ceil(share / t.grad_accum)
    )
    est = MemoryEstimate(
        strategy=t.strategy if n > 1 or fsdp else "single",
        processes=n,
        micro_batch=micro,
        compute_dtype=str(compute or torch.float32).removeprefix("torch."),
    )
    total = sum(p.numel() for p in model.parameters())
    blocks = find_blocks(model)
    block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    in_blocks = sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    root_params = total - in_blocks
    per_param_optim = _optimizer_bytes_per_param(config)
    if fsdp:
        sharded = {
            "params (fp32 shards)": 4 * math.ceil(total / n),
            "grads (fp32 shards)": 4 * math.ceil(total / n),
            "optimizer state (shards)": int(per_param_optim * math.ceil(total / n)),
        }
        if n > 1 or cbytes != 4:
            gathered = cbytes * (root_params + 2 * block_params) if blocks else cbytes * total
            est.items["gathered weights (root + 2 blocks)"] = gathered
            est.items["unsharded grads (1 block)"] = cbytes * (block_params or total)
        if t.fsdp.cpu_offload and cuda:
            est.host_items.update(sharded)
            est.notes.append("cpu_offload: shards, gradients and optimizer state live in host RAM")
        else:
            est.items.update(sharded)
    else:
        est.items["params (fp32)"] = 4 * total
        est.items["grads (fp32)"] = 4 * total
        if n > 1:
            est.items["DDP gradient buckets"] = 4 * total
        est.items["optimizer state"] = int(per_param_optim * total)
    acts = _activation_bytes(model, example, micro, t.activation_checkpointing, len(blocks))
    if acts is None:
        est.notes.append("activations: not measurable on the meta device for this model")
    else:
        est.items["activations (1 micro-batch)"] = int(acts * cbytes / 4)
    return est


def _optimizer_bytes_per_param(config: RunConfig) -> float:
    """Bytes of optimizer state per parameter element, from one real step on a tiny layer."""
    probe = nn.Linear(16, 16, bias=False)
    optimizer = build_optimizer(config.optim, probe)
    probe.weight.grad = torch.zeros_like(probe.weight)
    optimizer.step()
    size = sum(
        _nbytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.numel() == probe.weight.numel()
    )
    return size / probe.weight.numel()


def _activation_bytes(
    model: nn.Module, example: torch.Tensor, micro: int, checkpointing: bool, n_blocks: int
) -> float | None:
    """Bytes autograd saves for backward in one fp32 forward pass of `micro` rows on meta."""
    x = example.to("meta").unsqueeze(0).expand(micro, *example.shape).contiguous()

    def measure() -> float:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.requires_grad or t.is_floating_point() or t.dtype == torch.long:
                saved[id(t)] = _nbytes(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        return float(sum(saved.values()) + _nbytes(out) * 2)  # the output and its gradient

    try:
        full = measure()
        if not checkpointing or n_blocks == 0:
            return full
        apply_activation_checkpointing(model)
        kept = measure()
        # in backward, one block at a time is recomputed and holds its full activations
        return kept + (full - kept) / n_blocks
    except Exception:  # a model whose forward needs real data (e.g. .item()) cannot be traced
        return None


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def estimate_run_memory(config: RunConfig, processes: int = 1) -> MemoryEstimate:
    """The pre-flight estimate for a run config: the data is prepared (for shapes and the
    vocabulary) and a model built from scratch is built on the meta device (no memory); a
    pretrained model's base package is loaded with its weights, in host memory."""
    cuda = config.train.device == "cuda" or (
        config.train.device == "auto" and torch.cuda.is_available()
    )
    data, model = build_data_and_model(config, meta_model=True)
    x, _ = gather(data.train, torch.zeros(1, dtype=torch.long))
    return estimate_memory(config, model, x[0], processes=processes, cuda=cuda)
