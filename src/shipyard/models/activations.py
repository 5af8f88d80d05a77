"""Activation functions selectable by name from a model config (shared by the MLP and the CNN)."""

from __future__ import annotations

from typing import Literal

from torch import nn

ActivationName = Literal["relu", "gelu", "tanh", "sigmoid", "silu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}


def make_activation(name: ActivationName) -> nn.Module:
    """Return a fresh activation module for a config name such as `"relu"`."""
    return _ACTIVATIONS[name]()
