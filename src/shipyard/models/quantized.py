"""Int8 layers swapped into a model in place of `nn.Linear` (swap parts, don't fork the model).

Both keep their state as plain tensors (int8 weights, float scales), so a quantized model is
saved with safetensors and rebuilt without pickle: build the architecture by name, swap the
layers the manifest lists (`replace_module` with an empty layer), then load the tensors.
They live with the models because the package loader (below compress/) rebuilds them.

- `Int8Linear` (scheme "weight-int8"): symmetric per-output-channel int8 weights and fp32 scales,
  dequantized on the fly. 4x smaller weights; compute stays fp32. For GPT-style models.
- `DynamicInt8Linear` (scheme "dynamic-int8"): the same int8 weights run through PyTorch's
  dynamic quantized kernels (`torch.ao.nn.quantized.dynamic.Linear`): activations are quantized
  per batch at run time, the matmul is int8. Smaller and faster for MLPs on CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.errors import ModelError

SCHEMES = ("dynamic-int8", "weight-int8")


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (out, in) fp weight -> int8 (out, in), fp32 scale (out,).

    scale = max|row| / 127, so each row uses the full [-127, 127] range; an all-zero row gets
    scale 1 (any scale represents it exactly).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)  # (out, in)
    return q, scale


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and per-output-channel scales, dequantized per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a trained Linear layer."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_weight_int8(linear.weight)
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fp weight (out, in) these int8 values and scales stand for."""
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (*, in_features) to (*, out_features)."""
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


@contextmanager
def _quiet_quantized_api() -> Iterator[None]:
    # torch.ao.quantization and quantized tensor constructors warn that they are deprecated;
    # they are still PyTorch's CPU int8 kernels, and the warning is not actionable for a user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


class DynamicInt8Linear(nn.Module):
    """`nn.Linear` run by PyTorch's dynamic int8 kernels, stored as plain int8/float tensors.

    The packed weight the kernels need (an opaque object, not a tensor) is built from the
    buffers on first use and again whenever a state dict is loaded, so it never gets saved.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float64))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: Any = None  # a torch.ao dynamic Linear; deliberately not a sub-module
        self.register_load_state_dict_post_hook(_drop_packed)

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_packed":  # keep the packed kernel out of _modules (and the state dict)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        """Quantize a trained Linear layer (symmetric per-channel int8 weights)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_weight_int8(linear.weight)
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale.double())
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _pack(self) -> Any:
        try:
            from torch.ao.nn.quantized.dynamic import Linear as QuantizedDynamicLinear
        except ImportError as exc:  # a future torch without the eager quantized modules
            raise ModelError(
                f"dynamic int8 needs torch.ao's quantized kernels, which torch {torch.__version__}"
                f" does not have ({exc}); use scheme weight-int8"
            ) from None
        with _quiet_quantized_api():
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8, self.weight_scale, self.weight_zero_point, 0
            )
            packed = QuantizedDynamicLinear(
                self.in_features, self.out_features, bias_=self.bias is not None, dtype=torch.qint8
            )
            bias = self.bias.detach().float() if self.bias is not None else None
            packed.set_weight_bias(qweight, bias)
        self._packed = packed
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (*, in_features) to (*, out_features) with int8 weights and activations."""
        packed = self._packed if self._packed is not None else self._pack()
        return packed(x.float())

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DynamicInt8Linear:
        self._packed = None  # .to() / .float() etc. change the buffers: re-pack on next use
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            "int8 weights + dynamic int8 activations"
        )


def _drop_packed(module: nn.Module, incompatible_keys: Any) -> None:
    object.__setattr__(module, "_packed", None)


LAYER_TYPES: dict[str, type[Int8Linear] | type[DynamicInt8Linear]] = {
    "weight-int8": Int8Linear,
    "dynamic-int8": DynamicInt8Linear,
}


def quantizable_linears(model: nn.Module) -> list[str]:
    """Module paths of the Linear layers a quantizer should replace.

    A Linear whose weight is shared with another module (GPT's LM head tied to the token
    embedding) is left in fp32: quantizing it would untie and duplicate the weights.
    """
    counts: dict[int, int] = {}
    for _, module in model.named_modules():
        for param in module.parameters(recurse=False):
            counts[id(param)] = counts.get(id(param), 0) + 1
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and counts.get(id(module.weight), 0) == 1
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the sub-module at dotted path `name` was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
