"""Crash-safe file writes: the one place that writes a temp file beside the target, fsyncs it and
renames it over the target, so a reader (or a crash) sees the old file or the new one, never half.

Directories (checkpoints, packages) are staged and renamed by their owners (train/checkpoint.py,
package/manifest.py `staged_package`); this module is for single files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success fsync it and rename it to `path`.

    mode: permission bits for the new file (e.g. 0o600 for secrets), set before the rename.
    On any exception the temp file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None
) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically; return the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, mode=mode) as tmp:
        tmp.write_bytes(raw)
    return Path(path)
