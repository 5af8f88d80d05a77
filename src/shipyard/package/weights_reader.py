"""Read a package's safetensors weights once, hashing the very bytes the model gets.

`read_verified_weights` parses the safetensors header, then reads each tensor's bytes straight
into the model's own (already allocated, aligned) tensor, while another thread hashes each piece
just read. The weights are returned only when the whole file's hash and size match the manifest.

Why not `safetensors.torch.load_file` plus a separate hash of the file: that reads the bytes twice
(once to hash, once to load, plus a copy into the model), and what was hashed is not necessarily
what was loaded (the file can change between the two reads). Here one read fills the model, the
hash covers exactly those bytes, and the model keeps private memory rather than a map of a file
that could change or shrink under it later.

The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data, with
the tensors' byte ranges tiling it exactly. Anything else is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shipyard.errors import PackageError
from shipyard.package.manifest import FileEntry, Hasher, digest_file, mismatch_error

READ_PIECE = 16 << 20  # bytes per read (and per hash update); big enough for BLAKE3's threads
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
READ_AHEAD = 256 << 20  # ask the kernel to fetch this far ahead of the reads (cold page cache)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):  # newer dtypes, where this torch has them
        DTYPES[_name] = getattr(torch, _attr)


class _Malformed(Exception):
    """The file is not a valid safetensors file (reported after checking its hash)."""


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_verified_weights(
    path: Path,
    entry: FileEntry,
    targets: Mapping[str, torch.Tensor],
    *,
    piece: int = READ_PIECE,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Read safetensors file `path` into `targets` (name → tensor), verifying it against `entry`.

    A tensor whose target has its dtype and shape (contiguous, on the CPU) is read straight into
    the target, which is returned under that name; any other gets a new tensor (the caller
    decides whether it fits). PackageError when the size or hash differs from `entry` (the
    weights must not be used then) or the file is not valid safetensors.
    piece: bytes per read; threads: hash threads (None: every core).
    """
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, after the reads)
    except OSError as exc:
        raise PackageError(f"{path}: cannot read ({exc.strerror})") from None
    hashing = _HashThread(Hasher(entry.algorithm, threads=threads))
    try:
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != entry.size:
                raise PackageError(
                    f"{path}: size {size} does not match the manifest ({entry.size}); the file "
                    "was changed or truncated"
                )
            tensors = _read(fh, size, targets, hashing, piece)
    except _Malformed as exc:
        hashing.close()
        # a damaged file is reported as damaged; a file that matches its manifest but is not
        # safetensors was packaged broken
        if digest_file(path, entry.algorithm) != entry.digest:
            raise mismatch_error(path, entry.algorithm) from None
        raise PackageError(f"{path}: cannot read weights ({exc})") from None
    except OSError as exc:
        hashing.close()
        raise PackageError(f"{path}: cannot read ({exc})") from None
    except BaseException:
        hashing.close()
        raise
    if hashing.close() != entry.digest:
        raise mismatch_error(path, entry.algorithm)
    return tensors


def _read(
    fh: Any,
    size: int,
    targets: Mapping[str, torch.Tensor],
    hashing: _HashThread,
    piece: int,
) -> dict[str, torch.Tensor]:
    if size < 8:
        raise _Malformed(f"{size} bytes is too short for a safetensors file")
    prefix = _read_exact(fh, 8)
    n = int.from_bytes(prefix, "little")
    if n > min(MAX_HEADER, size - 8):
        raise _Malformed(f"header length {n} does not fit a file of {size} bytes")
    header = _read_exact(fh, n)
    hashing.put(memoryview(prefix + header))
    slots = _parse_header(header, size - 8 - n)
    data_start = 8 + n
    tensors: dict[str, torch.Tensor] = {}
    filled: set[int] = set()  # never read into memory whose earlier bytes may not be hashed yet
    for slot in slots:
        target = targets.get(slot.name)
        if _fits(target, slot) and target is not None and target.data_ptr() not in filled:
            dest = target
            filled.add(target.data_ptr())
        else:
            dest = torch.empty(slot.shape, dtype=slot.dtype)
        view = _writable_bytes(dest)
        for start in range(0, len(view), piece):
            part = view[start : start + piece]
            _prefetch(fh, data_start + slot.begin + start + len(part), READ_AHEAD)
            _read_into(fh, part)
            hashing.put(part)
        tensors[slot.name] = dest
    return tensors


def _parse_header(header: bytes, data_size: int) -> list[_Slot]:
    """The tensors of a safetensors header in file order; their ranges must tile the data."""
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Malformed(f"header is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _Malformed("header is not a JSON object")
    slots = []
    for name, info in meta.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise _Malformed("__metadata__ is not an object")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _Malformed(f"tensor {name!r}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _Malformed(
                f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}"
            )
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise _Malformed(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
            raise _Malformed(f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise _Malformed(
                f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, its shape "
                f"{shape} and dtype {dtype} need {nbytes}"
            )
        slots.append(_Slot(name, DTYPES[dtype], tuple(shape), begin, end))
    slots.sort(key=lambda s: (s.begin, s.end))
    position = 0
    for slot in slots:
        if slot.begin != position:
            raise _Malformed(f"tensor {slot.name!r} starts at {slot.begin}, expected {position}")
        position = slot.end
    if position != data_size:
        raise _Malformed(f"the tensors cover {position} bytes of {data_size} bytes of data")
    return slots


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fits(target: torch.Tensor | None, slot: _Slot) -> bool:
    return (
        isinstance(target, torch.Tensor)
        and target.device.type == "cpu"
        and target.dtype == slot.dtype
        and tuple(target.shape) == slot.shape
        and target.is_contiguous()
    )


def _writable_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def _prefetch(fh: Any, offset: int, length: int) -> None:
    """Start reading the next `length` bytes from disk while we copy and hash these ones."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fh.fileno(), offset, length, os.POSIX_FADV_WILLNEED)


def _read_exact(fh: Any, n: int) -> bytes:
    buf = bytearray(n)
    _read_into(fh, memoryview(buf))
    return bytes(buf)


def _read_into(fh: Any, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise _Malformed(f"file ended early (truncated while reading, at +{done} bytes)")
        done += got


class _HashThread:
    """Hashes the pieces it is given, in order, on its own thread (BLAKE3 and hashlib release
    the GIL), so reading the next piece overlaps hashing this one."""

    def __init__(self, hasher: Hasher) -> None:
        self._hasher = hasher
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="shipyard-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (part := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._hasher.update(part)
                except BaseException as exc:  # reported by close()
                    self._error = exc

    def put(self, part: memoryview) -> None:
        self._queue.put(part)

    def close(self) -> str:
        """Wait for every piece to be hashed; the hex digest."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise PackageError(f"hashing failed ({self._error})")
        return self._hasher.hexdigest()


__all__ = ["DTYPES", "READ_PIECE", "read_verified_weights"]
