"""Losses (sum, count) against hand computations, accumulation equivalence, and L1/L2 penalties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shipyard.errors import ConfigError, TrainError
from shipyard.train.losses import build_loss
from shipyard.train.regularization import penalty


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_auto_picks_by_task() -> None:
    assert build_loss("classification", "auto").name == "cross-entropy"
    assert build_loss("language-modeling", "auto").name == "cross-entropy"
    assert build_loss("regression", "auto").name == "mse"


def test_cross_entropy_by_hand() -> None:
    # row 0: p = (1/4, 3/4), target 1; row 1: p = (1/2, 1/2), target 0
    outputs = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    total, count = build_loss("classification", "cross-entropy")(outputs, torch.tensor([1, 0]))
    assert count == 2
    assert total.item() == pytest.approx(-math.log(0.75) + math.log(2.0))


def test_label_smoothing_by_hand() -> None:
    eps = 0.1
    outputs = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4), target 1
    smooth = build_loss("classification", "cross-entropy", label_smoothing=eps)
    total, _ = smooth(outputs, torch.tensor([1]))
    nll = [-math.log(0.25), -math.log(0.75)]
    # target distribution (1-eps)·onehot + eps/C
    assert total.item() == pytest.approx((1 - eps) * nll[1] + eps * sum(nll) / 2)
    plain, _ = build_loss("classification", "cross-entropy")(outputs, torch.tensor([1]))
    assert total.item() > plain.item()  # smoothing penalises a confident correct answer


def test_language_modeling_counts_tokens() -> None:
    torch.manual_seed(0)
    outputs = torch.randn(2, 5, 7)  # (B, T, V)
    targets = torch.randint(0, 7, (2, 5))  # (B, T)
    total, count = build_loss("language-modeling", "auto")(outputs, targets)
    assert count == 10
    expected = F.cross_entropy(outputs.view(-1, 7), targets.view(-1))
    assert (total / count).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ignored_targets_are_neither_scored_nor_counted() -> None:
    # instruction data: prompt tokens and padding carry -100; only the answers count
    torch.manual_seed(0)
    outputs = torch.randn(2, 5, 7)
    targets = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    total, count = build_loss("language-modeling", "auto")(outputs, targets)
    assert int(count) == 4
    scored = targets != -100
    expected = F.cross_entropy(outputs[scored], targets[scored], reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


REG_OUT = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
REG_TGT = torch.tensor([[1.0, 0.0], [0.0, 4.0]])  # errors: (0, 2), (3, 0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mse", (0 + 4) / 2 + (9 + 0) / 2),
        ("mae", (0 + 2) / 2 + (3 + 0) / 2),
        ("huber", (0 + 1.5) / 2 + (2.5 + 0) / 2),  # delta 1: |e| - 1/2 beyond 1
    ],
)
def test_regression_by_hand_row_mean_over_dims(name: str, expected: float) -> None:
    total, count = build_loss("regression", name)(REG_OUT, REG_TGT)
    assert count == 2  # rows, not values
    assert total.item() == pytest.approx(expected)


def test_regression_column_output_does_not_broadcast() -> None:
    outputs = torch.tensor([[1.0], [2.0], [3.0]])  # (B, 1)
    targets = torch.tensor([1.0, 0.0, 5.0])  # (B,) -- naive broadcasting would give (B, B)
    total, count = build_loss("regression", "mse")(outputs, targets)
    assert (total.item(), count) == (pytest.approx(0 + 4 + 4), 3)


def test_bce_binary_shapes() -> None:
    loss = build_loss("classification", "bce")
    expected = math.log(2.0) + softplus(2.0)  # logit 0 → target 1; logit 2 → target 0
    for outputs in (torch.tensor([0.0, 2.0]), torch.tensor([[0.0], [2.0]])):
        total, count = loss(outputs, torch.tensor([1, 0]))
        assert count == 2
        assert total.item() == pytest.approx(expected)


def test_bce_multi_label_mean_over_labels() -> None:
    outputs = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    total, count = build_loss("classification", "bce", num_classes=2)(outputs, targets)
    row0 = (math.log(2.0) + softplus(2.0)) / 2
    row1 = (softplus(-1.0) + math.log(2.0)) / 2
    assert count == 2
    assert total.item() == pytest.approx(row0 + row1)
    torch_mean = F.binary_cross_entropy_with_logits(outputs, targets)
    assert (total / count).item() == pytest.approx(torch_mean.item())


@pytest.mark.parametrize(
    ("task", "name"),
    [
        ("classification", "cross-entropy"),
        ("classification", "bce"),
        ("regression", "mse"),
        ("regression", "huber"),
        ("language-modeling", "cross-entropy"),
    ],
)
def test_accumulation_equals_one_big_batch(task: str, name: str) -> None:
    """sum over 4 micro-batches of 8, divided by the total count == the loss over 32 rows."""
    torch.manual_seed(1)
    if task == "language-modeling":
        outputs, targets = torch.randn(32, 3, 5), torch.randint(0, 5, (32, 3))
    elif name == "cross-entropy":
        outputs, targets = torch.randn(32, 4), torch.randint(0, 4, (32,))
    elif name == "bce":
        outputs, targets = torch.randn(32, 3), torch.randint(0, 2, (32, 3)).float()
    else:
        outputs, targets = torch.randn(32, 2), torch.randn(32, 2)
    loss = build_loss(task, name)
    leaf = outputs.clone().requires_grad_(True)
    total, count = loss(leaf, targets)
    (total / count).backward()
    assert leaf.grad is not None
    full_value, full_grad = (total / count).item(), leaf.grad.clone()

    leaf.grad = None
    sums, counts = [], 0
    for i in range(0, 32, 8):
        part_sum, part_count = loss(leaf[i : i + 8], targets[i : i + 8])
        sums.append(part_sum)
        counts += part_count
    assert counts == count
    accumulated = sum(sums) / counts  # type: ignore[operator]
    accumulated.backward()
    assert accumulated.item() == pytest.approx(full_value, rel=1e-6)
    assert torch.allclose(leaf.grad, full_grad, atol=1e-7)


def test_bad_names_and_combinations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="choose auto or one of"):
        build_loss("classification", "hinge")
    with pytest.raises(ConfigError, match="does not fit task 'regression'"):
        build_loss("regression", "cross-entropy")
    with pytest.raises(ConfigError, match="does not fit task 'classification'"):
        build_loss("classification", "mse")
    with pytest.raises(ConfigError, match="only applies to cross-entropy"):
        build_loss("regression", "mse", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="task 'ranking'"):
        build_loss("ranking", "auto")


def test_shape_mismatches_are_clear() -> None:
    ce = build_loss("classification", "cross-entropy", num_classes=3)
    with pytest.raises(TrainError, match="outputs 4 values per example but the data has 3"):
        ce(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(TrainError, match=r"got outputs \(2, 3\) and targets \(3,\)"):
        ce(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TrainError, match="mse needs"):
        build_loss("regression", "mse")(torch.zeros(2, 2), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# L1/L2 penalties


def tiny_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
        model[0].bias.fill_(5.0)
        model[2].weight.copy_(torch.tensor([[-1.0, 0.5]]))
        model[2].bias.fill_(7.0)
        model[1].weight.fill_(4.0)  # norm parameters: excluded like biases
    return model


def test_penalty_exact_value_weights_only() -> None:
    model, l1, l2, m = tiny_model(), 0.01, 0.1, 4
    squares = 1 + 4 + 9 + 0 + 1 + 0.25  # weights only: no biases (5, 7), no LayerNorm (4)
    absolutes = 1 + 2 + 3 + 0 + 1 + 0.5
    value = penalty(model, l1=l1, l2=l2, batch_size=m)
    assert value is not None
    assert value.item() == pytest.approx(l2 / (2 * m) * squares + l1 / m * absolutes)
    l2_only = penalty(model, l1=0.0, l2=l2, batch_size=m)
    assert l2_only is not None
    assert l2_only.item() == pytest.approx(l2 / (2 * m) * squares)


def test_penalty_gradient() -> None:
    model, l1, l2, m = tiny_model(), 0.01, 0.1, 4
    value = penalty(model, l1=l1, l2=l2, batch_size=m)
    assert value is not None
    value.backward()
    for layer in (model[0], model[2]):
        w = layer.weight.detach()
        assert torch.allclose(layer.weight.grad, (l2 / m) * w + (l1 / m) * torch.sign(w))
        assert layer.bias.grad is None
    assert model[1].weight.grad is None


def test_penalty_none_when_off() -> None:
    assert penalty(tiny_model(), l1=0.0, l2=0.0, batch_size=8) is None
    with pytest.raises(ValueError, match="batch_size"):
        penalty(tiny_model(), l1=0.1, l2=0.0, batch_size=0)
