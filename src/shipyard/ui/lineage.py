"""A registered version's lineage for the registry page: its parent version, its compression report.

A child package made by `shipyard compress` names its parent in `lineage.parent` (name, version,
manifest digest) and the absolute path of its report (`OUT/report.json`) in
`lineage.compression_report`; the registry keeps the lineage. The report is read from that path
and shown only when it is a compression report *of this version*: its `child.manifest_sha256`
must be the version's digest, so a re-compressed output or any other file at that path is never
shown (an error line says why instead).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from shipyard.compress.measure import describe_machine, report_rows
from shipyard.compress.pipeline import REPORT_LINEAGE_KEY
from shipyard.package.registry import Registry

MAX_REPORT_BYTES = 1 << 20  # a report is a few KB


def compression_report(version: dict[str, Any]) -> dict[str, Any] | None:
    """The compression report of a version (a `ModelVersion.to_dict()`), None when it has none:
    `{path, method, rows, delta, machine, parent, report}`, or `{path, error}` when it cannot be
    shown."""
    lineage = version.get("lineage") or {}
    raw = lineage.get(REPORT_LINEAGE_KEY) if isinstance(lineage, dict) else None
    if raw is None:
        return None
    path = Path(str(raw))
    if not path.is_absolute() or path.name != "report.json":
        return {"path": str(raw), "error": f"{str(raw)[:300]!r} is not a report.json path"}
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_REPORT_BYTES + 1)
    except OSError:
        return {
            "path": str(path),
            "error": f"the report is not at {path} (compressed on another machine, or moved)",
        }
    report: Any = None
    with contextlib.suppress(ValueError):
        report = json.loads(data) if len(data) <= MAX_REPORT_BYTES else None
    if not isinstance(report, dict) or not isinstance(report.get("child"), dict):
        return {"path": str(path), "error": f"{path} is not a compression report"}
    child: dict[str, Any] = report["child"]
    if child.get("manifest_sha256") != version.get("manifest_sha256"):
        return {
            "path": str(path),
            "error": f"{path} describes another package (the output was compressed again "
            "since this version was registered)",
        }
    try:
        rows = report_rows(report)
        machine = describe_machine(report["machine"])
        method = report["derivation"].get("method")
        parent = {k: report["parent"].get(k) for k in ("name", "version", "manifest_sha256")}
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError):
        return {"path": str(path), "error": f"{path} is not a complete compression report"}
    return {
        "path": str(path),
        "method": method,
        "rows": rows,
        "delta": report.get("delta"),
        "machine": machine,
        "parent": parent,
        "report": report,
    }


def registered_digests(registry: Registry) -> dict[str, dict[str, Any]]:
    """{manifest digest: {name, version}} of every registered version (to link a parent)."""
    out: dict[str, dict[str, Any]] = {}
    for model in registry.list_models():
        for v in registry.list_versions(model.name):
            out.setdefault(v.manifest_sha256, {"name": v.name, "version": v.version})
    return out


def with_lineage(
    versions: list[dict[str, Any]], digests: dict[str, dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Add `parent_version` ({name, version} of the registered parent, or None) and
    `compression` (see `compression_report`) to each version dict."""
    for v in versions:
        parent = (v.get("lineage") or {}).get("parent")
        digest = parent.get("manifest_sha256") if isinstance(parent, dict) else None
        v["parent_version"] = (digests or {}).get(digest) if isinstance(digest, str) else None
        v["compression"] = compression_report(v)
    return versions
