"""Shared helpers for the serving tests: one tiny real digits package per session, settings,
and a real uvicorn server on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DIGITS_CONFIG: dict[str, Any] = {
    "name": "digits",
    "task": "classification",
    "data": {"source": "builtin:digits"},
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "train": {"epochs": None, "max_steps": 30, "batch_size": 32},
}

_cache: dict[str, Any] = {}


def digits_package(base: Path) -> Path:
    """Train 30 steps on digits and package the run, once per session (cached under `base`)."""
    out = base / "serve-digits-run" / "package"
    if (out / "manifest.json").is_file():
        return out
    from shipyard.config import load_config
    from shipyard.train import fit, package_run

    result = fit(load_config(DIGITS_CONFIG), run_dir=out.parent, progress=False)
    if not (out / "manifest.json").is_file():
        package_run(result.run_dir)
    return out


def loaded_digits(base: Path) -> Any:
    """The digits package loaded once per session (a LoadedModel)."""
    if "digits" not in _cache:
        from shipyard.package import load_package

        _cache["digits"] = load_package(digits_package(base))
    return _cache["digits"]


def digits_inputs(n: int = 8, seed: int = 0) -> Any:
    """`n` real digits images as the model's FP32 input (n, 1, 8, 8)."""
    import numpy as np
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    images = load_digits().images.astype(np.float32)
    return images[rng.choice(len(images), n, replace=False)][:, None, :, :]


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on 127.0.0.1:<ephemeral>; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("server failed to start")
            threading.Event().wait(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
