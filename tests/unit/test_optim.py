"""Optimizers from config: one or two steps against the textbook formulas, and param groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shipyard.config import (
    AdagradConfig,
    AdamConfig,
    AdamWConfig,
    GDConfig,
    RMSpropConfig,
    SGDConfig,
)
from shipyard.errors import ConfigError
from shipyard.train.optim import build_optimizer, optimizer_summary, split_decay_params

W0 = [1.0, -2.0, 0.5, 3.0]  # starting values of the (2, 2) weight, flattened
GRADS = [[0.5, 0.25, -1.0, 2.0], [-0.3, 0.1, 0.4, 1.5]]  # the gradients of steps 1 and 2


class Tiny(nn.Module):
    """One (2, 2) float64 weight matrix: a "weight", so it sits in the decay group."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(W0, dtype=torch.float64).view(2, 2))


def run_steps(cfg: object, grads: list[list[float]] = GRADS) -> list[float]:
    model = Tiny()
    opt = build_optimizer(cfg, model)  # type: ignore[arg-type]
    for g in grads:
        model.w.grad = torch.tensor(g, dtype=torch.float64).view(2, 2)
        opt.step()
    return model.w.detach().flatten().tolist()


def close(actual: list[float], expected: list[float]) -> None:
    assert actual == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_gd_is_w_minus_lr_g() -> None:
    lr = 0.1
    expected = [w - lr * g1 - lr * g2 for w, g1, g2 in zip(W0, *GRADS, strict=True)]
    close(run_steps(GDConfig(lr=lr)), expected)
    close(run_steps(SGDConfig(lr=lr)), expected)


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum(dampening: float) -> None:
    lr, mu = 0.1, 0.9
    expected = []
    for w, g1, g2 in zip(W0, *GRADS, strict=True):
        v = g1  # PyTorch: the first step's buffer is the raw gradient
        w -= lr * v
        v = mu * v + (1 - dampening) * g2
        w -= lr * v
        expected.append(w)
    close(run_steps(SGDConfig(lr=lr, momentum=mu, dampening=dampening)), expected)


def test_sgd_nesterov() -> None:
    lr, mu = 0.1, 0.9
    expected = []
    for w, g1, g2 in zip(W0, *GRADS, strict=True):
        v = g1
        w -= lr * (g1 + mu * v)
        v = mu * v + g2
        w -= lr * (g2 + mu * v)
        expected.append(w)
    close(run_steps(SGDConfig(lr=lr, momentum=mu, nesterov=True)), expected)


@pytest.mark.parametrize(("lr_decay", "init"), [(0.0, 0.0), (0.5, 0.1)])
def test_adagrad(lr_decay: float, init: float) -> None:
    lr, eps = 0.5, 1e-10
    expected = []
    for w, g1, g2 in zip(W0, *GRADS, strict=True):
        acc = init
        for t, g in enumerate((g1, g2), start=1):
            acc += g * g  # sum of squared gradients
            w -= lr / (1 + (t - 1) * lr_decay) * g / (math.sqrt(acc) + eps)
        expected.append(w)
    cfg = AdagradConfig(lr=lr, lr_decay=lr_decay, initial_accumulator_value=init, eps=eps)
    close(run_steps(cfg), expected)


@pytest.mark.parametrize(("centered", "momentum"), [(False, 0.0), (True, 0.0), (True, 0.8)])
def test_rmsprop(centered: bool, momentum: float) -> None:
    lr, alpha, eps = 0.01, 0.9, 1e-8
    expected = []
    for w, g1, g2 in zip(W0, *GRADS, strict=True):
        sq = mean = buf = 0.0
        for g in (g1, g2):
            sq = alpha * sq + (1 - alpha) * g * g
            mean = alpha * mean + (1 - alpha) * g
            denom = math.sqrt(sq - mean * mean if centered else sq) + eps
            if momentum:
                buf = momentum * buf + g / denom
                w -= lr * buf
            else:
                w -= lr * g / denom
        expected.append(w)
    cfg = RMSpropConfig(lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered)
    close(run_steps(cfg), expected)


def adam_reference(
    grads: list[list[float]], *, lr: float, wd: float, decoupled: bool, amsgrad: bool
) -> list[float]:
    b1, b2, eps = 0.9, 0.999, 1e-8
    out = []
    for i, w in enumerate(W0):
        m = v = vmax = 0.0
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[i]
            if decoupled:
                w -= lr * wd * w  # AdamW: decay the weight directly
            else:
                g += wd * w  # Adam: L2 decay enters the gradient (and the moments)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            vmax = max(vmax, v)
            m_hat = m / (1 - b1**t)
            v_hat = (vmax if amsgrad else v) / (1 - b2**t)
            w -= lr * m_hat / (math.sqrt(v_hat) + eps)
        out.append(w)
    return out


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_bias_corrected(amsgrad: bool) -> None:
    # big then small gradients, so amsgrad's running max differs from v
    grads = [[1.0, -2.0, 3.0, 0.5], [0.01, 0.02, -0.01, 0.0]]
    expected = adam_reference(grads, lr=0.1, wd=0.0, decoupled=False, amsgrad=amsgrad)
    close(run_steps(AdamConfig(lr=0.1, amsgrad=amsgrad), grads), expected)
    if amsgrad:
        plain = adam_reference(grads, lr=0.1, wd=0.0, decoupled=False, amsgrad=False)
        assert expected != pytest.approx(plain)


def test_adam_l2_decay_vs_adamw_decoupled_decay() -> None:
    lr, wd = 0.1, 0.2
    adam = run_steps(AdamConfig(lr=lr, weight_decay=wd))
    adamw = run_steps(AdamWConfig(lr=lr, weight_decay=wd))
    close(adam, adam_reference(GRADS, lr=lr, wd=wd, decoupled=False, amsgrad=False))
    close(adamw, adam_reference(GRADS, lr=lr, wd=wd, decoupled=True, amsgrad=False))
    assert adam != pytest.approx(adamw)


def test_adamw_amsgrad() -> None:
    cfg = AdamWConfig(lr=0.05, weight_decay=0.1, amsgrad=True)
    expected = adam_reference(GRADS, lr=0.05, wd=0.1, decoupled=True, amsgrad=True)
    close(run_steps(cfg), expected)


# ---------------------------------------------------------------------------------------------
# parameter groups


class Zoo(nn.Module):
    """One of each kind, with a tied LM head listed before the embedding and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.emb = nn.Embedding(10, 4)
        self.head.weight = self.emb.weight  # tied: must appear once, as an embedding
        self.conv = nn.Conv1d(4, 4, kernel_size=3)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.gn = nn.GroupNorm(1, 4)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def test_split_decay_params_by_module_type() -> None:
    m = Zoo()
    decay, no_decay = split_decay_params(m)
    assert ids(decay) == ids([m.conv.weight, m.fc.weight])
    expected_no_decay = [m.emb.weight, m.conv.bias, m.bn.weight, m.bn.bias, m.fc.bias]
    expected_no_decay += [m.ln.weight, m.ln.bias, m.gn.weight, m.gn.bias]
    assert ids(no_decay) == ids(expected_no_decay)
    assert len(no_decay) == len(expected_no_decay)  # the tied weight appears once


def test_auto_groups_exclude_bias_norm_embedding() -> None:
    m = Zoo()
    opt = build_optimizer(AdamWConfig(weight_decay=0.1), m)
    decay, no_decay = opt.param_groups
    assert (decay["group"], decay["weight_decay"]) == ("decay", 0.1)
    assert (no_decay["group"], no_decay["weight_decay"]) == ("no_decay", 0.0)
    assert ids(decay["params"]) == ids([m.conv.weight, m.fc.weight])
    assert id(m.emb.weight) in ids(no_decay["params"])
    assert id(m.ln.weight) in ids(no_decay["params"])
    assert id(m.fc.bias) in ids(no_decay["params"])
    all_params = ids(decay["params"]) | ids(no_decay["params"])
    assert id(m.frozen.weight) not in all_params


def test_none_decays_everything_trainable() -> None:
    m = Zoo()
    opt = build_optimizer(SGDConfig(weight_decay=0.1, decay_exclude="none"), m)
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.1
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert ids(group["params"]) == ids(trainable)
    assert len(group["params"]) == len(trainable)


def test_no_decay_group_really_is_not_decayed() -> None:
    lin = nn.Linear(2, 2)
    before_w, before_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = build_optimizer(AdamWConfig(lr=0.1, weight_decay=0.5), lin)
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(lin.weight, before_w * (1 - 0.1 * 0.5))
    assert torch.equal(lin.bias, before_b)


def test_empty_groups_dropped_and_all_frozen_is_an_error() -> None:
    opt = build_optimizer(SGDConfig(), nn.Linear(2, 2, bias=False))
    assert [g["group"] for g in opt.param_groups] == ["decay"]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(SGDConfig(), frozen)


def test_optimizer_summary() -> None:
    m = nn.Sequential(nn.Linear(100, 300), nn.LayerNorm(300), nn.Linear(300, 1))
    line = optimizer_summary(build_optimizer(AdamWConfig(lr=1e-3, weight_decay=0.01), m))
    assert line == (
        "adamw lr=0.001 weight_decay=0.01 "
        "(decay: 2 tensors / 30,300 params, no decay: 4 tensors / 901 params)"
    )
    gd = optimizer_summary(build_optimizer(GDConfig(lr=0.5, decay_exclude="none"), m))
    assert gd == "gd lr=0.5 (all: 6 tensors / 31,201 params)"
