"""Atomic checkpoints with exact resume state.

A checkpoint is a directory `checkpoints/step-00000010/` holding

    model.safetensors   the weights (safetensors: no pickle)
    state.pt            optimizer, schedule, counters, RNG states; plain tensors and numbers,
                        loaded with `torch.load(weights_only=True)`
    meta.json           step, epoch, metrics, config hash and the SHA-256 of the two files above

A run with `train.strategy: fsdp` adds

    dcp/                the sharded model and optimizer tensors, written by every rank through
                        `torch.distributed.checkpoint` (DCP), so they load on any number of
                        processes; `model.safetensors` still holds the whole weights (for
                        packaging and evaluation) and `state.pt` everything else

DCP's `.metadata` file is a pickle. It is read here with an allow-list unpickler (only DCP's own
metadata classes, torch sizes and dtypes), the tensor files with `torch.load(weights_only=True)`,
and a checkpoint holding DCP "bytes" entries (which DCP unpickles freely) is refused; every file's
SHA-256 is checked against `meta.json` first. Still, a checkpoint is run state, trusted like the
code that wrote it: packages, which are shared, never contain DCP files.

It is written under a temporary name, every file fsync'ed, then renamed into place in one
`os.rename`, so a kill at any moment leaves either the complete new checkpoint or none at all: the
previous one is always loadable. `meta.json` hashes let `find_latest` skip a damaged directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from shipyard.errors import CheckpointError

CHECKPOINT_FORMAT = 1
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
DCP_DIR = "dcp"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    meta: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically under `directory/step-XXXXXXXX/` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temp_checkpoint_dir(directory, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    return _seal(directory, tmp, step=step, meta=meta, names=[WEIGHTS, STATE])


def temp_checkpoint_dir(directory: Path, step: int) -> Path:
    """Where a checkpoint is written before its rename (this process's own temp name)."""
    return directory / f"{_TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}"


def write_sharded_part(tmp: Path, tensors: dict[str, Any]) -> None:
    """Every rank: write its shards of `tensors` (nested dicts of tensors only) under tmp/dcp."""
    _require_tensors(tensors, "")
    (tmp / DCP_DIR).mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR)))


def finish_sharded_checkpoint(
    directory: Path,
    tmp: Path,
    *,
    step: int,
    write_weights: Any,
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Rank 0, after every rank's `write_sharded_part`: add the whole weights (`write_weights(path)`
    writes them), the state and meta.json to `tmp`, fsync, and rename it into place."""
    write_weights(tmp / WEIGHTS)
    torch.save(state, tmp / STATE)
    shards = sorted(str(p.relative_to(tmp)) for p in (tmp / DCP_DIR).rglob("*") if p.is_file())
    _fsync_dir(tmp / DCP_DIR)
    return _seal(directory, tmp, step=step, meta=meta, names=[WEIGHTS, STATE, *shards])


def _seal(directory: Path, tmp: Path, *, step: int, meta: dict[str, Any], names: list[str]) -> Path:
    """Record the hashes of `names` in tmp/meta.json, fsync, and rename tmp into place as the
    checkpoint of `step` (replacing one of the same step, e.g. at the end of a resumed run)."""
    files = {name: _sha256(tmp / name) for name in names}
    full_meta = {"format": CHECKPOINT_FORMAT, "step": step, **meta, "files": files}
    (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
    for name in [*names, META]:
        _fsync(tmp / name)
    final = directory / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    return final


def load_sharded_part(path: Path, tensors: dict[str, Any]) -> None:
    """Every rank: fill `tensors` (the sharded state dicts of this run's layout) in place from a
    checkpoint's dcp/ directory, whatever number of processes wrote it."""
    if not (path / DCP_DIR).is_dir():
        raise CheckpointError(
            f"{path}: no sharded state ({DCP_DIR}/); it was not written with train.strategy fsdp"
        )
    try:
        dcp.load(tensors, storage_reader=_SafeReader(str(path / DCP_DIR)))
    except CheckpointException as exc:  # a BaseException that wraps each rank's error
        first = next(iter(exc.failures.values()), None)
        why = str(first[0]) if isinstance(first, tuple) else str(exc)
        raise CheckpointError(f"{path / DCP_DIR}: cannot load the sharded state: {why}") from None
    except Exception as exc:
        raise CheckpointError(f"{path / DCP_DIR}: cannot load the sharded state ({exc})") from None


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with an allow-list unpickler for the metadata and no bytes entries."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        raw = (Path(str(self.path)) / ".metadata").read_bytes()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{self.path}/.metadata: refused ({exc})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/.metadata: not DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                raise CheckpointError(
                    f"{self.path}: entry {key!r} is pickled bytes, which shipyard never writes "
                    "and does not load"
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return metadata


_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch", "strided"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def _require_tensors(tree: Any, prefix: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _require_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif not isinstance(tree, torch.Tensor):
        raise CheckpointError(
            f"sharded state {prefix!r} is a {type(tree).__name__}; only tensors go through DCP"
        )


def read_checkpoint(path: Path, *, verify: bool = True) -> CheckpointInfo:
    """Read and check a checkpoint directory's metadata; raise CheckpointError if incomplete."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/{META}: unreadable ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format')!r}, this shipyard reads "
            f"{CHECKPOINT_FORMAT}"
        )
    if verify:
        for name, digest in meta.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: {name} is missing")
            if _sha256(file) != digest:
                raise CheckpointError(f"{path}: {name} does not match its recorded SHA-256")
    return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoint directories (by name), oldest first; temp dirs excluded."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def find_latest(directory: Path) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest checkpoint that verifies, and a note for each newer one that was skipped."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, skipped


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's (or package's) safetensors weights into `model`, strictly."""
    file = path / WEIGHTS if path.is_dir() else path
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CheckpointError(f"{file}: cannot load weights ({exc})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: weights do not fit the model (missing: {sorted(missing)[:5]}, "
            f"unexpected: {sorted(unexpected)[:5]})"
        )


def load_state(path: Path) -> dict[str, Any]:
    """The resume state of a checkpoint, loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / STATE}: cannot load ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE}: expected a dict, got {type(state).__name__}")
    return state


def prune_checkpoints(directory: Path, *, keep_last: int, keep: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those whose step is in `keep`."""
    paths = list_checkpoints(directory)
    recent = set(paths[-keep_last:])
    for path in paths:
        step = int(path.name.removeprefix(_PREFIX))
        if path not in recent and step not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in directory.glob(f"{_TMP_PREFIX}*"):
        # a temp dir of a process that died mid-write; never a complete checkpoint
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# RNG state as plain tensors (weights_only-loadable)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and ints."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
