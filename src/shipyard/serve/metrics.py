"""Prometheus metrics. With `--workers N`, `shipyard serve` points PROMETHEUS_MULTIPROC_DIR at a
fresh directory before any worker starts, so every worker writes its samples there and `/metrics`
(whichever worker answers) aggregates all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "shipyard_requests_total",
    "HTTP requests by model, route template and status code.",
    ["model", "route", "status"],
)
LATENCY = Histogram(
    "shipyard_request_duration_seconds",
    "End-to-end request latency (first byte in to response sent).",
    ["model", "route"],
    buckets=_LATENCY,
)
QUEUE_TIME = Histogram(
    "shipyard_queue_time_seconds",
    "Time a request waited in its model's batching queue.",
    ["model"],
    buckets=_LATENCY,
)
INFERENCE_TIME = Histogram(
    "shipyard_inference_duration_seconds",
    "Duration of one batched forward pass.",
    ["model"],
    buckets=_LATENCY,
)
BATCH_SIZE = Histogram(
    "shipyard_batch_size_rows",
    "Rows per forward pass.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
BATCH_REQUESTS = Histogram(
    "shipyard_batch_requests",
    "Requests merged into one forward pass.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
IN_FLIGHT = Gauge(
    "shipyard_requests_in_flight",
    "Requests being handled now.",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "shipyard_queue_depth",
    "Requests waiting in a model's batching queue.",
    ["model", "version"],
    multiprocess_mode="livesum",
)
LOAD_TIME = Gauge(
    "shipyard_model_load_seconds",
    "Seconds it took to load and verify a model version.",
    ["model", "version"],
    multiprocess_mode="max",
)


def batch_observer(model: str) -> Callable[[int, int, float], None]:
    """A Batcher `on_batch` hook that records rows, requests and forward time for `model`."""
    rows_hist = BATCH_SIZE.labels(model=model)
    reqs_hist = BATCH_REQUESTS.labels(model=model)
    time_hist = INFERENCE_TIME.labels(model=model)

    def observe(rows: int, requests: int, seconds: float) -> None:
        rows_hist.observe(rows)
        reqs_hist.observe(requests)
        time_hist.observe(seconds)

    return observe


def depth_observer(model: str, version: str) -> Callable[[int], None]:
    """A Batcher `on_depth` hook that sets the queue-depth gauge."""
    return QUEUE_DEPTH.labels(model=model, version=version).set


def render() -> tuple[bytes, str]:
    """The exposition text (aggregated over workers in multiprocess mode) and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_exit() -> None:
    """Drop this process's live gauges from the multiprocess aggregate (worker shutdown)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
