"""Quantizing a trained model: swap its Linear layers for the int8 layers of
`shipyard.models.quantized` (swap parts, don't fork the model).

- "weight-int8" (`Int8Linear`): symmetric per-output-channel int8 weights and fp32 scales,
  dequantized on the fly. 4x smaller weights; compute stays fp32. For GPT-style models.
- "dynamic-int8" (`DynamicInt8Linear`): the same int8 weights run through PyTorch's dynamic
  quantized kernels: activations are quantized per batch at run time, the matmul is int8.
"""

from __future__ import annotations

from torch import nn

from shipyard.compress.errors import CompressError
from shipyard.models.quantized import (
    LAYER_TYPES,
    SCHEMES,
    DynamicInt8Linear,
    Int8Linear,
    quantizable_linears,
    quantize_weight_int8,
    replace_module,
)

__all__ = [
    "LAYER_TYPES",
    "SCHEMES",
    "DynamicInt8Linear",
    "Int8Linear",
    "quantizable_linears",
    "quantize_linears",
    "quantize_weight_int8",
]


def quantize_linears(model: nn.Module, scheme: str, layers: list[str] | None = None) -> list[str]:
    """Replace Linear layers of `model` (in place) by int8 ones of `scheme`; return their paths."""
    if scheme not in LAYER_TYPES:
        raise CompressError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    names = quantizable_linears(model) if layers is None else layers
    if not names:
        raise CompressError("the model has no Linear layers to quantize")
    kind = LAYER_TYPES[scheme]
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CompressError(f"{name} is a {type(linear).__name__}, not a Linear layer")
        replace_module(model, name, kind.from_linear(linear))
    return names
