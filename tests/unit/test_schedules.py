"""LR schedules: the lr used for update s against the closed forms, plateau, onecycle, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from shipyard.config import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    OneCycleSchedule,
    PlateauSchedule,
    StepSchedule,
)
from shipyard.errors import CheckpointError, ConfigError
from shipyard.train.schedules import LRSchedule, build_schedule

LR = 0.5


def make(cfg: object, total_steps: int, lr: float = LR) -> tuple[torch.optim.Optimizer, LRSchedule]:
    # two groups (weight + bias), as build_optimizer makes them
    lin = nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [lin.weight]}, {"params": [lin.bias]}], lr=lr)
    return opt, build_schedule(cfg, opt, total_steps)  # type: ignore[arg-type]


def advance(opt: torch.optim.Optimizer, sched: LRSchedule) -> None:
    opt.step()  # no grads: a no-op update, but the order torch expects
    sched.step()


def lrs(cfg: object, total_steps: int, n: int | None = None) -> list[float]:
    """The lr used for updates 0..n-1."""
    opt, sched = make(cfg, total_steps)
    out = []
    for _ in range(total_steps if n is None else n):
        group_lrs = sched.get_last_lr()
        assert group_lrs[0] == group_lrs[1]
        out.append(group_lrs[0])
        advance(opt, sched)
    return out


def warm(s: int, warmup: int) -> float:
    return LR * (s + 1) / warmup


def test_constant_with_and_without_warmup() -> None:
    assert lrs(ConstantSchedule(), 5) == pytest.approx([LR] * 5)
    assert lrs(ConstantSchedule(warmup_steps=4), 6) == pytest.approx(
        [LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR]
    )


def test_step() -> None:
    cfg = StepSchedule(step_size=3, gamma=0.5)
    assert lrs(cfg, 8) == pytest.approx([LR * 0.5 ** (s // 3) for s in range(8)])
    warmed = lrs(StepSchedule(step_size=3, gamma=0.5, warmup_steps=2), 10)
    expected = [warm(s, 2) if s < 2 else LR * 0.5 ** ((s - 2) // 3) for s in range(10)]
    assert warmed == pytest.approx(expected)


def test_exponential() -> None:
    assert lrs(ExponentialSchedule(gamma=0.9), 6) == pytest.approx([LR * 0.9**s for s in range(6)])
    warmed = lrs(ExponentialSchedule(gamma=0.9, warmup_steps=3), 8)
    assert warmed == pytest.approx([warm(s, 3) if s < 3 else LR * 0.9 ** (s - 3) for s in range(8)])


@pytest.mark.parametrize("warmup", [0, 2])
def test_cosine(warmup: int) -> None:
    total, min_lr = 12, 0.05
    big_t = total - warmup

    def expected(s: int) -> float:
        if s < warmup:
            return warm(s, warmup)
        t = s - warmup
        return min_lr + (LR - min_lr) * (1 + math.cos(math.pi * t / big_t)) / 2

    got = lrs(CosineSchedule(min_lr=min_lr, warmup_steps=warmup), total, n=total + 3)
    assert got[:total] == pytest.approx([expected(s) for s in range(total)])
    assert got[warmup] == pytest.approx(LR)  # the schedule starts at the full lr
    assert got[total:] == pytest.approx([min_lr] * 3)  # held after the run


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear(warmup: int) -> None:
    total, end = 13, 0.2
    big_t = total - warmup
    got = lrs(LinearSchedule(end_factor=end, warmup_steps=warmup), total)
    expected = [
        warm(s, warmup) if s < warmup else LR * (1 - (1 - end) * (s - warmup) / big_t)
        for s in range(total)
    ]
    assert got == pytest.approx(expected)


def test_plateau_reduces_after_patience_and_respects_min_lr() -> None:
    cfg = PlateauSchedule(metric="loss", factor=0.5, patience=1, min_lr=0.1)
    opt, sched = make(cfg, 100)
    seen = []
    for loss in [1.0, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]:
        advance(opt, sched)
        sched.observe({"loss": loss, "accuracy": 0.3})
        seen.append(sched.get_last_lr()[0])
    # best 0.5; two evaluations without improvement (> patience=1) halve the lr, then min_lr
    assert seen == pytest.approx([LR, LR, LR, LR / 2, LR / 2, LR / 4, LR / 4, 0.1, 0.1])


def test_plateau_mode_max_on_another_metric() -> None:
    cfg = PlateauSchedule(metric="accuracy", mode="max", factor=0.1, patience=0)
    _, sched = make(cfg, 100)
    sched.observe({"loss": 9.0, "accuracy": 0.5})
    sched.observe({"loss": 1.0, "accuracy": 0.6})
    assert sched.get_last_lr()[0] == pytest.approx(LR)
    sched.observe({"loss": 0.1, "accuracy": 0.6})  # loss improved, accuracy did not
    assert sched.get_last_lr()[0] == pytest.approx(LR * 0.1)


def test_plateau_warmup_comes_first_and_ignores_evaluations() -> None:
    cfg = PlateauSchedule(factor=0.5, patience=0, warmup_steps=4)
    opt, sched = make(cfg, 100)
    seen = []
    for _ in range(8):
        seen.append(sched.get_last_lr()[0])
        sched.observe({"loss": 1.0})  # never improves: reduces as soon as warmup is over
        advance(opt, sched)
    assert seen[:4] == pytest.approx([warm(s, 4) for s in range(4)])
    # warmup is over at s=4: that observation sets `best`, each later one halves the lr
    assert seen[4:] == pytest.approx([LR, LR, LR / 2, LR / 4])


def test_plateau_missing_metric_names_the_available_ones() -> None:
    _, sched = make(PlateauSchedule(metric="f1"), 10)
    with pytest.raises(ConfigError, match=r"'f1'.*available: accuracy, loss"):
        sched.observe({"loss": 1.0, "accuracy": 0.5})


def test_other_schedules_ignore_observe() -> None:
    _, sched = make(CosineSchedule(), 10)
    sched.observe({})
    assert sched.get_last_lr()[0] == LR


def test_onecycle_start_peak_end() -> None:
    total = 100
    cfg = OneCycleSchedule(max_lr=1.0, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    got = lrs(cfg, total, n=total + 5)
    assert got[0] == pytest.approx(1.0 / 25)
    peak = int(0.3 * total) - 1  # torch: the warmup phase ends at pct_start·total - 1
    assert got[peak] == pytest.approx(1.0)
    assert max(got) == pytest.approx(1.0)
    assert got[total - 1] == pytest.approx(1.0 / 25 / 1e4)
    assert got[total:] == pytest.approx([got[total - 1]] * 5)  # held, no error past the end


def test_onecycle_defaults_to_optimizer_lr_and_keeps_momentum() -> None:
    lin = nn.Linear(2, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01, betas=(0.8, 0.99))
    sched = build_schedule(OneCycleSchedule(), opt, 20)
    for _ in range(5):
        advance(opt, sched)
    assert sched.get_last_lr()[0] == pytest.approx(0.01)  # peak at 0.3*20 - 1 = 5
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)


def test_warmup_must_leave_steps() -> None:
    with pytest.raises(ConfigError, match="warmup_steps=10"):
        make(CosineSchedule(warmup_steps=10), 10)
    with pytest.raises(ConfigError, match="total_steps"):
        make(ConstantSchedule(), 0)
    make(LinearSchedule(warmup_steps=9), 10)  # one step left is enough


CASES = [
    ConstantSchedule(warmup_steps=3),
    StepSchedule(step_size=2, gamma=0.5, warmup_steps=2),
    ExponentialSchedule(gamma=0.8),
    CosineSchedule(min_lr=0.01, warmup_steps=3),
    LinearSchedule(end_factor=0.1),
    PlateauSchedule(factor=0.5, patience=0, warmup_steps=2),
    OneCycleSchedule(),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.name)
def test_state_dict_round_trip_resumes_identically(cfg: object) -> None:
    total, cut = 14, 6
    losses = [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.9, 0.91, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]

    def run(opt: torch.optim.Optimizer, sched: LRSchedule, steps: range) -> list[float]:
        out = []
        for s in steps:
            out.append(sched.get_last_lr()[0])
            advance(opt, sched)
            if s % 2 == 1:
                sched.observe({"loss": losses[s]})
        return out

    opt, sched = make(cfg, total)
    straight = run(opt, sched, range(total))

    opt, sched = make(cfg, total)
    first = run(opt, sched, range(cut))
    buf = io.BytesIO()
    torch.save({"schedule": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["schedule"]

    # a fresh optimizer and schedule, as a resumed run builds them (lrs restored by the schedule)
    opt, sched = make(cfg, total)
    sched.load_state_dict(state)
    assert sched.steps == cut
    resumed = first + run(opt, sched, range(cut, total))
    assert resumed == straight
    if cfg.name not in ("constant", "plateau"):  # type: ignore[attr-defined]
        assert len(set(straight)) > 3  # the run really did change the lr


def test_load_state_dict_refuses_another_schedule() -> None:
    _, cosine = make(CosineSchedule(), 10)
    _, linear = make(LinearSchedule(), 10)
    with pytest.raises(CheckpointError, match="'cosine'"):
        linear.load_state_dict(cosine.state_dict())
