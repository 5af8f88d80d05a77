"""Build, cache and load the native CPU kernels of `cpu_linear.cpp` as PyTorch operators.

The build runs once per machine: the shared library is named by a hash of the source, the
PyTorch version, the compiler's version and the flags, and kept in the kernel cache
($SHIPYARD_KERNEL_CACHE, else $XDG_CACHE_HOME/shipyard/kernels, else ~/.cache/shipyard/kernels).
Processes that start together build it once (a lock file), and a build is written to a
temporary name and renamed, so a crash mid-build leaves no half-written library behind.
Building takes ~20 s on 2 cores (PyTorch's headers); a cached library loads in milliseconds.

The library is only ever loaded from that cache directory, which is created private to the
user (0700) like any compiler cache; set $SHIPYARD_KERNEL_CACHE to move it.

Operators (see `cpu_linear.cpp`):
    torch.ops.shipyard.pack_weight(weight) -> packed (blocks, K, 16) float32
    torch.ops.shipyard.linear_f32(x, weight, packed, bias, max_rows) -> y
    torch.ops.shipyard.pack_int8(weight_int8) -> packed (blocks, 4 * ceil(K / 4), 16) int8
    torch.ops.shipyard.linear_i8(x, packed, scale, bias, in_features, fallback, max_rows) -> y
    torch.ops.shipyard.decode_attention(q, k, v, mask, scale) -> y
    torch.ops.shipyard.gelu_tanh(x) -> y
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

NATIVE_KERNEL = "native"
"""The name $SHIPYARD_DISABLE_KERNELS takes to keep the native kernels from loading."""
DISABLE_ENV = "SHIPYARD_DISABLE_KERNELS"
"""Comma-separated kernels to treat as unavailable (e.g. "native,int8-gemm"): forces fallbacks."""

SOURCE = Path(__file__).with_name("cpu_linear.cpp")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")
_REQUIRED_CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
_BUILD_TIMEOUT_S = 600

log = logging.getLogger("shipyard.kernels")


def kernel_disabled(name: str) -> bool:
    """True when `name` is listed in $SHIPYARD_DISABLE_KERNELS."""
    listed = os.environ.get(DISABLE_ENV, "")
    return name in {part.strip() for part in listed.split(",")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where there is none); read
    once per process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    explicit = os.environ.get("SHIPYARD_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shipyard" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def native_unavailable() -> str:
    """Why the native kernels cannot be built here ("" when they can be tried)."""
    if kernel_disabled(NATIVE_KERNEL):
        return f"disabled by ${DISABLE_ENV}={NATIVE_KERNEL}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"x86-64 only (this is {platform.machine()})"
    missing = _REQUIRED_CPU_FLAGS - cpu_flags()
    if missing:
        return f"the CPU lacks {' '.join(sorted(missing))}"
    if _compiler() is None:
        return "no C++ compiler (c++, g++ or clang++; or set $CXX)"
    return ""


def _build_command(compiler: str, source: Path, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    lib_dir = torch_dir / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        *_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(source),
        f"-L{lib_dir}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib_dir}",
        "-o",
        str(output),
    ]


def _library_name(compiler: str) -> str:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), version.encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(" ".join(_FLAGS).encode())
    return f"shipyard_cpu_{digest.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(compiler: str, target: Path) -> None:
    """Compile the source into `target` (atomically: a temporary name, then a rename)."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.warning(
            "building shipyard's native CPU kernels (once per machine, ~20 s) into %s",
            target.parent,
        )
        result = subprocess.run(
            _build_command(compiler, SOURCE, tmp),
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{compiler} exited {result.returncode}: {' | '.join(tail)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


_LOADED: list[bool] = []  # memo: the result of the one load attempt of this process


def load() -> bool:
    """Build (once per machine) and load the native kernels; True when `torch.ops.shipyard`
    has them. Tried once per process; any failure is logged once and returns False."""
    if kernel_disabled(NATIVE_KERNEL):  # read on every call: a test or a user may set it late
        return False
    if _LOADED:
        return _LOADED[0]
    ok = False
    why = native_unavailable()
    if why:
        log.info("native CPU kernels off: %s", why)
    else:
        try:
            compiler = _compiler()
            assert compiler is not None  # native_unavailable checked it
            directory = cache_dir()
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = directory / _library_name(compiler)
            if not target.exists():
                with _locked(directory):
                    if not target.exists():  # another process may have built it meanwhile
                        _build(compiler, target)
            torch.ops.load_library(str(target))
            ok = _self_test()
            if not ok:
                log.warning("native CPU kernels off: their self-test disagreed with F.linear")
        except Exception as e:  # an optimisation: whatever fails keeps PyTorch's kernels
            log.warning("native CPU kernels off: %s: %s", type(e).__name__, e)
    _LOADED.append(ok)
    return ok


def loaded() -> bool:
    """True when the kernels are loaded already (never builds: for hot paths that should use
    them only once generation has asked for them, see `load`)."""
    return bool(_LOADED) and _LOADED[0] and not kernel_disabled(NATIVE_KERNEL)


def _self_test() -> bool:
    """Both linear operators agree with their definitions on a small odd-sized product (1 and 7
    rows): `F.linear` for float32; for int8, per-row 8-bit activations times the int8 weights."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 19, generator=gen)
    bias = torch.randn(37, generator=gen)
    q = torch.randint(-127, 128, (37, 19), generator=gen, dtype=torch.int8)
    scale = torch.rand(37, generator=gen) + 0.5
    with torch.inference_mode():
        for rows in (1, 7):
            x = torch.randn(rows, 19, generator=gen)
            y = torch.ops.shipyard.linear_f32(x, weight, pack_weight(weight), bias, 64)
            if not torch.allclose(y, torch.nn.functional.linear(x, weight, bias), atol=1e-4):
                return False
            y8 = torch.ops.shipyard.linear_i8(x, pack_int8(q), scale, bias, 19, None, 64)
            s = x.abs().amax(dim=1, keepdim=True) / 127.0
            xq = torch.clamp(torch.round(x / s), -127, 127)
            ref = torch.nn.functional.linear(xq * s, q.float() * scale[:, None], bias)
            if not torch.allclose(y8, ref, rtol=1e-4, atol=1e-4):
                return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) float32 weight packed for `linear_f32`."""
    return torch.ops.shipyard.pack_weight(weight.detach())


def pack_int8(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) int8 weight (values in [-127, 127]) packed for `linear_i8`."""
    return torch.ops.shipyard.pack_int8(weight.detach())
