"""Int8 layers swapped into a model in place of `nn.Linear` (swap parts, don't fork the model).

Both keep their state as plain tensors (int8 weights, float scales), so a quantized model is
saved with safetensors and rebuilt without pickle: build the architecture by name, swap the
layers the manifest lists (`replace_module` with an empty layer), then load the tensors.
They live with the models because the package loader (below compress/) rebuilds them.

- `Int8Linear` (scheme "weight-int8"): symmetric per-output-channel int8 weights and fp32 scales.
  4x smaller weights. How it multiplies is its *kernel* (`set_kernel`, chosen by the generation
  engine from the CPU's features): "dequantize" (default: rebuild the fp32 weight per call, so
  training, export and GPU use see plain fp32 math), "dequantized" (fp32 weight rebuilt once and
  cached: same numbers, no per-call cost), "int8-gemm" (PyTorch's x86 int8 GEMM, fbgemm with
  AVX2 / AVX-512 / VNNI: activations quantized per call to 8 bits, int32 accumulation, see
  `int8_gemm_available`) or "native" (the CPU decode path: shipyard's own int8 x int8 kernel,
  `shipyard.kernels`: each row's activations quantized to 8 bits with the row's own scale,
  products summed exactly in int32, so a row's result does not depend on the rest of the
  batch; ~1.1-1.9x the int8 GEMM's speed at 1-8 rows on a 384-wide GPT) for up to
  `NATIVE_INT8_MAX_ROWS` rows; more rows go to "int8-gemm" when there is one (as fast or
  faster there: its AVX2 inner step is one instruction shorter, with 7-bit activations).
- `DynamicInt8Linear` (scheme "dynamic-int8"): the same int8 weights run through PyTorch's
  dynamic quantized kernels (`torch.ao.nn.quantized.dynamic.Linear`): activations are quantized
  per batch at run time, the matmul is int8. Smaller and faster for MLPs on CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.errors import ModelError
from shipyard.kernels import DISABLE_ENV, kernel_disabled
from shipyard.kernels import native as native_kernels

SCHEMES = ("dynamic-int8", "weight-int8")
INT8_KERNELS = ("dequantize", "dequantized", "int8-gemm", "native")
NATIVE_INT8_MAX_ROWS = 8
"""Rows up to which the "native" kernel multiplies (more go to the int8 GEMM where there is one)."""


_INT8_GEMM_PROBE: list[bool] = []  # memo of the one-time probe below


def int8_gemm_available() -> bool:
    """True when PyTorch's x86 int8 GEMM (`quantized::linear_dynamic`) runs on this machine.

    Probed once by running a tiny layer (a build without fbgemm, or a CPU it does not support,
    raises there); $SHIPYARD_DISABLE_KERNELS=int8-gemm forces False.
    """
    if kernel_disabled("int8-gemm"):
        return False
    if not _INT8_GEMM_PROBE:
        ok = False
        engines = torch.backends.quantized.supported_engines
        if "x86" in engines or "fbgemm" in engines:
            try:
                layer = Int8Linear(4, 2)
                layer.weight_int8.fill_(1)
                packed = _prepack_int8(layer)
                with torch.inference_mode():
                    out = torch.ops.quantized.linear_dynamic(torch.ones(1, 4), packed, True)
                ok = bool(torch.allclose(out, torch.full((1, 2), 4.0), atol=0.1))
            except (RuntimeError, AttributeError, NotImplementedError):
                ok = False
        _INT8_GEMM_PROBE.append(ok)
    return _INT8_GEMM_PROBE[0]


def _prepack_int8(layer: Int8Linear) -> Any:
    """The opaque packed weight `quantized::linear_dynamic` takes (per-channel int8, fp32 bias)."""
    with _quiet_quantized_api():
        qweight = torch._make_per_channel_quantized_tensor(
            layer.weight_int8.cpu(),
            layer.weight_scale.detach().cpu().double(),
            torch.zeros(layer.out_features, dtype=torch.int64),
            0,
        )
        bias = layer.bias.detach().float().cpu() if layer.bias is not None else None
        return torch.ops.quantized.linear_prepack(qweight, bias)


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
    """`nn.Linear` with int8 weights and per-output-channel scales (kernel: see `set_kernel`)."""

    # "dequantize" | "dequantized" | "int8-gemm" | "native"; and what that kernel caches (never
    # saved: a packed weight, or the dequantized one; "native": the int8 GEMM's in _fallback)
    _kernel: str = "dequantize"
    _cache: Any = None
    _fallback: Any = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_load_state_dict_post_hook(_drop_cache)

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __getstate__(self) -> dict[str, Any]:
        # a packed int8 weight is an opaque object: a copy rebuilds it on first use
        state = dict(super().__getstate__())
        state.pop("_cache", None)
        state.pop("_fallback", None)
        return state

    @property
    def kernel(self) -> str:
        """The kernel inference runs with (see `set_kernel`)."""
        return self._kernel

    def set_kernel(self, kernel: str) -> None:
        """Choose how inference multiplies: "dequantize", "dequantized", "int8-gemm" or "native".

        Training, autograd and non-CPU inputs always use "dequantize". Raises ModelError for an
        unknown name, "int8-gemm" where `int8_gemm_available()` is False, or "native" where
        `shipyard.kernels.native.load()` is.
        """
        if kernel not in INT8_KERNELS:
            raise ModelError(
                f"unknown int8 kernel {kernel!r}; choose one of {', '.join(INT8_KERNELS)}"
            )
        if kernel == "int8-gemm" and not int8_gemm_available():
            raise ModelError(
                "int8-gemm is not available here (no x86/fbgemm quantized engine, or disabled"
                f" by ${DISABLE_ENV}); use kernel 'dequantized'"
            )
        if kernel == "native" and not native_kernels.load():
            why = native_kernels.native_unavailable() or "they failed to build or load (logged)"
            raise ModelError(
                f"the native int8 kernel is not available here: {why}; use kernel 'dequantized'"
            )
        if kernel != self._kernel:  # same kernel: keep its packed weight (no repacking)
            self._kernel = kernel
            self._cache = self._fallback = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a trained Linear layer."""
        return _quantize_linear(cls, linear)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fp weight (out, in) these int8 values and scales stand for."""
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (*, in_features) to (*, out_features)."""
        kernel = self._kernel
        if (
            kernel == "dequantize"
            or self.training
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self._bias_needs_grad()))
        ):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        cache = self._cache
        if cache is None:
            with torch.no_grad():
                if kernel == "native":
                    cache = native_kernels.pack_int8(self.weight_int8)
                    # the traced step finds the int8 GEMM's packed weight as a module attribute
                    self._fallback = _prepack_int8(self) if int8_gemm_available() else None
                elif kernel == "int8-gemm":
                    cache = _prepack_int8(self)
                else:
                    cache = self.dequantized_weight()
            self._cache = cache
        if kernel == "native":
            out = torch.ops.shipyard.linear_i8(
                x.float(),
                cache,
                self.weight_scale,
                self.bias,
                self.in_features,
                self._fallback,
                NATIVE_INT8_MAX_ROWS,
            )
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        if kernel == "int8-gemm":
            # reduce_range: 7-bit activations, so AVX2's u8 x s8 pair sums cannot saturate
            out = torch.ops.quantized.linear_dynamic(x.float(), cache, True)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        return F.linear(x, cache.to(x.dtype), self.bias)

    def _bias_needs_grad(self) -> bool:
        return self.bias is not None and self.bias.requires_grad

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Int8Linear:
        self._cache = self._fallback = None  # .to() / .float() change the buffers: rebuild
        return super()._apply(fn, recurse)

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
        return _quantize_linear(cls, linear)

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


_Int8T = TypeVar("_Int8T", "Int8Linear", "DynamicInt8Linear")


def _quantize_linear(cls: type[_Int8T], linear: nn.Linear) -> _Int8T:
    """A `cls` layer holding `linear`'s weights as symmetric per-output-channel int8 (scales in
    the layer's own dtype: fp32, or fp64 for the torch.ao kernels) and its bias."""
    layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
    q, scale = quantize_weight_int8(linear.weight)
    layer.weight_int8.copy_(q)
    layer.weight_scale.copy_(scale)
    if linear.bias is not None and layer.bias is not None:
        layer.bias.data.copy_(linear.bias.detach())
    return layer


def _drop_packed(module: nn.Module, incompatible_keys: Any) -> None:
    object.__setattr__(module, "_packed", None)


def _drop_cache(module: nn.Module, incompatible_keys: Any) -> None:
    object.__setattr__(module, "_cache", None)
    object.__setattr__(module, "_fallback", None)


LAYER_TYPES: dict[str, type[Int8Linear] | type[DynamicInt8Linear]] = {
    "weight-int8": Int8Linear,
    "dynamic-int8": DynamicInt8Linear,
}


def quantizable_linears(model: nn.Module) -> list[str]:
    """Module paths of the Linear layers a quantizer should replace.

    A Linear whose weight is shared with another module (GPT's LM head tied to the token
    embedding) is left in fp32: quantizing it would untie and duplicate the weights.
    """
    shared = shared_parameters(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) not in shared
    ]


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied weights)."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules():
        for param in module.parameters(recurse=False):
            counts[id(param)] = counts.get(id(param), 0) + 1
    return {pid for pid, n in counts.items() if n > 1}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the sub-module at dotted path `name` was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
