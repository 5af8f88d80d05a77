"""Learning-rate schedules from config, behind one small interface for the trainer.

Steps are optimizer steps counted from 0; "the lr at step s" is the lr used for update s. With
`warmup_steps = W > 0`, updates s < W use lr·(s+1)/W, then the schedule runs with its own step
counter t = s - W (T = total_steps - W):

    constant     lr
    step         lr·gamma^floor(t/step_size)
    exponential  lr·gamma^t
    cosine       min_lr + (lr - min_lr)·(1 + cos(π·t/T))/2
    linear       lr·(1 - (1 - end_factor)·t/T)
    plateau      torch ReduceLROnPlateau on a validation metric (fed by `observe`)
    onecycle     torch OneCycleLR (its own warmup; `warmup_steps` does not apply)

Cosine and linear hold their final value if stepped past total_steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from shipyard.config import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    OneCycleSchedule,
    PlateauSchedule,
    ScheduleConfig,
    StepSchedule,
)
from shipyard.errors import CheckpointError, ConfigError

_STATE_VERSION = 1


class LRSchedule:
    """One interface over torch lr schedulers.

    Call `step()` after every optimizer step and `observe(metrics)` after every validation.
    `state_dict()` holds only numbers, strings, lists and dicts, so it loads with
    `torch.load(..., weights_only=True)`.
    """

    def __init__(self, cfg: ScheduleConfig, optimizer: Optimizer, total_steps: int) -> None:
        warmup = 0 if isinstance(cfg, OneCycleSchedule) else cfg.warmup_steps
        _check_length(cfg.name, total_steps, warmup)
        self.name: str = cfg.name
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup
        self.steps = 0  # optimizer steps taken so far = index of the next update
        self._per_step: LRScheduler | None = None
        self._plateau: ReduceLROnPlateau | None = None
        self._metric: str | None = None
        if isinstance(cfg, OneCycleSchedule):
            max_lr = (
                cfg.max_lr if cfg.max_lr is not None else [g["lr"] for g in optimizer.param_groups]
            )
            # cycle_momentum=False keeps the optimizer's own momentum/betas and works with every
            # optimizer (torch would otherwise overwrite them, and refuse Adagrad or plain SGD).
            self._per_step = OneCycleLR(
                optimizer,
                max_lr=max_lr,
                total_steps=total_steps,
                pct_start=cfg.pct_start,
                div_factor=cfg.div_factor,
                final_div_factor=cfg.final_div_factor,
                anneal_strategy=cfg.anneal_strategy,
                cycle_momentum=False,
            )
        elif isinstance(cfg, PlateauSchedule):
            if warmup:
                self._per_step = LambdaLR(optimizer, _with_warmup(_constant, warmup))
            self._plateau = ReduceLROnPlateau(
                optimizer,
                mode=cfg.mode,
                factor=cfg.factor,
                patience=cfg.patience,
                threshold=cfg.threshold,
                min_lr=cfg.min_lr,
            )
            self._metric = cfg.metric
        else:
            span = total_steps - warmup
            factors = [
                _with_warmup(_closed_form(cfg, span, g.get("initial_lr", g["lr"])), warmup)
                for g in optimizer.param_groups
            ]
            self._per_step = LambdaLR(optimizer, factors)

    def step(self) -> None:
        """Advance by one optimizer step (call after `optimizer.step()`)."""
        self.steps += 1
        if self._per_step is None:
            return
        if isinstance(self._per_step, OneCycleLR) and self.steps >= self.total_steps:
            return  # past the cycle: hold the final lr instead of torch's error
        if self._plateau is not None and self.steps > self.warmup_steps:
            return  # warmup is over: the plateau scheduler owns the lr now
        self._per_step.step()

    def observe(self, metrics: Mapping[str, float]) -> None:
        """Feed validation metrics (only plateau uses them; ignored during its warmup)."""
        if self._plateau is None or self._metric is None:
            return
        if self._metric not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            raise ConfigError(
                f"schedule.metric {self._metric!r} is not among the validation metrics "
                f"(available: {available}); set schedule.metric to one of them"
            )
        if self.steps < self.warmup_steps:
            return
        self._plateau.step(float(metrics[self._metric]))

    def get_last_lr(self) -> list[float]:
        """The lr of each parameter group for the next update."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (numbers, strings, lists, dicts): safe for weights_only loading."""
        return {
            "version": _STATE_VERSION,
            "name": self.name,
            "steps": self.steps,
            "lrs": self.get_last_lr(),
            "per_step": self._per_step.state_dict() if self._per_step is not None else None,
            "plateau": self._plateau.state_dict() if self._plateau is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from `state_dict()`; the optimizer lrs are restored too."""
        if state.get("name") != self.name:
            raise CheckpointError(
                f"the checkpoint's lr schedule is {state.get('name')!r} but the config says "
                f"{self.name!r}; resume with the same schedule.name"
            )
        lrs = list(state["lrs"])
        if len(lrs) != len(self.optimizer.param_groups):
            raise CheckpointError(
                f"the checkpoint's lr schedule has {len(lrs)} parameter groups, the optimizer "
                f"{len(self.optimizer.param_groups)}; resume with the same model and optim config"
            )
        self.steps = int(state["steps"])
        if self._per_step is not None and state["per_step"] is not None:
            self._per_step.load_state_dict(dict(state["per_step"]))
        if self._plateau is not None and state["plateau"] is not None:
            self._plateau.load_state_dict(dict(state["plateau"]))
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr


def build_schedule(cfg: ScheduleConfig, optimizer: Optimizer, total_steps: int) -> LRSchedule:
    """Build the lr schedule named by `cfg` for a run of `total_steps` optimizer steps."""
    return LRSchedule(cfg, optimizer, total_steps)


def _check_length(name: str, total_steps: int, warmup: int) -> None:
    if total_steps < 1:
        raise ConfigError(f"schedule {name!r} needs total_steps >= 1, got {total_steps}")
    if warmup and total_steps <= warmup:
        raise ConfigError(
            f"schedule.warmup_steps={warmup} leaves no steps for schedule {name!r}: the run has "
            f"only {total_steps} optimizer steps; lower schedule.warmup_steps or train longer"
        )


# Factors are closures (plain functions), so LambdaLR's state_dict stores None for them and no
# code is pickled.


def _constant(t: int) -> float:
    return 1.0


def _with_warmup(factor: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    if warmup == 0:
        return factor

    def warmed(s: int) -> float:
        return (s + 1) / warmup if s < warmup else factor(s - warmup)

    return warmed


def _closed_form(cfg: ScheduleConfig, span: int, base_lr: float) -> Callable[[int], float]:
    """Multiplicative factor of `base_lr` at schedule step t (t counts from the end of warmup)."""
    if isinstance(cfg, ConstantSchedule):
        return _constant
    if isinstance(cfg, StepSchedule):
        step_size, gamma = cfg.step_size, cfg.gamma

        def stepped(t: int) -> float:
            return float(gamma ** (t // step_size))

        return stepped
    if isinstance(cfg, ExponentialSchedule):
        exp_gamma = cfg.gamma

        def exponential(t: int) -> float:
            return float(exp_gamma**t)

        return exponential
    if isinstance(cfg, CosineSchedule):
        min_ratio = min(cfg.min_lr / base_lr, 1.0)  # min_lr is absolute, LambdaLR multiplies

        def cosine(t: int) -> float:
            t = min(t, span)
            return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t / span)) / 2.0

        return cosine
    if isinstance(cfg, LinearSchedule):
        end_factor = cfg.end_factor

        def linear(t: int) -> float:
            t = min(t, span)
            return 1.0 - (1.0 - end_factor) * t / span

        return linear
    raise ConfigError(
        f"schedule.name {cfg.name!r} is not a closed-form schedule"
    )  # pragma: no cover
