"""Small convolutional network for images: [Conv -> (BatchNorm) -> act -> MaxPool] x N -> MLP head.

Inputs may arrive as images (B, C, H, W), single-channel images (B, H, W) or flat vectors whose
length is a perfect square (B, s*s), e.g. the 8x8 digits dataset as 64 features.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.activations import ActivationName, make_activation


class CNNConfig(StrictModel):
    """Config of a small image classifier / regressor."""

    name: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16, 32],
        min_length=1,
        description="output channels of each conv layer",
    )
    kernel_size: int = Field(3, gt=0, description="conv kernel size (padding keeps H, W)")
    hidden_size: int = Field(64, gt=0, description="width of the linear layer before the head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the head")
    activation: ActivationName = "relu"
    batch_norm: bool = False


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Interpret a per-example input shape as (C, H, W).

    (C, H, W) is kept, (H, W) becomes (1, H, W), and (n,) with n a perfect square becomes
    (1, s, s) with s*s == n.
    """
    if len(input_shape) == 3:
        c, h, w = input_shape
    elif len(input_shape) == 2:
        c, (h, w) = 1, input_shape
    elif len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ModelError(
                f"cnn got flat inputs of {input_shape[0]} features, which is not a perfect square; "
                "give the input shape as (C, H, W) or (H, W), or use the mlp model"
            )
        c, h, w = 1, side, side
    else:
        raise ModelError(
            f"cnn needs an input shape of (C, H, W), (H, W) or (n,), got {input_shape}"
        )
    if min(c, h, w) <= 0:
        raise ModelError(f"cnn input shape must be positive, got {input_shape}")
    return c, h, w


class CNN(nn.Module):
    """Conv stack + linear head mapping images to (B, out_features)."""

    def __init__(self, config: CNNConfig, input_shape: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        if out_features <= 0:
            raise ModelError(f"cnn needs a positive out_features, got {out_features}")
        self.config = config
        self.image_shape = image_shape(input_shape)
        c, h, w = self.image_shape
        layers: list[nn.Module] = []
        for out_c in config.channels:
            layers.append(nn.Conv2d(c, out_c, config.kernel_size, padding="same"))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(out_c))
            layers.append(make_activation(config.activation))
            # Pool only while there is something to pool, so tiny images (8x8) still work.
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out_c
        self.features = nn.Sequential(*layers)
        self.flat_features = c * h * w
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.flat_features, config.hidden_size),
            make_activation(config.activation),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_size, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x of shape (B, C, H, W), (B, H, W) or (B, C*H*W) to (B, out_features)."""
        c, h, w = self.image_shape
        if math.prod(x.shape[1:]) != c * h * w:
            raise ModelError(
                f"cnn expected examples of shape {(c, h, w)} ({c * h * w} values), got "
                f"{tuple(x.shape[1:])}"
            )
        x = x.reshape(x.size(0), c, h, w)  # (B, C, H, W)
        x = self.features(x)  # (B, C', H', W')
        return self.classifier(x)  # (B, out_features)
