"""Losses that return a sum and a count, so gradient accumulation normalises correctly.

A `LossFn` returns (sum of per-example losses, number of examples) for one micro-batch; the
trainer divides the sum by the count of the whole optimizer step. Averaging per micro-batch
instead would weight a short last micro-batch (or, for language models, a batch with fewer
tokens) as much as a full one; with sum/count, grad_accum=4 × batch=8 equals batch=32 exactly.

An "example" is a row for classification and regression and a token for language modeling.
For regression and multi-label bce the per-row loss is the mean over the target dimensions.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor

from shipyard.config_base import TASKS
from shipyard.data.instructions import IGNORE_INDEX
from shipyard.errors import ConfigError, TrainError

LossName = Literal["cross-entropy", "mse", "mae", "huber", "bce"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
_FITS = {
    "classification": ("cross-entropy", "bce"),
    "language-modeling": ("cross-entropy",),
    "regression": ("mse", "mae", "huber"),
}


class LossFn:
    """A loss for one task: `loss_fn(outputs, targets) -> (sum, count)`.

    Shapes: cross-entropy takes logits (B, C) with class ids (B,), or for language modeling
    (B, T, V) with (B, T); regression losses take (B, D) or (B,) with matching targets; bce takes
    logits (B,) or (B, 1) with 0/1 targets (binary), or (B, C) with float 0/1 targets (multi-label).
    """

    def __init__(
        self,
        name: str,
        task: str,
        *,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def __repr__(self) -> str:
        return f"LossFn(name={self.name!r}, task={self.task!r})"

    def __call__(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int | Tensor]:
        if self.name == "cross-entropy":
            return self._cross_entropy(outputs, targets)
        if self.name == "bce":
            return self._bce(outputs, targets)
        return self._regression(outputs, targets)

    def _cross_entropy(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int | Tensor]:
        if outputs.ndim != targets.ndim + 1 or outputs.shape[:-1] != targets.shape:
            raise TrainError(
                f"cross-entropy needs logits (B, C) with targets (B,), or (B, T, V) with (B, T); "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        self._check_width(outputs)
        logits = outputs.reshape(-1, outputs.shape[-1])  # (N, C), N = B or B*T
        flat = targets.reshape(-1)
        total = F.cross_entropy(
            logits,
            flat,
            reduction="sum",
            label_smoothing=self.label_smoothing,
            ignore_index=IGNORE_INDEX,
        )
        # targets of IGNORE_INDEX (padding, prompt tokens of instruction data) are not scored;
        # the count stays a tensor so a training step does not wait for the device here
        return total, (flat != IGNORE_INDEX).sum()

    def _bce(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int | Tensor]:
        self._check_width(outputs)
        if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
            if targets.numel() != outputs.shape[0]:
                raise TrainError(
                    f"binary bce needs one target per row: outputs {tuple(outputs.shape)}, "
                    f"targets {tuple(targets.shape)}"
                )
            logits = outputs.reshape(-1, 1)
            labels = targets.reshape(-1, 1)
        elif outputs.ndim == 2 and targets.shape == outputs.shape:
            logits, labels = outputs, targets  # multi-label (B, C)
        else:
            raise TrainError(
                f"bce needs logits (B,) or (B, 1) with (B,) targets, or (B, C) with (B, C) "
                f"targets; got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        per_label = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"
        )  # (B, C)
        return per_label.mean(dim=1).sum(), logits.shape[0]

    def _regression(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int | Tensor]:
        if outputs.ndim == 0 or outputs.numel() != targets.numel():
            raise TrainError(
                f"{self.name} needs outputs and targets with the same number of values per row; "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        rows = outputs.shape[0]
        # Reshape both to (B, D): (B, 1) outputs against (B,) targets must not broadcast to (B, B).
        pred = outputs.reshape(rows, -1).float()
        true = targets.reshape(rows, -1).to(pred.dtype)
        if self.name == "mse":
            per_value = F.mse_loss(pred, true, reduction="none")
        elif self.name == "mae":
            per_value = F.l1_loss(pred, true, reduction="none")
        else:
            per_value = F.huber_loss(pred, true, reduction="none", delta=1.0)
        return per_value.mean(dim=1).sum(), rows

    def _check_width(self, outputs: Tensor) -> None:
        if self.num_classes is None or outputs.ndim < 2:
            return
        width = outputs.shape[-1]
        binary_bce = self.name == "bce" and self.num_classes == 2 and width == 1
        if width != self.num_classes and not binary_bce:
            raise TrainError(
                f"{self.name}: the model outputs {width} values per example but the data has "
                f"{self.num_classes} classes; make the model's output size match"
            )


def build_loss(
    task: str,
    name: str,
    *,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
) -> LossFn:
    """Build the loss for `task`; name "auto" picks cross-entropy (classification, LM) or mse.

    label_smoothing: cross-entropy only. num_classes: when given, the model's output width is
    checked against it (bce also accepts a single logit for 2 classes).
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} has no loss; choose one of {', '.join(TASKS)}")
    if name == "auto":
        name = "mse" if task == "regression" else "cross-entropy"
    if name not in LOSS_NAMES:
        raise ConfigError(
            f"train.loss {name!r} is unknown; choose auto or one of {', '.join(LOSS_NAMES)}"
        )
    if name not in _FITS[task]:
        raise ConfigError(
            f"train.loss {name!r} does not fit task {task!r}; use one of {', '.join(_FITS[task])}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing and name != "cross-entropy":
        raise ConfigError(
            f"regularization.label_smoothing={label_smoothing} only applies to cross-entropy, "
            f"not {name!r}; set it to 0"
        )
    return LossFn(name, task, label_smoothing=label_smoothing, num_classes=num_classes)
