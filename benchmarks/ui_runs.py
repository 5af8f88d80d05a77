"""The dashboard with many runs and a long history: JSON endpoint latency and size, and (when
Debian's chromium and chromedriver are installed) how long the runs page and a run page take to
become interactive in headless Chromium.

Claim: the runs page stays interactive with 2,000 runs and a run page with a 100,000-point
history, because summaries are cached per run and series are downsampled on the server.

Generates synthetic run directories (config.yaml + metrics.jsonl in the trainer's format) in a
temporary folder, serves them with a real uvicorn on an ephemeral loopback port, then times:
GET /ui/api/runs cold (first parse) and warm (cached), GET .../series for the long run cold and
warm, and, with a browser, navigation → `document.body.dataset.ready` for both pages.

    python benchmarks/ui_runs.py                       # about a minute on 2 CPU cores
    python benchmarks/ui_runs.py --runs 2000 --points 100000 --out benchmarks/results/ui.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

CONFIG = """name: {name}
task: classification
seed: {seed}
model: {{name: mlp, hidden_sizes: [{hidden}]}}
optim: {{name: adamw, lr: {lr}}}
train: {{epochs: 30, batch_size: 64, early_stopping: {{metric: accuracy, mode: max, patience: 8}}}}
"""


def make_run(path: Path, seed: int, points: int) -> None:
    """One run directory with `points` train records and a validation record every 10 steps."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    lr = rng.choice([0.001, 0.003, 0.01])
    name = f"sweep-{seed % 20}"
    (path / "config.yaml").write_text(
        CONFIG.format(name=name, seed=seed, hidden=rng.choice([32, 64, 128]), lr=lr)
    )
    t0 = 1.7e9 + seed
    lines = []
    for step in range(1, points + 1):
        loss = 2.3 * (0.999**step) + 0.05 * rng.random()
        lines.append(
            json.dumps(
                {
                    "kind": "train",
                    "step": step,
                    "epoch": step // 100,
                    "loss": loss,
                    "lr": lr,
                    "time": t0 + step * 0.01,
                }
            )
        )
        if step % 10 == 0:
            acc = 1 - loss / 2.5
            lines.append(
                json.dumps(
                    {
                        "kind": "val",
                        "step": step,
                        "epoch": step // 100,
                        "loss": loss,
                        "accuracy": acc,
                    }
                )
            )
    lines.append(json.dumps({"kind": "final", "step": points, "val_accuracy": acc}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def browser_times(url: str, long_run: str, repeats: int) -> dict[str, float] | None:
    """Seconds from navigation to the page's `data-ready`, median of `repeats`, or None."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        return None
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="ui-bench-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    out: dict[str, float] = {}
    try:
        for label, path in (("runs page", "/ui/"), ("run page (long)", f"/ui/runs/{long_run}")):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                driver.get(url + path)
                WebDriverWait(driver, 300, poll_frequency=0.01).until(
                    lambda d: d.execute_script("return document.body.dataset.ready")
                )
                times.append(time.perf_counter() - start)
            out[label] = statistics.median(times)
        # sorting 2,000 rows by a column, in the page
        driver.get(url + "/ui/")
        WebDriverWait(driver, 300).until(
            lambda d: d.execute_script("return document.body.dataset.ready")
        )
        ms = driver.execute_script(
            "const t = performance.now();"
            "document.querySelector('th[data-sort=final_loss]').click();"
            "return performance.now() - t;"
        )
        out["sort 2,000 rows (in page)"] = float(ms) / 1000
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="short runs to generate")
    parser.add_argument("--short-points", type=int, default=60, help="train records per short run")
    parser.add_argument("--points", type=int, default=100_000, help="train records of the long run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write JSON results here")
    args = parser.parse_args()

    import uvicorn

    from shipyard.compress.measure import describe_machine, machine
    from shipyard.serve.settings import ServeSettings
    from shipyard.ui import UISettings, create_ui_app

    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    try:
        start = time.perf_counter()
        for i in range(args.runs):
            make_run(work / "runs" / f"sweep-{i % 20}" / f"run-{i:05d}", i, args.short_points)
        make_run(work / "runs" / "long" / "run", 99_999, args.points)
        made = time.perf_counter() - start
        app = create_ui_app(ServeSettings(access_log=False), UISettings(runs_dir=work / "runs"))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True
        )
        thread.start()
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, timeout=600)
        rows: list[tuple[str, float, int]] = []
        cold, r = timed(lambda: client.get("/ui/api/runs"), 1)
        n_runs = len(r.json()["runs"])
        rows.append(("GET /ui/api/runs (cold: parse every run)", cold, len(r.content)))
        warm, r = timed(lambda: client.get("/ui/api/runs"), args.repeats)
        rows.append(("GET /ui/api/runs (warm: cached summaries)", warm, len(r.content)))
        series = "/ui/api/runs/long/run/series?max_points=2000"
        # the long run was parsed by the listing; a new process would parse it here
        cold, r = timed(lambda: client.get(series), 1)
        rows.append((f"GET series, {args.points:,} points → ≤2,000", cold, len(r.content)))
        warm, r = timed(lambda: client.get(series), args.repeats)
        rows.append(("GET series again", warm, len(r.content)))
        points = {k: (v["points"], len(v["x"])) for k, v in r.json()["series"].items()}
        browser = browser_times(url, "long/run", max(1, args.repeats // 2))
        server.should_exit = True
        thread.join(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{n_runs} runs ({args.runs} × {args.short_points} records + 1 × {args.points:,}), "
        f"generated in {made:.1f} s"
    )
    print(f"{'what':58} {'seconds':>9} {'bytes':>11}")
    for what, seconds, size in rows:
        print(f"{what:58} {seconds:9.3f} {size:11,}")
    print("series points (all → drawn):", points)
    if browser:
        print(f"{'in headless Chromium (navigation → interactive)':58} {'seconds':>9}")
        for what, seconds in browser.items():
            print(f"{what:58} {seconds:9.3f}")
    else:
        print("no chromium/chromedriver: browser timings skipped")
    result = {
        "machine": {**host, "load_average": os.getloadavg()},
        "runs": n_runs,
        "long_points": args.points,
        "api": [{"what": w, "seconds": s, "bytes": b} for w, s, b in rows],
        "series_points": points,
        "browser_seconds": browser,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
