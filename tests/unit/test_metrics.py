"""Streaming metrics against scikit-learn / F.cross_entropy on the whole data at once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn import metrics as skm
from tests.metrics_support import (
    classification_data,
    lm_data,
    rank_computes,
    shared_data,
    task_metrics,
)

from shipyard.evaluate import (
    EvaluateError,
    MetricSet,
    build_metrics,
    format_metrics,
    primary_metric,
)

UNEVEN = [7, 1, 30, 13, 49]  # 100 rows in batches of awkward sizes


def feed(
    metrics: MetricSet, outputs: torch.Tensor, targets: torch.Tensor, sizes: list[int]
) -> None:
    start = 0
    for size in sizes:
        metrics.update(outputs[start : start + size], targets[start : start + size])
        start += size
    assert start == len(outputs)


def test_classification_matches_sklearn_and_ignores_batching() -> None:
    logits, targets = classification_data()
    names = ["ant", "bee", "cat", "dog", "eel"]
    m = build_metrics("classification", num_classes=5, top_k=2, class_names=names)
    feed(m, logits, targets, UNEVEN)
    got = m.compute()

    y, pred = targets.numpy(), logits.argmax(1).numpy()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert got["precision_macro"] == pytest.approx(p, abs=1e-12)
    assert got["recall_macro"] == pytest.approx(r, abs=1e-12)
    assert got["f1_macro"] == pytest.approx(f, abs=1e-12)
    top2 = skm.top_k_accuracy_score(y, logits.numpy(), k=2, labels=list(range(5)))
    assert got["top2_accuracy"] == pytest.approx(top2, abs=1e-12)

    labels = list(range(5))
    p, r, f, s = skm.precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0
    )
    assert list(got["per_class"]) == names
    for i, name in enumerate(names):
        row = got["per_class"][name]
        assert row["precision"] == pytest.approx(p[i], abs=1e-12)
        assert row["recall"] == pytest.approx(r[i], abs=1e-12)
        assert row["f1"] == pytest.approx(f[i], abs=1e-12)
        assert row["support"] == s[i]
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert "loss" not in got  # no loss was fed in

    m.reset()
    feed(m, logits, targets, [100])
    assert m.compute() == got  # exact: every state is an integer count


def test_classification_loss_is_mean_of_fed_sums() -> None:
    logits, targets = classification_data(n=10, c=3)
    m = build_metrics("classification", num_classes=3)
    m.update(logits[:4], targets[:4], loss_sum=2.0)  # count defaults to the batch size
    m.update(logits[4:], targets[4:], loss_sum=torch.tensor(4.0), count=6)
    got = m.compute()
    assert got["loss"] == pytest.approx(6.0 / 10)
    assert "top3_accuracy" not in got  # k >= num_classes: always 1, not reported
    assert list(got["per_class"]) == ["0", "1", "2"]


def test_hand_checked_confusion_matrix() -> None:
    # predictions 0, 1, 1, 0 for targets 0, 1, 0, 0
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    m = build_metrics("classification", class_names=["no", "yes"])
    m.update(logits, torch.tensor([0, 1, 0, 0]))
    got = m.compute()
    assert got["confusion_matrix"] == [[2, 1], [0, 1]]
    assert got["accuracy"] == 0.75
    assert got["per_class"]["yes"] == {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}


@pytest.mark.parametrize("k", [1, 3])
def test_regression_matches_sklearn_and_ignores_batching(k: int) -> None:
    g = torch.Generator().manual_seed(1)
    # a large offset: float32 sums of squares would lose R² to cancellation
    targets = 1000.0 + torch.randn(100, k, generator=g) * torch.arange(1, k + 1)
    outputs = targets + 0.3 * torch.randn(100, k, generator=g)
    m = build_metrics("regression")
    feed(m, outputs, targets, UNEVEN)
    got = m.compute()

    y, yhat = targets.double().numpy(), outputs.double().numpy()
    mse = skm.mean_squared_error(y, yhat)
    assert got["mse"] == pytest.approx(mse, rel=1e-9)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, yhat), rel=1e-9)
    assert got["rmse"] == pytest.approx(math.sqrt(mse), rel=1e-9)
    assert got["r2"] == pytest.approx(skm.r2_score(y, yhat), rel=1e-9)

    m.reset()
    feed(m, outputs, targets, [100])
    assert m.compute() == pytest.approx(got, rel=1e-9)  # float64 sums, summed in another order


def test_regression_accepts_flat_targets_for_one_output_and_loss() -> None:
    m = build_metrics("regression")
    m.update(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 4.0]), loss_sum=4.0)
    got = m.compute()
    assert got == {"loss": 2.0, "mse": 2.0, "mae": 1.0, "rmse": math.sqrt(2.0), "r2": 1 - 4 / 4.5}


@pytest.mark.parametrize("pad", [False, True])
def test_language_modeling_matches_cross_entropy_and_ignores_batching(pad: bool) -> None:
    logits, targets = lm_data(pad)
    V = logits.shape[-1]
    m = build_metrics("language-modeling")
    feed(m, logits, targets, [5, 1, 6])
    got = m.compute()

    scored = targets != -100
    expected = F.cross_entropy(logits.reshape(-1, V).double(), targets.reshape(-1))
    assert got["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-6)
    assert got["tokens"] == int(scored.sum())
    correct = ((logits.argmax(-1) == targets) & scored).sum()
    assert got["accuracy"] == pytest.approx(float(correct) / int(scored.sum()))

    m.reset()
    feed(m, logits, targets, [12])
    again = m.compute()
    assert again["tokens"] == got["tokens"]
    assert again["loss"] == pytest.approx(got["loss"], rel=1e-12)


def test_language_modeling_uses_fed_loss_per_token() -> None:
    logits, targets = lm_data(pad=False)
    m = build_metrics("language-modeling")
    m.update(logits, targets, loss_sum=2.0 * targets.numel())
    got = m.compute()
    assert got["loss"] == pytest.approx(2.0)
    assert got["perplexity"] == pytest.approx(math.exp(2.0))


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(EvaluateError, match="num_classes"):
        build_metrics("classification")
    with pytest.raises(EvaluateError, match="expected one of"):
        build_metrics("ranking")  # type: ignore[arg-type]
    with pytest.raises(EvaluateError, match="2 class_names for num_classes=3"):
        build_metrics("classification", num_classes=3, class_names=["a", "b"])
    m = build_metrics("classification", num_classes=3)
    with pytest.raises(EvaluateError, match=r"shape \(batch, 3\)"):
        m.update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(EvaluateError, match="out of range"):
        m.update(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(EvaluateError, match="no classification batches"):
        m.compute()
    with pytest.raises(EvaluateError, match="do not match"):
        build_metrics("regression").update(torch.randn(4, 2), torch.randn(4, 3))
    regression = build_metrics("regression")
    regression.update(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(EvaluateError, match="changed width: 2 targets before, 3 now"):
        regression.update(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(EvaluateError, match="vocabulary has 5"):
        build_metrics("language-modeling").update(torch.randn(1, 2, 5), torch.tensor([[1, 5]]))


def test_primary_metric_and_format() -> None:
    assert primary_metric("classification") == ("accuracy", "max")
    assert primary_metric("regression") == ("mse", "min")
    assert primary_metric("language-modeling") == ("loss", "min")
    line = format_metrics(
        {"loss": 0.31234, "tokens": 51200, "mse": 2.5e-6, "per_class": {"a": {}}, "cm": [[1]]}
    )
    assert line == "loss=0.3123 tokens=51200 mse=2.5e-06"


@pytest.mark.skipif(
    not dist.is_available() or dist.is_initialized(), reason="needs a fresh torch.distributed"
)
def test_to_device_and_single_process_group_sync() -> None:
    # compute() with a process group of one: no all-reduce, the same numbers
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        logits, targets = lm_data(pad=True)
        m = build_metrics("language-modeling").to("cpu")
        feed(m, logits, targets, [4, 8])
        got = m.compute()
    finally:
        dist.destroy_process_group()
    reference = build_metrics("language-modeling")
    feed(reference, logits, targets, [12])
    assert got == pytest.approx(reference.compute(), rel=1e-12)


def test_metrics_all_reduce_across_processes(tmp_path: Path) -> None:
    # three gloo processes; the third saw no batch and still joins every collective
    world = 3
    # spawned, not forked: a forked child of a process whose OpenMP pool ran deadlocks in it
    torch.multiprocessing.spawn(
        rank_computes, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world
    )
    for task, (outputs, targets) in shared_data().items():
        alone = task_metrics(task)
        alone.update(outputs, targets)
        expected = alone.compute()
        for rank in range(world):
            got = json.loads((tmp_path / f"{rank}.json").read_text())[task]
            assert got.keys() == expected.keys(), (task, rank)
            for name, value in expected.items():  # sums of floats: only the order differs
                want = pytest.approx(value, rel=1e-9) if isinstance(value, float) else value
                assert got[name] == want, (task, rank, name)
