"""Training-batch augmentation: random crop, flips, rotations, brightness/contrast, noise, mixup.

`Augmenter(config, input_shape, task)` checks once that the operations fit the data, then
`augmenter(x, y, key)` returns a changed copy of one training batch. Every random draw comes from
generators seeded by `key` (the run's seed, step, micro-batch and rank), so a run, and a resumed
run, sees exactly the same augmented batches. The trainer calls it on training batches only: the
datasets themselves, and so validation and test data, never change.

Mixup (Zhang et al., 2018) blends each example with another one of the batch, chosen by a random
permutation `perm`, with one weight lam ~ Beta(alpha, alpha) per batch:
x' = lam * x + (1 - lam) * x[perm]. For regression the targets blend the same way; for
classification the loss blends: lam * loss(out, y) + (1 - lam) * loss(out, y[perm]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shipyard.data.config import AugmentationConfig
from shipyard.errors import DataError


@dataclass
class AugmentedBatch:
    """One augmented batch. For classification with mixup, `y_mix` and `lam` describe the blend."""

    x: torch.Tensor
    y: torch.Tensor
    y_mix: torch.Tensor | None = None
    lam: float = 1.0


class Augmenter:
    """Applies `data.augmentation` to training batches (see the module docstring)."""

    def __init__(self, config: AugmentationConfig, input_shape: Sequence[int], task: str) -> None:
        self.config = config
        self.task = task
        if task == "language-modeling":
            raise DataError(
                "data.augmentation works on images and feature rows, not language modeling; "
                "remove the data.augmentation section"
            )
        if config.uses_images and len(input_shape) != 3:
            raise DataError(
                f"data.augmentation crop/flip/rotation/brightness/contrast need images of shape "
                f"(C, H, W), but the examples have shape {tuple(input_shape)}; for feature rows "
                "use noise_std and mixup_alpha"
            )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, key: Sequence[int]) -> AugmentedBatch:
        """An augmented copy of the batch (x, y); `key` seeds every random draw."""
        if not torch.is_floating_point(x):
            raise DataError(
                f"data.augmentation needs numeric (float) inputs, got {x.dtype} (token ids?); "
                "remove the data.augmentation section for token models"
            )
        cfg = self.config
        seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        n = x.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:  # (n,) on x's device
            return (low + (high - low) * torch.rand(n, generator=gen)).to(x.device, x.dtype)

        x = x.clone()
        if cfg.hflip:
            flip = (torch.rand(n, generator=gen) < cfg.hflip).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cfg.vflip:
            flip = (torch.rand(n, generator=gen) < cfg.vflip).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-2), x)
        if cfg.crop_padding or cfg.rotation:
            p = cfg.crop_padding
            shift = torch.randint(-p, p + 1, (n, 2), generator=gen) if p else torch.zeros(n, 2)
            angle = uniform(-cfg.rotation, cfg.rotation) if cfg.rotation else None
            x = shift_rotate(x, shift.to(x.device, x.dtype), angle)
        if cfg.brightness:
            x = x + uniform(-cfg.brightness, cfg.brightness)[:, None, None, None]
        if cfg.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * uniform(1 - cfg.contrast, 1 + cfg.contrast)[:, None, None, None] + mean
        if cfg.noise_std:
            noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            x = x + cfg.noise_std * noise
        if cfg.mixup_alpha and n > 1:
            lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            perm = torch.randperm(n, generator=gen).to(x.device)
            return mixup(x, y, perm, lam, blend_targets=self.task == "regression")
        return AugmentedBatch(x, y)


def mixup(
    x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float, *, blend_targets: bool
) -> AugmentedBatch:
    """x' = lam*x + (1-lam)*x[perm]; targets blend too (regression), else y[perm] is kept."""
    x_mixed = lam * x + (1.0 - lam) * x[perm]
    if blend_targets:
        return AugmentedBatch(x_mixed, lam * y + (1.0 - lam) * y[perm])
    return AugmentedBatch(x_mixed, y, y_mix=y[perm], lam=lam)


def shift_rotate(
    x: torch.Tensor, shift: torch.Tensor, angle_deg: torch.Tensor | None
) -> torch.Tensor:
    """Images (N, C, H, W) moved by `shift` (N, 2) whole pixels (dx, dy) and rotated by
    `angle_deg` (N,) about their centre; uncovered pixels become 0 (the train mean after
    standardisation)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    if angle_deg is not None:
        rad = angle_deg * (math.pi / 180.0)
        cos, sin = torch.cos(rad), torch.sin(rad)
        # grid coordinates are normalised to [-1, 1] per axis: correct for the aspect ratio
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    else:
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # output pixel (i, j) samples input (i - dy, j - dx): a pixel step is 2/W (2/H) in the grid
    theta[:, 0, 2] = -2.0 * shift[:, 0] / w
    theta[:, 1, 2] = -2.0 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
