"""Evaluation: streaming metrics per batch, and reports (JSON + Markdown + PNG plots)."""

from __future__ import annotations

from shipyard.evaluate.metrics import (
    EvaluateError,
    MetricSet,
    build_metrics,
    format_metrics,
    primary_metric,
)
from shipyard.evaluate.report import read_history, write_report

__all__ = [
    "EvaluateError",
    "MetricSet",
    "build_metrics",
    "format_metrics",
    "primary_metric",
    "read_history",
    "write_report",
]
