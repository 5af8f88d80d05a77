"""Explicit L1/L2 penalties on the weights, the textbook way."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shipyard.train.optim import split_decay_params


def penalty(model: nn.Module, *, l1: float, l2: float, batch_size: int) -> Tensor | None:
    """The L1/L2 penalty to add to the mean loss of one optimizer step, or None if both are 0.

        penalty = l2/(2m) · Σ θ²  +  l1/m · Σ |θ|,      m = batch_size

    m is the number of examples in the optimizer step (the mean loss is over those m examples),
    and θ runs over the weights only: the same parameters that get weight decay (see
    `split_decay_params`: no biases, norm parameters or embeddings). Its gradient is
    (l2/m)·θ + (l1/m)·sign(θ), so for plain SGD the l2 term equals weight_decay = l2/m.
    """
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
    if l1 == 0 and l2 == 0:
        return None
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (examples per optimizer step), got {batch_size}")
    weights, _ = split_decay_params(model)
    if not weights:
        return None
    total = torch.zeros((), dtype=torch.float32, device=weights[0].device)
    for w in weights:
        if l2:
            total = total + (l2 / (2 * batch_size)) * w.float().pow(2).sum()
        if l1:
            total = total + (l1 / batch_size) * w.float().abs().sum()
    return total
