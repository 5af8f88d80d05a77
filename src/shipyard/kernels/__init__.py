"""Native CPU kernels, compiled on the machine that runs them (lowest layer: imports torch only).

`native.load()` builds `cpu_linear.cpp` once per machine, PyTorch version and compiler into a
cache directory and registers its operators (`torch.ops.shipyard.*`); it returns False (and
the callers keep PyTorch's own kernels) wherever that cannot work: no AVX2/FMA/F16C, no C++
compiler, a failed build, or $SHIPYARD_DISABLE_KERNELS=native.
"""

from shipyard.kernels.native import (
    DISABLE_ENV,
    NATIVE_KERNEL,
    cache_dir,
    cpu_flags,
    kernel_disabled,
    load,
    loaded,
    native_unavailable,
    pack_int8,
    pack_weight,
)

__all__ = [
    "DISABLE_ENV",
    "NATIVE_KERNEL",
    "cache_dir",
    "cpu_flags",
    "kernel_disabled",
    "load",
    "loaded",
    "native_unavailable",
    "pack_int8",
    "pack_weight",
]
