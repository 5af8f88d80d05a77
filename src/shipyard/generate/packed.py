"""Linear layers whose weights are prepacked for the CPU decode hot path, same parameters.

Decoding is a stream of tiny matmuls (one row per sequence) against every weight of the model.
`F.linear` hands them to MKL's sgemm, which repacks the whole weight on every call. With the
weight packed once, by blocks of 16 output features, shipyard's native kernel
(`shipyard.kernels`, AVX2/FMA, built on first use) streams each weight once per call: on a
6-layer, 384-wide GPT (2-core AMD EPYC, AVX2, one thread) its 24 projections take ~3.3 ms per
token at one row against ~6.5 ms for `F.linear`, and ~8 ms against ~14 ms at 16 rows. Past
`NATIVE_MAX_ROWS` rows (a long prompt, a large product) `F.linear` is as fast and takes over.
Where the native kernels cannot run (no AVX2, no compiler, $SHIPYARD_DISABLE_KERNELS=native)
the layer runs oneDNN with its weight packed once (what `torch.compile` freezing does).
`benchmarks/generate_throughput.py` measures the effect end to end.

`prepare_decoding` picks every layer's kernel for generation (fp32 native or oneDNN, int8
native or int8 GEMM) by what the CPU and this PyTorch build offer;
$SHIPYARD_DISABLE_KERNELS=native,onednn,int8-gemm forces fallbacks.

`pack_linears` swaps the class of a model's `nn.Linear` layers in place (swap parts, don't fork
the model): parameters, hooks and `state_dict` are untouched, and a `PackedLinear` runs plain
`F.linear` whenever packing does not apply (training, autograd, autocast, GPU, not float32), so
training or exporting the same model afterwards is unaffected. The packed copy is rebuilt when
the weight changes (an optimizer step, `load_state_dict`). The results equal `F.linear`'s up to
float32 rounding (summation order); each row's result does not depend on the other rows.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.errors import GenerationError
from shipyard.kernels import cpu_flags, kernel_disabled
from shipyard.kernels import native as native_kernels
from shipyard.models.attention import NativeKernels
from shipyard.models.quantized import (
    Int8Linear,
    int8_gemm_available,
    quantizable_linears,
    replace_module,
)

NATIVE_MAX_ROWS = 32
"""Rows up to which a `PackedLinear` runs the native kernel (more: `F.linear`, as fast there)."""


def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN and its prepacked linear ops (x86/ARM CPU builds)."""
    return (
        not kernel_disabled("onednn")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """`nn.Linear` that runs inference on CPU with a cached, prepacked weight: the native kernel
    where it loaded (`native`, set by `pack_linears`), else oneDNN."""

    native: bool = False
    # (weight version, weight storage address, packed weight); not a buffer: never saved
    _packed_cache: tuple[int, int, torch.Tensor] | None = None

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        # inference tensors keep no version counter: for them only a new storage repacks
        key = (-1 if w.is_inference() else w._version, w.data_ptr())
        cache = self._packed_cache
        if cache is None or cache[:2] != key:
            with torch.no_grad():  # a packed copy never needs autograd
                if self.native:
                    packed = native_kernels.pack_weight(w)
                else:
                    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_cache = cache = (*key, packed)
        return cache[2]

    def __getstate__(self) -> dict[str, Any]:
        # an opaque oneDNN tensor cannot be copied or pickled; the copy repacks on first use
        state = dict(super().__getstate__())
        state.pop("_packed_cache", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., in_features) to (..., out_features); oneDNN when it applies, else F.linear."""
        w = self.weight
        if (
            self.training
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, w, self.bias)
        if self.native:
            # traced: the operator itself sends more than NATIVE_MAX_ROWS rows to F.linear
            if torch.jit.is_tracing() or x.numel() <= NATIVE_MAX_ROWS * x.size(-1):
                return torch.ops.shipyard.linear_f32(
                    x, w, self._packed_weight(), self.bias, NATIVE_MAX_ROWS
                )
            return F.linear(x, w, self.bias)
        if torch.jit.is_tracing():  # a trace cannot hold oneDNN's opaque packed weight
            return F.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(
            x, self._packed_weight(), self.bias, "none", [], ""
        )


def pack_linears(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` of `model` into a `PackedLinear` in place; return how many.

    Native kernels where they load, else oneDNN; does nothing without either. Layers of other
    types (int8, subclasses) are left alone.
    """
    native = native_kernels.load()
    if not native and not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            count += 1
        if type(module) is PackedLinear and module.native != native:
            module.native = native  # the instance's own flag; the packed copy is rebuilt
            module._packed_cache = None
    return count


DECODE_WEIGHTS = ("auto", "fp32", "int8")


def prepare_decoding(module: nn.Module, weights: str = "auto") -> str:
    """Pick the decode kernels of `module` in place (eval mode first); return a one-line summary.

    weights: "auto" keeps the package's weights and runs each on its fastest kernel: int8
        layers (`Int8Linear`) on the native kernel (int8 x int8 with per-row 8-bit activations
        for a few rows, the int8 GEMM for more) or the int8 GEMM, fp32 layers (exactly) on the
        native kernel or oneDNN, all with prepacked weights. "int8" first quantizes every fp32
        Linear that is not weight-tied (per-output-channel int8, as `shipyard compress
        --quantize weight-int8`),
        so an fp32 package decodes with 4x fewer weight bytes (CPU only: a model on another
        device raises GenerationError). "fp32" runs int8 layers on their
        dequantized fp32 weights (the reference numerics of the package's weights).
    Every kernel falls back: no native kernels -> oneDNN -> `F.linear`; no native kernels ->
    int8 GEMM -> cached dequantized weights.
    """
    if weights not in DECODE_WEIGHTS:
        raise GenerationError(
            f"unknown decode weights {weights!r}; choose one of {', '.join(DECODE_WEIGHTS)}"
        )
    off_cpu = next((p.device for p in module.parameters() if p.device.type != "cpu"), None)
    if weights == "int8" and off_cpu is not None:
        raise GenerationError(
            f"decode weights 'int8' run on CPU only; the model is on {off_cpu}: use auto or fp32"
        )
    on_cpu = off_cpu is None
    module.eval()
    if weights == "int8":
        for name in quantizable_linears(module):
            linear = cast(nn.Linear, module.get_submodule(name))  # it lists Linears only
            replace_module(module, name, Int8Linear.from_linear(linear).eval())
    int8_layers = [m for m in module.modules() if isinstance(m, Int8Linear)]
    int8_kernel = "dequantized"
    if weights != "fp32" and on_cpu and int8_layers:
        if native_kernels.load():
            int8_kernel = "native"
        elif int8_gemm_available():
            int8_kernel = "int8-gemm"
    for layer in int8_layers:
        layer.set_kernel(int8_kernel)
    if on_cpu:
        pack_linears(module)
    native = on_cpu and native_kernels.load()
    for part in module.modules():
        if isinstance(part, NativeKernels):  # attention and activations: native or not
            part.native_kernels = native
    # counted after packing, so a second call (layers already packed) reports the same
    fp32_layers = [m for m in module.modules() if type(m) in (nn.Linear, PackedLinear)]
    packed = [m for m in fp32_layers if isinstance(m, PackedLinear)] if on_cpu else []
    fp32_kernel = "F.linear"
    if packed:
        fp32_kernel = "native" if packed[0].native else "onednn-packed"
    flags = sorted(cpu_flags() & _REPORTED_FLAGS)
    parts = [f"{len(fp32_layers)} fp32 linear(s): {fp32_kernel}"]
    if int8_layers:
        parts.append(f"{len(int8_layers)} int8 linear(s): {int8_kernel}")
    return f"decode kernels: {'; '.join(parts)} (cpu flags: {' '.join(flags) or 'none'})"


KV_CACHES = ("auto", "fp32", "fp16")


def kv_cache_dtype(module: nn.Module, kv_cache: str = "auto") -> torch.dtype | None:
    """The dtype a decode KV cache of `module` stores (after `prepare_decoding`); None: the dtype
    the model computes its keys in (float32 on CPU).

    kv_cache: "fp32" or "fp16" as asked; "auto" is float16 when the model decodes int8 weights
    on shipyard's native kernels (its attention reads float16 directly; at 16 rows the cache is
    most of what a decode step reads, and half of it is ~20-25% of the step on the benchmark
    GPT), else the model's own dtype, so fp32 weights decode exactly as their forward computes.
    float16 keeps 11 significant bits, far below int8 weights' rounding (tests and the
    benchmark measure the tokens and perplexity). "fp16" elsewhere still works: SDPA reads
    the cache converted back to float32 at every step, so there it only saves memory.
    """
    if kv_cache not in KV_CACHES:
        raise GenerationError(
            f"unknown KV cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}"
        )
    if kv_cache == "fp32":
        return torch.float32
    if kv_cache == "fp16":
        return torch.float16
    native_int8 = any(isinstance(m, Int8Linear) and m.kernel == "native" for m in module.modules())
    return torch.float16 if native_int8 else None


_REPORTED_FLAGS = {
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    "asimd",
    "sve",
}
