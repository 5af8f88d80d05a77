"""Serving throughput on loopback: shipyard (batching on / off) vs a naive one-forward-per-request
Flask server, for the digits MLP and two larger MLPs (hidden [2048, 2048] and [4096] x 3).

Each server runs in its own process (shipyard also as two worker processes, labelled); the load
generator (a minimal HTTP/1.1 client on asyncio streams, keep-alive) sends a fixed number of
one-row `:predict` requests at concurrency 1, 8 and 32 and prints requests/s and p50/p99 latency
side by side, the ratio over naive at 32 clients, and each server's resident memory after a long
run. All servers of a model run at once and are measured in interleaved rounds (median reported),
so a machine that speeds up or slows down mid-run affects them alike.

    python benchmarks/serve_throughput.py                      # 2000 per level x 3, 50k long run
    python benchmarks/serve_throughput.py --quick --repeats 1  # 300 per level, 3k long run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.serve.launch import start_server, stop_server

MODELS: dict[str, list[int]] = {
    "digits": [32],
    "mlp-2048": [2048, 2048],
    "mlp-4096x3": [4096, 4096, 4096],  # ~34M parameters: the forward pass dominates
}
LEVELS = (1, 8, 32)


def build_package(work: Path, name: str, hidden: list[int]) -> Path:
    """A tiny training run (weights don't matter for throughput), packaged; cached in `work`."""
    pkg = work / name / "package"
    if (pkg / "manifest.json").is_file():
        return pkg
    from shipyard.config import load_config
    from shipyard.train import fit

    config = {
        "name": name,
        "task": "classification",
        "data": {"source": "builtin:digits"},
        "model": {"name": "mlp", "hidden_sizes": hidden},
        "train": {"epochs": None, "max_steps": 2, "batch_size": 32},
    }
    fit(load_config(config), run_dir=pkg.parent, progress=False)
    return pkg


# ------------------------------------------------------------------------------ naive server


def naive_server(package: str, threads: int) -> None:
    """The classic pattern: Flask, one forward per request, served by waitress threads."""
    from flask import Flask, jsonify, request
    from waitress.server import create_server

    from shipyard.package import load_package

    model = load_package(package)
    app = Flask("naive")

    @app.post("/v1/models/<name>:predict")
    def predict(name: str) -> Any:
        return jsonify({"predictions": model.predict(request.get_json()["instances"])})

    server = create_server(app, host="127.0.0.1", port=0, threads=threads)
    print(f"serving on http://127.0.0.1:{server.effective_port}", flush=True)  # type: ignore[union-attr]
    server.run()


# ------------------------------------------------------------------------------ load


def start(cmd: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server (shipyard's or the naive one) and wait until it answers HTTP."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # any answer will do: the naive server has no readiness route
    return start_server(
        cmd, env=env, ready_path="/v1/models/x:predict", any_answer=True, capture_stderr=False
    )


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    await reader.readexactly(length)
    return status


async def load(url: str, model: str, n: int, concurrency: int) -> dict[str, float]:
    """`n` one-row predict requests with `concurrency` keep-alive connections in flight.

    A minimal HTTP/1.1 client on asyncio streams: httpx's own overhead at 32 connections is
    larger than the servers' and would make every server look the same.
    """
    host, port = url.removeprefix("http://").split(":")
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(64):
        body = json.dumps({"instances": (rng.random((1, 64)) * 16).tolist()}).encode()
        requests.append(
            f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                t0 = time.perf_counter()
                status = await _request(reader, writer, requests[i % 64])
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
        finally:
            writer.close()

    start_t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start_t
    lat = np.asarray(latencies) * 1000
    return {
        "rps": n / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def _median(trials: list[dict[str, float]]) -> dict[str, float]:
    """Each measure's median over the trials (and their count)."""
    out = {k: float(np.median([t[k] for t in trials])) for k in trials[0]}
    out["trials"] = len(trials)
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (workers), MiB, from /proc."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--requests", type=int, default=None, help="requests per level")
    ap.add_argument("--long-run", type=int, default=None, help="requests in the memory run")
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds per level (median reported)"
    )
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--work-dir", type=Path, default=Path("runs/bench-serve"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_throughput.json"))
    ap.add_argument("--naive-server", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_server:
        naive_server(args.naive_server, args.threads)
        return
    from shipyard.compress.measure import describe_machine, machine

    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    n = args.requests or (300 if args.quick else 2000)
    long_n = args.long_run or (3000 if args.quick else 50_000)
    # Every server may use every core: the naive server runs up to 8 forwards at once (waitress
    # threads, one torch thread each), shipyard one batched forward with cores / workers torch
    # threads (its own default; set explicitly because OMP_NUM_THREADS=1 is set for all).
    cores = os.cpu_count() or 1
    shipyard = [sys.executable, "-m", "shipyard", "serve", "--port", "0"]
    batching = ["--max-batch-size", "32", "--max-wait-ms", "0"]
    servers: dict[str, list[str]] = {
        "shipyard (batching)": [*shipyard, *batching, "--torch-threads", str(cores)],
        "shipyard (no batching)": [
            *shipyard,
            *("--max-batch-size", "1", "--max-wait-ms", "0", "--torch-threads", str(cores)),
        ],
        "naive flask/waitress": [sys.executable, __file__, "--naive-server"],
        # two server processes on the same cores (the naive server above is one process)
        "shipyard (batching, 2 workers)": [
            *shipyard,
            *batching,
            *("--workers", "2", "--torch-threads", str(max(1, cores // 2))),
        ],
    }
    results: dict[str, Any] = {
        "machine": host,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "requests_per_level": n,
        "repeats": args.repeats,
        "models": {},
    }
    for model in args.models.split(","):
        hidden = MODELS[model]
        pkg = build_package(args.work_dir, model, hidden)
        rows: dict[str, Any] = {}
        # All servers up at once (idle ones cost nothing), measured in interleaved rounds so
        # that drift in the machine's speed hits every server alike; medians over the rounds.
        running: dict[str, tuple[subprocess.Popen[str], str]] = {}
        try:
            for label, cmd in servers.items():
                running[label] = start([*cmd, str(pkg)])
                asyncio.run(load(running[label][1], model, 50, 4))  # warm-up
            trials: dict[str, dict[int, list[dict[str, float]]]] = {
                label: {c: [] for c in LEVELS} for label in servers
            }
            for _ in range(args.repeats):
                for c in LEVELS:
                    for label, (_, url) in running.items():
                        trials[label][c].append(asyncio.run(load(url, model, n, c)))
            for label in servers:
                rows[label] = {c: _median(trials[label][c]) for c in LEVELS}
                if model == "digits":
                    proc, url = running[label]
                    before = rss_mib(proc.pid)
                    asyncio.run(load(url, model, long_n, 32))
                    after = rss_mib(proc.pid)
                    rows[label]["rss_mib_before_long_run"] = before
                    rows[label]["rss_mib_after_long_run"] = after
                    rows[label]["rss_growth_pct"] = 100.0 * (after - before) / before
        finally:
            for proc, _ in running.values():
                proc.terminate()
            for proc, _ in running.values():
                stop_server(proc)
        results["models"][model] = rows
        print(
            f"\n## {model} (hidden {hidden}), {n} one-row requests per level, "
            f"median of {args.repeats} interleaved rounds"
        )
        print(
            f"{'server':<32}" + "".join(f"{f'c={c} rps':>11}{'p50':>8}{'p99':>8}" for c in LEVELS)
        )
        for label, r in rows.items():
            cells = "".join(
                f"{r[c]['rps']:>11.0f}{r[c]['p50_ms']:>8.1f}{r[c]['p99_ms']:>8.1f}" for c in LEVELS
            )
            print(f"{label:<32}{cells}")
        naive = rows["naive flask/waitress"][32]
        for label in (k for k in rows if k.startswith("shipyard")):
            r = rows[label][32]
            print(
                f"{label} vs naive at 32 clients: {r['rps'] / naive['rps']:.2f}x requests/s, "
                f"p99 {r['p99_ms']:.1f} vs {naive['p99_ms']:.1f} ms"
            )
        if model == "digits":
            for label, r in rows.items():
                print(
                    f"RSS over {long_n} requests at 32 clients, {label}: "
                    f"{r['rss_mib_before_long_run']:.0f} -> {r['rss_mib_after_long_run']:.0f} MiB "
                    f"({r['rss_growth_pct']:+.1f}%)"
                )
    sys.stdout.flush()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
