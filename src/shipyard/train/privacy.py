"""Differentially private training (DP-SGD) with Opacus: per-example clipping, noise, accounting.

`PrivateTraining` swaps parts into the ordinary training loop: the model runs inside Opacus'
`GradSampleModule` (per-example gradients), the optimizer inside its `DPOptimizer` (clip each
example's gradient, sum, add Gaussian noise), the loop draws Poisson-sampled batches (each row
joins a step with probability q = batch_size / rows, what the accountant assumes), and an Opacus
accountant turns (noise multiplier, q, steps) into the spent ε at the configured δ.

Scaling: the loop's loss is the per-example loss summed and divided by the *expected* batch size
B (times tokens per row for language models), so per-example gradients arrive divided by B.
Clipping those at max_grad_norm / B and adding noise of std noise_multiplier x max_grad_norm / B
is exactly clipping the per-example gradients at max_grad_norm and averaging the noisy sum over
B: standard DP-SGD.

Opacus is an optional dependency (`pip install shipyard[privacy]`), imported here only.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from shipyard.config import PrivacyConfig
from shipyard.errors import TrainError


def _opacus() -> Any:
    """The opacus package, or a TrainError naming the extra to install."""
    try:
        import opacus
        import opacus.accountants
        import opacus.accountants.utils
        import opacus.layers
        import opacus.optimizers
        import opacus.validators
    except ImportError:
        raise TrainError("train.privacy needs Opacus: pip install 'shipyard[privacy]'") from None
    return opacus


@dataclass
class PrivacySpent:
    """What a private run spent: (epsilon, delta) and how it got there."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_private_model(model: nn.Module) -> nn.Module:
    """`model` with nn.LSTM / nn.GRU swapped for Opacus' DPLSTM / DPGRU (same parameter names,
    so checkpoints and packages load into the plain model); TrainError for layers Opacus cannot
    give per-example gradients for (e.g. BatchNorm, which mixes the examples of a batch)."""
    opacus = _opacus()
    replacements = {nn.LSTM: opacus.layers.DPLSTM, nn.GRU: opacus.layers.DPGRU}
    for name, module in list(model.named_modules()):
        cls = replacements.get(type(module))
        if cls is None:
            continue
        assert isinstance(module, nn.RNNBase)
        new = cls(
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        new.load_state_dict(module.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new.to(_device(module)))
    model.register_state_dict_post_hook(_drop_internal_names)
    errors = opacus.validators.ModuleValidator.validate(model, strict=False)
    if errors:
        raise TrainError(
            "train.privacy: Opacus cannot compute per-example gradients for this model: "
            f"{errors[0]} (use a model without BatchNorm, e.g. model.norm none or layer)"
        )
    return model


def _drop_internal_names(
    model: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    # DPLSTM/DPGRU list each weight under nn.LSTM's name and their own. Opacus drops its own
    # names with a legacy hook whose result a parent module ignores, so drop them here, at the
    # root: checkpoints and packages then hold nn.LSTM/nn.GRU names only.
    for name, module in model.named_modules():
        for old in getattr(module, "old_to_new", {}):
            state.pop(f"{prefix}{name}.{old}" if name else f"{prefix}{old}", None)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


class PrivateTraining:
    """The DP-SGD parts of one run: wrapped model and optimizer, sampling and the accountant."""

    def __init__(
        self,
        config: PrivacyConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        n_train: int,
        batch_size: int,
        total_steps: int,
    ) -> None:
        opacus = _opacus()
        if config.delta >= 1.0 / n_train:
            raise TrainError(
                f"train.privacy.delta {config.delta:g} is not below 1 / train rows "
                f"(1/{n_train} = {1.0 / n_train:.3g}); such a δ allows leaking a whole example; "
                "lower train.privacy.delta"
            )
        self.config = config
        self.batch_size = batch_size
        self.sample_rate = batch_size / n_train
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            assert config.target_epsilon is not None
            try:
                self.noise_multiplier = float(
                    opacus.accountants.utils.get_noise_multiplier(
                        target_epsilon=config.target_epsilon,
                        target_delta=config.delta,
                        sample_rate=self.sample_rate,
                        steps=total_steps,
                        accountant=config.accountant,
                    )
                )
            except ValueError as exc:
                raise TrainError(
                    f"train.privacy.target_epsilon {config.target_epsilon:g} cannot be reached "
                    f"in {total_steps} steps at sample rate {self.sample_rate:.3g} ({exc}); "
                    "raise the target, train fewer steps or use a smaller batch"
                ) from None
        # Opacus' hooks fire on layers whose inputs need no gradient (the first layer); harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.module = opacus.GradSampleModule(model, loss_reduction="sum")
        self.optimizer = opacus.optimizers.DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=config.max_grad_norm / batch_size,
            expected_batch_size=batch_size,
            loss_reduction="sum",
        )
        self.accountant = opacus.accountants.create_accountant(config.accountant)
        self._params = [p for p in model.parameters() if p.requires_grad]

    def poisson_rows(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Rows of one step: each of the n rows independently with probability sample_rate."""
        return torch.nonzero(torch.rand(n, generator=generator) < self.sample_rate).flatten()

    def empty_step(self) -> None:
        """Prepare a step whose Poisson batch is empty: no per-example gradients, noise only."""
        for p in self._params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]

    def after_step(self) -> None:
        """Account for one optimizer step."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def spent(self) -> PrivacySpent:
        """ε spent so far at the configured δ (0 steps: 0)."""
        steps = sum(int(h[2]) for h in self.accountant.history)
        epsilon = float(self.accountant.get_epsilon(delta=self.config.delta)) if steps else 0.0
        return PrivacySpent(
            epsilon=epsilon,
            delta=self.config.delta,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=steps,
            accountant=self.config.accountant,
        )

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history (plain numbers), for checkpoints."""
        return {"history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.history = [tuple(h) for h in state.get("history", [])]
