"""In-process cost of one small inference request: the server's own Python, without sockets.

Drives the ASGI app from `create_app` directly (no uvicorn, no load generator competing for the
cores) with one-row `:predict` requests for the digits model, at 1 and 32 requests in flight, and
compares with the minimal FastAPI endpoint a user would write (`loaded.predict` on the parsed
body, no auth, limits, batching, metrics or logging). Prints µs per request (min and median over
rounds) and the ratio at 32 in flight.

    python benchmarks/serve_overhead.py                  # 12 rounds of 640 requests
    python benchmarks/serve_overhead.py --no-access-log  # without the JSON access log
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import build_package

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def minimal_fastapi_app(loaded: Any) -> Any:
    """The endpoint a user would write: parse, `loaded.predict`, return (forward on the loop)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"predictions": loaded.predict(body["instances"])}

    return app


def request_scope(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: ASGI, path: str, body: bytes) -> int:
    """One request through `app`; returns the status."""
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(request_scope(path, body), receive, send)
    return status


async def rounds(
    app: ASGI, path: str, bodies: list[bytes], n: int, concurrency: int, repeats: int
) -> list[float]:
    """µs per request of each round of `n` requests with `concurrency` in flight."""

    async def worker() -> None:
        for i in range(n // concurrency):
            status = await call(app, path, bodies[i % len(bodies)])
            assert status == 200, status

    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.append((time.perf_counter() - start) / n * 1e6)
    return out


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import torch

    from shipyard.serve import ServeSettings, create_app

    torch.set_num_threads(1)
    package = build_package(args.work_dir, "digits", [32])
    app = create_app(ServeSettings(packages=[package], access_log=not args.no_access_log))
    logging.getLogger("shipyard.serve.access").handlers = [logging.NullHandler()]
    rng = np.random.default_rng(0)
    bodies = [
        json.dumps({"instances": (rng.random((1, 64)) * 16).tolist()}).encode() for _ in range(64)
    ]
    path = "/v1/models/digits:predict"
    results: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        minimal = minimal_fastapi_app(app.state.server.repo.get("digits").loaded)
        for label, target in (("shipyard :predict", app), ("minimal FastAPI", minimal)):
            await rounds(target, path, bodies, 320, 32, 1)  # warm-up
            results[label] = {
                c: await rounds(target, path, bodies, args.requests, c, args.rounds)
                for c in (1, 32)
            }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=640, help="requests per round")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--no-access-log", action="store_true", help="turn the access log off")
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench-serve"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_overhead.json"))
    args = ap.parse_args()
    from shipyard.compress.measure import describe_machine, machine

    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    results = asyncio.run(measure(args))
    print(f"\nµs per one-row :predict request, in-process, {args.rounds} rounds of {args.requests}")
    print(f"{'app':<22}{'c=1 min':>10}{'median':>10}{'c=32 min':>10}{'median':>10}")
    for label, r in results.items():
        cells = "".join(f"{min(r[c]):>10.1f}{statistics.median(r[c]):>10.1f}" for c in (1, 32))
        print(f"{label:<22}{cells}")
    ours, minimal = results["shipyard :predict"][32], results["minimal FastAPI"][32]
    print(f"minimal FastAPI / shipyard at 32 in flight: {min(minimal) / min(ours):.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"machine": host, "command": " ".join(sys.argv), "us_per_request": results},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
