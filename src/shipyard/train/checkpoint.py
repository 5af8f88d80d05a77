"""Atomic checkpoints with exact resume state.

A checkpoint is a directory `checkpoints/step-00000010/` holding

    model.safetensors   the weights (safetensors: no pickle)
    state.pt            optimizer, schedule, counters, RNG states; plain tensors and numbers,
                        loaded with `torch.load(weights_only=True)`
    meta.json           step, epoch, metrics, config hash and the SHA-256 of the two files above

It is written under a temporary name, every file fsync'ed, then renamed into place in one
`os.rename`, so a kill at any moment leaves either the complete new checkpoint or none at all: the
previous one is always loadable. `meta.json` hashes let `find_latest` skip a damaged directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from shipyard.errors import CheckpointError

CHECKPOINT_FORMAT = 1
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


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
    final = directory / checkpoint_name(step)
    tmp = directory / f"{_TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    files = {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)}
    full_meta = {"format": CHECKPOINT_FORMAT, "step": step, **meta, "files": files}
    (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
    for name in (WEIGHTS, STATE, META):
        _fsync(tmp / name)
    if final.exists():  # re-writing the same step (e.g. the end of a resumed run)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    return final


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
