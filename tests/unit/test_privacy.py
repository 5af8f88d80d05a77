"""train.privacy: DP-SGD against a hand computation, the accountant's ε, errors, real runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant

from shipyard.config import PrivacyConfig, load_config
from shipyard.errors import ConfigError, TrainError
from shipyard.package import load_package
from shipyard.train import fit
from shipyard.train.privacy import PrivateTraining, make_private_model


def digits_config(**train: Any) -> dict[str, Any]:
    return {
        "name": "dp-digits",
        "seed": 1,
        "task": "classification",
        "data": {"source": "builtin:digits"},
        "model": {"name": "mlp", "hidden_sizes": [32]},
        "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
        "train": {"epochs": None, "max_steps": 40, "batch_size": 64, **train},
        "eval": {"every_steps": 20},
    }


# --- DP-SGD step against a hand computation ----------------------------------------------------


def private_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip: float, noise: float
) -> PrivateTraining:
    """One step as the trainer does it: summed loss over the expected batch size, then DP-SGD."""
    B = len(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateTraining(
        PrivacyConfig(noise_multiplier=noise, max_grad_norm=clip, delta=1e-5),
        model,
        optimizer,
        n_train=1000,
        batch_size=B,
        total_steps=1,
    )
    loss = ((private.module(x) - y) ** 2).sum() / B
    loss.backward()
    private.optimizer.pre_step()  # clip, sum, add noise: p.grad is the private gradient
    return private


def hand_clipped_mean(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> list[torch.Tensor]:
    """Per-example gradients one backward pass at a time, each clipped to `clip`, averaged."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        assert float(norm) * factor <= clip + 1e-6  # the bound holds per example
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return [t / len(x) for t in total]


def test_clipping_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(6, 3) * torch.tensor([[0.1], [1], [5], [0.2], [3], [10]])  # some get clipped
    y = torch.randn(6, 2)
    want = hand_clipped_mean(model, x, y, clip=1.0)
    # zero noise isolates the clipping (the config needs a positive multiplier; set it after)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateTraining(
        PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5),
        model,
        optimizer,
        n_train=1000,
        batch_size=6,
        total_steps=1,
    )
    private.optimizer.noise_multiplier = 0.0
    (((private.module(x) - y) ** 2).sum() / 6).backward()
    private.optimizer.pre_step()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_noise_has_std_multiplier_times_clip_over_batch() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 50)
    x, y = torch.randn(8, 100), torch.randn(8, 50)
    clean = hand_clipped_mean(model, x, y, clip=0.5)
    private_step(model, x, y, clip=0.5, noise=2.0)
    noise = torch.cat(
        [(p.grad - c).flatten() for p, c in zip(model.parameters(), clean, strict=True)]
    )  # type: ignore[operator]
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.05)


def test_an_empty_poisson_batch_still_adds_the_noise() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 50)
    private = PrivateTraining(
        PrivacyConfig(noise_multiplier=2.0, max_grad_norm=0.5, delta=1e-5),
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        n_train=1000,
        batch_size=8,
        total_steps=1,
    )
    private.empty_step()
    private.optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.05)


def test_batchnorm_is_refused_and_recurrent_layers_are_swapped() -> None:
    with pytest.raises(TrainError, match="BatchNorm"):
        make_private_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    lstm = torch.nn.Sequential(torch.nn.LSTM(3, 4, batch_first=True))
    names = list(lstm.state_dict())
    private = make_private_model(lstm)
    assert type(private[0]).__name__ == "DPLSTM"
    assert sorted(private.state_dict()) == sorted(names)  # checkpoints keep nn.LSTM names


# --- real runs: ε from the accountant, lineage ---------------------------------------------------


def test_private_run_reports_the_accountants_epsilon_and_a_plain_run_none(tmp_path: Path) -> None:
    cfg = digits_config(privacy={"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-4})
    result = fit(load_config(cfg), run_dir=tmp_path / "dp")
    spent = result.summary["privacy"]
    n_train = 1437  # 80% of the 1797 digits
    accountant = RDPAccountant()
    accountant.history = [(1.1, 64 / n_train, 40)]
    assert spent["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-4))
    assert spent["steps"] == 40 and spent["sample_rate"] == pytest.approx(64 / n_train)
    assert result.metrics["test"]["accuracy"] > 0.6  # it learns despite the noise
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["run"]["privacy"] == spent
    assert load_package(result.run_dir / "package").manifest.lineage.privacy == spent  # type: ignore[attr-defined]

    plain = fit(load_config(digits_config(max_steps=2)), run_dir=tmp_path / "plain")
    assert "privacy" not in plain.summary
    manifest = json.loads((plain.run_dir / "package" / "manifest.json").read_text())
    assert "privacy" not in manifest["lineage"]


def test_target_epsilon_is_met(tmp_path: Path) -> None:
    cfg = digits_config(max_steps=10, privacy={"target_epsilon": 2.0, "delta": 1e-4})
    spent = fit(load_config(cfg), run_dir=tmp_path / "run").summary["privacy"]
    assert 1.8 <= spent["epsilon"] <= 2.0
    assert spent["noise_multiplier"] > 0


def test_resume_continues_the_accounting(tmp_path: Path) -> None:
    privacy = {"noise_multiplier": 1.0}
    full = fit(load_config(digits_config(max_steps=6, privacy=privacy)), run_dir=tmp_path / "a")
    cfg = digits_config(max_steps=3, privacy=privacy)
    cfg["train"]["checkpoint"] = {"every_steps": 3}
    fit(load_config(cfg), run_dir=tmp_path / "b")
    resumed = fit(
        load_config(digits_config(max_steps=6, privacy=privacy)),
        run_dir=tmp_path / "b",
        resume="auto",
    )
    assert resumed.summary["privacy"]["steps"] == 6
    assert resumed.summary["privacy"]["epsilon"] == full.summary["privacy"]["epsilon"]


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("privacy", "other", "needle"),
    [
        ({}, {}, "exactly one of train.privacy.noise_multiplier or train.privacy.target_epsilon"),
        ({"noise_multiplier": 1, "target_epsilon": 3}, {}, "exactly one of"),
        ({"noise_multiplier": 0}, {}, "noise_multiplier"),
        ({"noise_multiplier": 1, "epsilon": 3}, {}, "unknown key 'train.privacy.epsilon'"),
        ({"noise_multiplier": 1}, {"regularization": {"grad_clip_norm": 1}}, "grad_clip_norm"),
        ({"noise_multiplier": 1}, {"regularization": {"l2": 0.1}}, "optim.weight_decay"),
        ({"noise_multiplier": 1}, {"optim": {"name": "gd"}}, "optim gd"),
    ],
)
def test_config_errors(privacy: Any, other: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({**digits_config(privacy=privacy), **other})
    assert needle in str(info.value)


def test_run_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TrainError, match=r"delta 0.01 is not below 1 / train rows"):
        fit(load_config(digits_config(privacy={"noise_multiplier": 1, "delta": 0.01})))
    with pytest.raises(TrainError, match="cannot be reached"):
        cfg = digits_config(batch_size=1000, max_steps=500, privacy={"target_epsilon": 1e-3})
        fit(load_config(cfg), run_dir=tmp_path / "r1")
    cfg = digits_config(privacy={"noise_multiplier": 1})
    cfg["model"]["norm"] = "batch"
    with pytest.raises(TrainError, match="BatchNorm"):
        fit(load_config(cfg), run_dir=tmp_path / "r2")
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if not installed
    with pytest.raises(TrainError, match=r"pip install 'shipyard\[privacy\]'"):
        fit(load_config(digits_config(privacy={"noise_multiplier": 1})), run_dir=tmp_path / "r3")
