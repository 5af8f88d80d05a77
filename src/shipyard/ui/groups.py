"""Cross-validation folds and tuning trials, grouped: what the runs and compare pages fold together.

`shipyard cv` and `shipyard tune` write ordinary run directories, named so their group shows in
the path (see `shipyard.tuning`):

    NAME/cv-STAMP/fold-<i>/          one cross-validation; cv.json beside the folds when it ended
    NAME/cv-STAMP/final/             the optional run on every fold (not part of mean ± std)
    NAME/tune-STUDY/trial-NNNN/      one trial of a study; study.json beside them when it ended
    NAME/tune-STUDY/trial-NNNN/fold-<i>/   a cross-validated trial (tune.cv_folds)

A group is found from those names alone, so a cv or study still running is grouped too; cv.json
and study.json, when present, add what only they know (the study's trial values, states and
parameters, failed trials without a run). A cv group's value is the mean ± sample standard
deviation (n - 1, as `shipyard cv`) of its folds' best validation value of the watched metric;
a study's trials are sorted by value, best first, and the best trial is marked.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from shipyard.ui.runs import RunStore, config_diff

FOLD_RE = re.compile(r"fold-(\d+)")
TRIAL_RE = re.compile(r"trial-(\d+)")
CV_FILE = "cv.json"
STUDY_FILE = "study.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _value(row: dict[str, Any]) -> float | None:
    best = row.get("best")
    return (
        float(best["value"]) if isinstance(best, dict) and best.get("value") is not None else None
    )


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; 0 for one value) as `shipyard cv` reports."""
    if not values:
        return None, None
    mu = sum(values) / len(values)
    n = len(values)
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mu, sd


def group_runs(store: RunStore, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Find the cv and tune groups among `rows` (summaries from `RunStore.list_runs`).

    Sets `group` (the innermost group's id, or None) and `member` (e.g. "fold 0", "trial 3") on
    each row in place, and returns the groups, each
    `{id, kind: cv|tune, name, parent, metric, mode, ...}` (see docs/ui.md).
    """
    by_id = {r["id"]: r for r in rows}
    cv_members: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    cv_final: dict[str, str] = {}
    tune_members: dict[str, dict[int, str]] = {}  # study dir id -> trial number -> run id
    for row in rows:
        row.setdefault("group", None)
        row.setdefault("member", None)
        parts = row["id"].split("/")
        if len(parts) < 2:
            continue
        leaf, parent = parts[-1], "/".join(parts[:-1])
        fold = FOLD_RE.fullmatch(leaf)
        trial = TRIAL_RE.fullmatch(leaf)
        if fold:
            cv_members.setdefault(parent, []).append((int(fold.group(1)), row))
        elif trial and parts[-2].startswith("tune-"):
            tune_members.setdefault(parent, {})[int(trial.group(1))] = row["id"]
    for row in rows:  # a final run belongs to its cv only when the cv has folds
        parts = row["id"].split("/")
        if parts[-1] == "final" and "/".join(parts[:-1]) in cv_members:
            cv_final["/".join(parts[:-1])] = row["id"]

    groups: dict[str, dict[str, Any]] = {}
    for gid, members in cv_members.items():
        members.sort(key=lambda m: m[0])
        groups[gid] = _cv_group(store, gid, members, by_id.get(cv_final.get(gid, "")))
    # a cross-validated trial: trial-NNNN is itself a cv group inside the study
    for gid in list(groups):
        parts = gid.split("/")
        trial = TRIAL_RE.fullmatch(parts[-1])
        if trial and len(parts) >= 2 and parts[-2].startswith("tune-"):
            tune_members.setdefault("/".join(parts[:-1]), {})[int(trial.group(1))] = gid
    for gid, trials in tune_members.items():
        groups[gid] = _tune_group(store, gid, trials, by_id, groups)

    for group in groups.values():
        for m in group["members"]:
            target = by_id.get(m["run"]) if m.get("run") else groups.get(m.get("group") or "")
            if target is None:
                continue
            if "kind" in target:  # a nested group
                target["parent"] = group["id"]
                target["member"] = m["label"]
            else:
                target["group"] = group["id"]
                target["member"] = m["label"]
    return sorted(groups.values(), key=lambda g: g["id"])


def _cv_group(
    store: RunStore,
    gid: str,
    members: list[tuple[int, dict[str, Any]]],
    final: dict[str, Any] | None,
) -> dict[str, Any]:
    first = members[0][1]
    metric, mode = first["metric"], first["mode"]
    values = [v for _, r in members if (v := _value(r)) is not None]
    mean, std = mean_std(values)
    report = _read_json(store.root / gid / CV_FILE)
    reported = None
    if report is not None:
        key = report.get("metric")
        means, stds = report.get("mean") or {}, report.get("std") or {}
        if isinstance(means, dict) and isinstance(stds, dict) and key in means and key in stds:
            reported = {"metric": key, "mean": means[key], "std": stds[key]}
    if final is not None:
        final["group"], final["member"] = gid, "final"
    k = report.get("k") if report is not None else None
    return {
        "id": gid,
        "kind": "cv",
        "name": first["name"],
        "label": gid.split("/")[-1],
        "parent": None,
        "member": None,
        "metric": metric,
        "mode": mode,
        "k": k if isinstance(k, int) else len(members),
        "n": len(values),
        "mean": mean,
        "std": std,
        "value": mean,
        "complete": report is not None,
        "reported": reported,
        "final": final["id"] if final is not None else None,
        "status": _group_status([r for _, r in members]),
        "started": min((r["started"] for _, r in members if r.get("started")), default=None),
        "members": [
            {"label": f"fold {i}", "fold": i, "run": r["id"], "value": _value(r)}
            for i, r in members
        ],
    }


def _tune_group(
    store: RunStore,
    gid: str,
    trials: dict[int, str],
    by_id: dict[str, dict[str, Any]],
    groups: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    study = _read_json(store.root / gid / STUDY_FILE)
    rows_of = {n: by_id.get(t) or groups.get(t) for n, t in trials.items()}
    some = next((r for r in rows_of.values() if r is not None), {})
    metric, mode = some.get("metric", "loss"), some.get("mode", "min")
    recorded: dict[int, dict[str, Any]] = {}
    if study is not None:
        direction = study.get("direction")
        if direction in ("maximize", "minimize"):
            mode = "max" if direction == "maximize" else "min"
        metric = str(study.get("metric") or metric)
        for t in study.get("trials") or []:
            if isinstance(t, dict) and isinstance(t.get("number"), int):
                recorded[t["number"]] = t
    params_of = _trial_params(store, trials, by_id) if study is None else {}
    members: list[dict[str, Any]] = []
    for number in sorted(set(trials) | set(recorded)):
        ref = trials.get(number)
        row = rows_of.get(number)
        t = recorded.get(number, {})
        nested = ref is not None and ref in groups
        value = t.get("value")
        if value is None and row is not None:
            value = row.get("value") if nested else _value(row)
        if t:
            state = str(t.get("state"))
        elif row is None:
            state = "unknown"
        else:
            state = "COMPLETE" if row.get("status") == "finished" else str(row["status"]).upper()
        members.append(
            {
                "label": f"trial {number}",
                "number": number,
                "run": ref if ref is not None and not nested else None,
                "group": ref if nested else None,
                "state": state,
                "value": float(value) if isinstance(value, int | float) else None,
                "params": t.get("params") if t else params_of.get(number, {}),
                "error": t.get("error"),
                "best": False,
            }
        )
    sign = -1.0 if mode == "max" else 1.0
    members.sort(key=lambda m: (m["value"] is None, sign * (m["value"] or 0.0), m["number"]))
    best = next((m for m in members if m["value"] is not None and m["state"] == "COMPLETE"), None)
    if best is not None:
        best["best"] = True
    rows = [r for r in rows_of.values() if r is not None]  # runs and nested cv groups
    return {
        "id": gid,
        "kind": "tune",
        "name": some.get("name", gid.split("/")[0]),
        "label": gid.split("/")[-1],
        "study": study.get("study") if study is not None else gid.split("/")[-1][len("tune-") :],
        "parent": None,
        "member": None,
        "metric": metric,
        "mode": mode,
        "trials": len(members),
        "value": best["value"] if best is not None else None,
        "best_trial": best["number"] if best is not None else None,
        "complete": study is not None,
        "status": _group_status(rows) if rows else "finished",
        "started": min((r["started"] for r in rows if r.get("started")), default=None),
        "members": members,
    }


def _trial_params(
    store: RunStore, trials: dict[int, str], by_id: dict[str, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Without study.json (a study still running): the settings in which the trials differ."""
    numbers = [n for n, ref in trials.items() if ref in by_id]
    if len(numbers) < 2:
        return {}
    configs = [store.config(store.root / trials[n]) for n in numbers]
    diff = config_diff(configs)
    return {n: {k: vals[i] for k, vals in diff.items()} for i, n in enumerate(numbers)}


def _group_status(rows: list[dict[str, Any]]) -> str:
    statuses = {r.get("status") for r in rows}
    if "running" in statuses:
        return "running"
    return "finished" if statuses <= {"finished"} else "stopped"


def expand_groups(groups: list[dict[str, Any]], wanted: list[str], limit: int) -> list[str]:
    """Run ids of the groups in `wanted` (a cv: its folds; a study: its trials' runs, best
    first, whole trials only, until `limit`). Raises KeyError naming an unknown group."""
    by_id = {g["id"]: g for g in groups}
    out: list[str] = []

    def runs_of(g: dict[str, Any]) -> list[str]:
        ids: list[str] = []
        for m in g["members"]:
            if m.get("run"):
                ids.append(m["run"])
            elif m.get("group") in by_id:
                ids.extend(runs_of(by_id[m["group"]]))
        return ids

    for gid in wanted:
        if gid not in by_id:
            raise KeyError(gid)
        group = by_id[gid]
        if group["kind"] == "cv":
            out.extend(runs_of(group))
            continue
        for m in group["members"]:
            nested = by_id.get(m.get("group") or "")
            ids = [m["run"]] if m.get("run") else (runs_of(nested) if nested else [])
            if not ids:
                continue
            if len(out) + len(ids) > limit:
                break
            out.extend(ids)
    return list(dict.fromkeys(out))
