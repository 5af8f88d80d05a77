"""Shared helpers for the registry tests: one tiny real package per session, and a worker that
registers from another process (importable by multiprocessing's spawn start method)."""

from __future__ import annotations

import queue
import shutil
from pathlib import Path
from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "name": "reg",
    "task": "regression",
    "data": {"source": "builtin:synthetic-regression", "n_samples": 200, "n_features": 4},
    "model": {"name": "mlp", "hidden_sizes": [8]},
    "train": {"epochs": None, "max_steps": 3, "batch_size": 16},
}


def tiny_package(base: Path) -> Path:
    """Train 3 steps and package the run, once per session (cached under `base`)."""
    out = base / "registry-tiny-package"
    if (out / "manifest.json").is_file():
        return out
    from shipyard.config import load_config
    from shipyard.train import fit, package_run

    result = fit(load_config(TINY_CONFIG), run_dir=base / "registry-tiny-run", progress=False)
    return Path(package_run(result.run_dir, out))


def copy_package(src: Path, dest: Path) -> Path:
    """A private copy of a package directory (tests may tamper with it)."""
    shutil.copytree(src, dest)
    return dest


def register_many(
    url: str, store_root: str, package_dir: str, name: str, n: int, barrier: Any, out: Any
) -> None:
    """Process entry point: wait for the sibling, then register `package_dir` n times."""
    from shipyard.package.registry import Registry

    with Registry(url, store_root) as registry:
        barrier.wait(timeout=60)
        versions = [registry.register(package_dir, name=name).version for _ in range(n)]
    out.put(versions)


def register_concurrently(
    url: str, store_root: str, package_dir: Path, name: str, *, processes: int = 2, n: int = 5
) -> list[int]:
    """Run `processes` real processes, each registering `n` times at once; all versions seen.

    Fork where available: a spawned child spends seconds re-importing torch before it can
    register, and the children here touch no torch state (only SQL, files and hashes). Each
    child opens its own engine and connections after the fork.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=register_many,
            args=(url, store_root, str(package_dir), name, n, barrier, out),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    versions: list[int] = []
    for _ in procs:
        try:
            versions += out.get(timeout=120)
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            raise AssertionError(f"a worker produced no result (exit codes {codes})") from None
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    return versions
