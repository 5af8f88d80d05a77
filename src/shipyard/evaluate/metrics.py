"""Streaming evaluation metrics: fed one batch at a time, summarised once at the end.

Only running sums and a confusion matrix are kept, never every logit, so a metric set evaluates a
split of any size in constant memory. The sums live in float64 tensors that `compute()` all-reduces
across processes (one collective) when a `torch.distributed` process group of more than one
process is initialised, so every rank reports the same global numbers. (torchmetrics did this job
until it cost every command that trains or evaluates ~3 s of imports: it pulls in scipy.signal and,
where installed, transformers.)

    metrics = build_metrics("classification", num_classes=3, class_names=["a", "b", "c"])
    for x, y in loader:
        logits = model(x)
        metrics.update(logits, y, loss_sum=loss.item() * len(y))
    print(format_metrics(metrics.compute()))
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from shipyard.config_base import TASKS, Task
from shipyard.data.instructions import IGNORE_INDEX
from shipyard.errors import EvaluateError


def _distributed() -> bool:
    """True inside a process group of more than one process (collectives needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _Sums:
    """Named float64 running sums (scalars, or tensors of a fixed shape): all of a metric set's
    state. `reduced()` gives them summed over every process of the default group, leaving the
    local sums as they were; every rank must call it (a collective), batches or not."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self._shapes = dict(shapes)
        self.device = torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.values = {
            name: torch.zeros(shape, dtype=torch.float64, device=self.device)
            for name, shape in self._shapes.items()
        }

    def to(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.values = {name: v.to(self.device) for name, v in self.values.items()}

    def add(self, **deltas: float | int | Tensor) -> None:
        for name, delta in deltas.items():
            if name not in self.values:
                raise KeyError(f"unknown sum {name!r}; known: {list(self.values)}")
            value = torch.as_tensor(delta, dtype=torch.float64, device=self.device)
            self.values[name] += value.detach()

    def reduced(self) -> dict[str, Tensor]:
        flat = torch.cat([v.reshape(-1) for v in self.values.values()])
        if _distributed():
            dist.all_reduce(flat)  # a copy: the local sums stay local
        out, at = {}, 0
        for name, v in self.values.items():
            out[name] = flat[at : at + v.numel()].reshape(v.shape)
            at += v.numel()
        return out


class MetricSet:
    """The metrics of one task, accumulated batch by batch; build one with `build_metrics`."""

    task: Task

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self._sums = _Sums(shapes)

    def update(
        self,
        outputs: Tensor,
        targets: Tensor,
        *,
        loss_sum: float | Tensor | None = None,
        count: int | None = None,
    ) -> None:
        """Add one batch of model outputs and targets.

        loss_sum: the batch's summed loss (e.g. `loss.item() * batch_size` for a mean-reduced loss).
        count: how many items `loss_sum` covers; defaults to the batch size (tokens for LMs).
        """
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        """Summarise everything fed in since the last reset as plain JSON-able values."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every batch fed in so far."""
        self._sums.reset()

    def to(self, device: torch.device | str) -> MetricSet:
        """Move the metric state to `device` (where the outputs live; with NCCL, a GPU); returns
        self."""
        self._sums.to(device)
        return self

    def _add_loss(self, loss_sum: float | Tensor | None, count: int | None, default: int) -> None:
        if loss_sum is None:
            if count is not None:
                raise EvaluateError("count was given without loss_sum; pass both or neither")
            return
        if isinstance(loss_sum, Tensor):
            if loss_sum.numel() != 1:
                raise EvaluateError(
                    f"loss_sum must be a scalar (the batch's summed loss), got shape "
                    f"{tuple(loss_sum.shape)}"
                )
            loss_sum = loss_sum.detach().reshape(())
        n = default if count is None else count
        if n < 0:
            raise EvaluateError(f"count must be >= 0, got {n}")
        self._sums.add(loss_sum=loss_sum, loss_count=n)

    def _reduced(self) -> dict[str, Tensor]:
        """Every sum over all processes (a rank that saw no batches still joins the all-reduce;
        emptiness is checked on the global count)."""
        sums = self._sums.reduced()
        if float(sums["samples"]) == 0:
            raise EvaluateError(
                f"no {self.task} batches were fed to the metrics since the last reset; "
                "call update(outputs, targets) at least once before compute()"
            )
        return sums


def _mean_loss(sums: dict[str, Tensor]) -> dict[str, float]:
    if float(sums["loss_count"]) == 0:
        return {}
    return {"loss": float(sums["loss_sum"]) / float(sums["loss_count"])}


class ClassificationMetrics(MetricSet):
    """Accuracy, macro and per-class precision/recall/F1, top-k accuracy and the confusion matrix.

    Macro averages run over the classes that occur in the targets or the predictions (as
    scikit-learn does without `labels`); a class with no predictions has precision 0.
    """

    task: Task = "classification"

    def __init__(self, num_classes: int, top_k: int, class_names: list[str]) -> None:
        scalars: dict[str, tuple[int, ...]] = {
            name: () for name in ("samples", "topk_correct", "loss_sum", "loss_count")
        }
        # rows = true class, columns = predicted class; every other score derives from it
        super().__init__({**scalars, "confusion": (num_classes, num_classes)})
        self.num_classes = num_classes
        self.top_k = top_k
        self.class_names = class_names

    def update(
        self,
        outputs: Tensor,
        targets: Tensor,
        *,
        loss_sum: float | Tensor | None = None,
        count: int | None = None,
    ) -> None:
        outputs, targets = outputs.detach(), targets.detach()
        if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
            raise EvaluateError(
                f"classification outputs must be logits of shape (batch, {self.num_classes}), "
                f"got {tuple(outputs.shape)}"
            )
        if targets.shape != outputs.shape[:1] or targets.is_floating_point():
            raise EvaluateError(
                f"classification targets must be integer class indices of shape "
                f"({outputs.shape[0]},), got {targets.dtype} {tuple(targets.shape)}"
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise EvaluateError(
                f"class index out of range: targets span [{int(targets.min())}, "
                f"{int(targets.max())}] but num_classes={self.num_classes} allows "
                f"[0, {self.num_classes - 1}]"
            )
        logits = outputs.float()
        C = self.num_classes
        cells = targets.long() * C + logits.argmax(dim=1)  # (true, predicted) as one index
        counts = torch.bincount(cells, minlength=C * C).reshape(C, C)
        self._sums.add(confusion=counts, samples=len(targets))
        if 1 < self.top_k < self.num_classes:
            top = logits.topk(self.top_k, dim=1).indices  # (B, k)
            self._sums.add(topk_correct=(top == targets[:, None]).any(dim=1).sum())
        self._add_loss(loss_sum, count, default=len(targets))

    def compute(self) -> dict[str, Any]:
        totals = self._reduced()
        cm = totals["confusion"].cpu()  # (C_true, C_pred), float64 counts
        tp = cm.diagonal()
        support = cm.sum(dim=1)
        predicted = cm.sum(dim=0)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
        recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
        seen = (support + predicted) > 0

        result: dict[str, Any] = _mean_loss(totals)
        result["accuracy"] = float(tp.sum() / cm.sum())
        result["precision_macro"] = float(precision[seen].mean())
        result["recall_macro"] = float(recall[seen].mean())
        result["f1_macro"] = float(f1[seen].mean())
        if 1 < self.top_k < self.num_classes:
            result[f"top{self.top_k}_accuracy"] = float(totals["topk_correct"]) / float(
                totals["samples"]
            )
        result["per_class"] = {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.class_names)
        }
        result["confusion_matrix"] = [[int(v) for v in row] for row in cm.tolist()]
        return result


class RegressionMetrics(MetricSet):
    """MSE, MAE, RMSE and R² (uniform average over target dimensions) on the original scale."""

    task: Task = "regression"

    def __init__(self) -> None:
        names = ("samples", "loss_sum", "loss_count", "elements", "squared_error", "absolute_error")
        super().__init__({name: () for name in names})
        # per output: sums of the targets, of their squares and of the squared residuals (R²),
        # made at the first batch (which says how many outputs); float64, because R² subtracts
        # two large sums of squares, which float32 would cancel away
        self._outputs: _Sums | None = None

    def reset(self) -> None:
        super().reset()
        self._outputs = None

    def to(self, device: torch.device | str) -> RegressionMetrics:
        super().to(device)
        if self._outputs is not None:
            self._outputs.to(device)
        return self

    def update(
        self,
        outputs: Tensor,
        targets: Tensor,
        *,
        loss_sum: float | Tensor | None = None,
        count: int | None = None,
    ) -> None:
        outputs, targets = outputs.detach(), targets.detach()
        if outputs.ndim == 1:
            outputs = outputs.unsqueeze(1)  # (B,) -> (B, 1)
        if outputs.ndim != 2:
            raise EvaluateError(
                f"regression outputs must have shape (batch, targets), got {tuple(outputs.shape)}"
            )
        if targets.shape != outputs.shape:
            if targets.numel() != outputs.numel():
                raise EvaluateError(
                    f"regression targets {tuple(targets.shape)} do not match outputs "
                    f"{tuple(outputs.shape)}"
                )
            targets = targets.reshape(outputs.shape)  # e.g. (B,) targets for (B, 1) outputs
        preds, target = outputs.to(torch.float64), targets.to(torch.float64)
        D = preds.shape[1]
        if self._outputs is None:
            self._outputs = _output_sums(D, self._sums.device)
        elif self._outputs.values["sum"].numel() != D:
            raise EvaluateError(
                f"regression outputs changed width: {self._outputs.values['sum'].numel()} "
                f"targets before, {D} now"
            )
        error = preds - target
        self._outputs.add(
            sum=target.sum(0),
            sum_squares=target.square().sum(0),
            residual_squares=error.square().sum(0),
        )
        self._sums.add(
            samples=len(targets),
            elements=error.numel(),
            squared_error=error.square().sum(),
            absolute_error=error.abs().sum(),
        )
        self._add_loss(loss_sum, count, default=len(targets))

    def _reduced_outputs(self) -> dict[str, Tensor]:
        """The per-output sums over all processes; a rank that saw no batch joins with zeros."""
        D = 0 if self._outputs is None else self._outputs.values["sum"].numel()
        if _distributed():
            width = torch.tensor([D], dtype=torch.float64, device=self._sums.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            widest = int(width.item())
            if self._outputs is not None and widest != D:
                raise EvaluateError(f"ranks fed regression outputs of {D} and {widest} targets")
            D = widest
        sums = self._outputs or _output_sums(D, self._sums.device)  # zeros on a rank with none
        return sums.reduced()

    def compute(self) -> dict[str, Any]:
        totals = self._reduced()
        outputs = self._reduced_outputs()
        elements = float(totals["elements"])
        mse = float(totals["squared_error"]) / elements
        result: dict[str, Any] = _mean_loss(totals)
        result["mse"] = mse
        result["mae"] = float(totals["absolute_error"]) / elements
        result["rmse"] = math.sqrt(mse)
        # R² needs at least two samples; report NaN rather than fail on a one-row split
        n = float(totals["samples"])
        result["r2"] = _r2(outputs, n) if n > 1 else math.nan
        return result


def _output_sums(width: int, device: torch.device) -> _Sums:
    """A regression's per-output sums: of the targets, their squares, the squared residuals."""
    sums = _Sums({"sum": (width,), "sum_squares": (width,), "residual_squares": (width,)})
    sums.to(device)
    return sums


def _r2(sums: dict[str, Tensor], n: float) -> float:
    """R², uniformly averaged over outputs. An output whose targets are (near) constant scores 1
    when its residuals are (near) zero too, else 0, as scikit-learn and torchmetrics do."""
    rss = sums["residual_squares"]
    tss = sums["sum_squares"] - sums["sum"] * (sums["sum"] / n)
    zero = torch.zeros_like(rss)
    has_rss = ~torch.isclose(rss, zero, atol=1e-4)
    has_tss = ~torch.isclose(tss, zero, atol=1e-4)
    scores = torch.ones_like(rss)
    both = has_rss & has_tss
    scores[both] = 1 - rss[both] / tss[both]
    scores[has_rss & ~has_tss] = 0.0
    return float(scores.mean())


class LanguageModelingMetrics(MetricSet):
    """Mean per-token loss, perplexity, token count and next-token accuracy.

    Targets equal to -100 (`IGNORE_INDEX`) are padding: not scored and not counted.
    """

    task: Task = "language-modeling"

    def __init__(self) -> None:
        names = ("samples", "tokens", "correct", "loss_sum", "loss_count")
        super().__init__({name: () for name in names})

    def update(
        self,
        outputs: Tensor,
        targets: Tensor,
        *,
        loss_sum: float | Tensor | None = None,
        count: int | None = None,
    ) -> None:
        outputs, targets = outputs.detach(), targets.detach()
        if outputs.ndim != 3 or targets.shape != outputs.shape[:2]:
            raise EvaluateError(
                f"language-modeling outputs must be logits (batch, time, vocab) and targets "
                f"(batch, time); got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        V = outputs.shape[-1]
        logits = outputs.reshape(-1, V)  # (B*T, V)
        flat = targets.reshape(-1)  # (B*T,)
        scored = flat != IGNORE_INDEX
        tokens = int(scored.sum())
        if tokens and (int(flat[scored].min()) < 0 or int(flat[scored].max()) >= V):
            raise EvaluateError(
                f"token id out of range: targets span [{int(flat[scored].min())}, "
                f"{int(flat[scored].max())}] but the vocabulary has {V} entries "
                f"(use {IGNORE_INDEX} for padding)"
            )
        correct = int(((logits.argmax(dim=1) == flat) & scored).sum())
        totals = self._sums
        totals.add(samples=targets.shape[0], tokens=tokens, correct=correct)
        if loss_sum is None and count is None:
            # Per-token losses summed in float64: the total then does not depend on batching.
            per_token = F.cross_entropy(
                logits.float(), flat, ignore_index=IGNORE_INDEX, reduction="none"
            )
            totals.add(loss_sum=per_token.to(torch.float64).sum(), loss_count=tokens)
        else:
            self._add_loss(loss_sum, count, default=tokens)

    def compute(self) -> dict[str, Any]:
        totals = self._reduced()
        result: dict[str, Any] = _mean_loss(totals)
        if "loss" in result:
            # exp overflows a float past ~709; an untrained or diverged model can get there
            result["perplexity"] = math.exp(result["loss"]) if result["loss"] < 709 else math.inf
        tokens = float(totals["tokens"])
        result["tokens"] = int(tokens)
        result["accuracy"] = float(totals["correct"]) / tokens if tokens else math.nan
        return result


def build_metrics(
    task: Task,
    *,
    num_classes: int | None = None,
    top_k: int = 3,
    class_names: list[str] | None = None,
) -> MetricSet:
    """Build the streaming metric set for `task`.

    num_classes: required for classification (or given through `class_names`).
    top_k: also report top-k accuracy for classifiers with more than `top_k` classes.
    class_names: labels for the per-class table; default "0", "1", ...
    """
    if task == "classification":
        if num_classes is None:
            if class_names is None:
                raise EvaluateError(
                    "classification metrics need num_classes (or class_names); pass e.g. "
                    "build_metrics('classification', num_classes=10)"
                )
            num_classes = len(class_names)
        if num_classes < 2:
            raise EvaluateError(f"classification needs num_classes >= 2, got {num_classes}")
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise EvaluateError(
                f"got {len(class_names)} class_names for num_classes={num_classes}; "
                "give one name per class, in class-index order"
            )
        if len(set(class_names)) != len(class_names):
            raise EvaluateError(f"class_names must be unique, got {class_names}")
        if top_k < 1:
            raise EvaluateError(f"top_k must be >= 1, got {top_k}")
        return ClassificationMetrics(num_classes, top_k, list(class_names))
    if task == "regression":
        return RegressionMetrics()
    if task == "language-modeling":
        return LanguageModelingMetrics()
    raise EvaluateError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def primary_metric(task: Task) -> tuple[str, Literal["min", "max"]]:
    """The metric that picks the best checkpoint for `task`, and whether lower or higher wins."""
    if task == "classification":
        return "accuracy", "max"
    if task == "regression":
        return "mse", "min"
    if task == "language-modeling":
        return "loss", "min"
    raise EvaluateError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def format_metrics(metrics: dict[str, Any]) -> str:
    """One log line of the scalar metrics, e.g. `loss=0.3124 accuracy=0.9210 tokens=51200`."""
    parts = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # per-class tables, confusion matrices, strings
        if isinstance(value, int):
            parts.append(f"{name}={value}")
        elif value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e5:
            parts.append(f"{name}={value:.4g}")
        else:
            parts.append(f"{name}={value:.4f}")
    return " ".join(parts)
