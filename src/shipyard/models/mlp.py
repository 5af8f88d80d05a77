"""Multi-layer perceptron: flatten, then [Linear -> norm -> activation -> dropout] x N, then a head.

With `hidden_sizes=[]` it is a single linear layer (linear / logistic regression).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.activations import ActivationName, make_activation


class MLPConfig(StrictModel):
    """Config of a fully connected network for tabular (or any flattened) inputs."""

    name: Literal["mlp"] = "mlp"
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [128, 64], description="width of each hidden layer; [] = linear"
    )
    activation: ActivationName = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    norm: Literal["none", "batch", "layer"] = Field(
        "none", description="normalisation after each hidden linear layer"
    )


class MLP(nn.Module):
    """Fully connected network mapping (B, *) inputs to (B, out_features)."""

    def __init__(self, config: MLPConfig, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ModelError(
                f"mlp needs positive in_features and out_features, got {in_features} and "
                f"{out_features}"
            )
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        layers: list[nn.Module] = []
        width = in_features
        for hidden in config.hidden_sizes:
            layers.append(nn.Linear(width, hidden))
            if config.norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            elif config.norm == "layer":
                layers.append(nn.LayerNorm(hidden))
            layers.append(make_activation(config.activation))
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x of shape (B, *) with prod(*) == in_features to (B, out_features)."""
        x = x.reshape(x.size(0), -1)  # (B, in_features)
        if x.size(1) != self.in_features:
            raise ModelError(
                f"mlp expected {self.in_features} features per example, got {x.size(1)}; "
                "check the input shape the model was built with"
            )
        return self.head(self.body(x))  # (B, out_features)
