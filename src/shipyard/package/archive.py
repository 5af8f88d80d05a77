"""The single-file form of a package: `model.ship`, a tar of the package's flat directory.

`pack_package` verifies the directory and writes a deterministic, uncompressed tar (manifest.json
first). `unpack_package` extracts defensively: only regular files with plain names, no links or
devices, no duplicates, a bounded member count and total size; it writes into a temporary
directory, verifies the result against its manifest and only then renames it into place.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

from shipyard.errors import PackageError
from shipyard.fileio import atomic_output
from shipyard.package.manifest import (
    MANIFEST,
    check_file_name,
    staged_package,
    verify_package,
)

SUFFIX = ".ship"
DEFAULT_MAX_BYTES = 20 << 30  # 20 GiB
DEFAULT_MAX_MEMBERS = 64
_COPY_CHUNK = 8 << 20


def pack_package(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Verify package directory `src` and write it as one tar file `out` (e.g. model.ship)."""
    root = Path(src)
    manifest = verify_package(root)
    target = Path(out)
    if target.is_dir():
        raise PackageError(f"{target}: is a directory; give a file name such as model{SUFFIX}")
    names = [MANIFEST]
    if (root / "manifest.sig").is_file():
        names.append("manifest.sig")
    names += sorted(manifest.files)
    with atomic_output(target) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = (root / name).stat().st_size
            info.mode = 0o644
            info.mtime = 0  # deterministic: same package, same bytes
            with (root / name).open("rb") as fh:
                tar.addfile(info, fh)
    return target


def unpack_package(
    file: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    public_key: Any = None,
) -> Path:
    """Safely extract a packed package to directory `out` (must not exist or be empty), verify
    it (and its signature when `public_key` is given) and return `out`.

    max_bytes / max_members bound what a hostile archive can make us write.
    """
    source = Path(file)
    target = Path(out)
    try:
        tar = tarfile.open(source, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (OSError, tarfile.TarError) as exc:
        raise PackageError(f"{source}: not a package archive ({exc})") from None
    with tar, staged_package(target) as tmp:
        seen: set[str] = set()
        total = 0
        count = 0
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                raise PackageError(f"{source}: damaged archive ({exc})") from None
            if member is None:
                break
            count += 1
            if count > max_members:
                raise PackageError(f"{source}: more than {max_members} members; not a package")
            _check_member(source, member)
            if member.name in seen:
                raise PackageError(f"{source}: member {member.name!r} appears twice")
            seen.add(member.name)
            total += member.size
            if total > max_bytes:
                raise PackageError(
                    f"{source}: members add up to more than {max_bytes} bytes (the limit; raise "
                    "it with --max-size if this package is really that large)"
                )
            _extract(tar, member, tmp / member.name, source)
        if MANIFEST not in seen:
            raise PackageError(f"{source}: archive has no {MANIFEST}; not a package")
        if public_key is not None:
            verify_package(tmp, public_key=public_key)
    return target


def _check_member(source: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    if not member.isreg():
        kind = "link" if (member.issym() or member.islnk()) else "non-regular file"
        raise PackageError(f"{source}: member {name!r} is a {kind}; only regular files allowed")
    if name.startswith("/") or ".." in name.split("/") or "/" in name:
        raise PackageError(f"{source}: member {name!r} is not a plain file name (path traversal)")
    try:
        check_file_name(name)
    except PackageError:
        raise PackageError(f"{source}: member {name!r} is not an allowed file name") from None
    if member.size < 0:
        raise PackageError(f"{source}: member {name!r} has a negative size")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, source: Path) -> None:
    fh = tar.extractfile(member)
    if fh is None:
        raise PackageError(f"{source}: member {member.name!r} cannot be read")
    written = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with fh, os.fdopen(fd, "wb") as outf:
        while chunk := fh.read(_COPY_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise PackageError(f"{source}: member {member.name!r} is larger than declared")
            outf.write(chunk)
    if written != member.size:
        raise PackageError(f"{source}: member {member.name!r} is truncated")
