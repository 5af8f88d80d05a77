"""Cross-validation folds and tuning trials grouped by the dashboard's JSON API, on a real
`shipyard cv` (2 folds) and a real `shipyard tune` study (3 trials) of examples/digits-mlp.yaml."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.ui_support import grouped_runs, read_records

from shipyard.serve.settings import ServeSettings
from shipyard.ui import UISettings, create_ui_app

CV = "digits-mlp/cv-test"
STUDY = "digits-mlp/tune-lr"


@pytest.fixture
def runs(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return Path(shutil.copytree(grouped_runs(tmp_path_factory.getbasetemp()), tmp_path / "runs"))


@pytest.fixture
def client(runs: Path, tmp_path: Path) -> Iterator[TestClient]:
    ui = UISettings(runs_dir=runs, registry_url=f"sqlite:///{tmp_path / 'r.db'}")
    with TestClient(create_ui_app(ServeSettings(access_log=False), ui)) as c:
        yield c


def best_of(run: Path) -> float:
    return max(float(r["accuracy"]) for r in read_records(run) if r["kind"] == "val")


def groups_of(client: TestClient) -> tuple[dict[str, Any], dict[str, Any]]:
    body = client.get("/ui/api/runs").json()
    return {r["id"]: r for r in body["runs"]}, {g["id"]: g for g in body["groups"]}


def test_cv_folds_are_one_group_with_mean_and_std_of_their_best(
    client: TestClient, runs: Path
) -> None:
    rows, groups = groups_of(client)
    cv = groups[CV]
    best = [best_of(runs / CV / f"fold-{i}") for i in (0, 1)]
    assert (cv["kind"], cv["k"], cv["n"], cv["metric"], cv["mode"]) == (
        "cv",
        2,
        2,
        "accuracy",
        "max",
    )
    assert cv["mean"] == pytest.approx(statistics.mean(best))
    assert cv["std"] == pytest.approx(statistics.stdev(best))  # n - 1, as shipyard cv
    assert [(m["label"], m["run"], m["value"]) for m in cv["members"]] == [
        ("fold 0", f"{CV}/fold-0", best[0]),
        ("fold 1", f"{CV}/fold-1", best[1]),
    ]
    # cv.json's own summary (the folds' final validation) is passed along
    report = json.loads((runs / CV / "cv.json").read_text())
    assert cv["complete"] is True
    assert cv["reported"] == {
        "metric": "accuracy",
        "mean": report["mean"]["accuracy"],
        "std": report["std"]["accuracy"],
    }
    assert (rows[f"{CV}/fold-1"]["group"], rows[f"{CV}/fold-1"]["member"]) == (CV, "fold 1")


def test_study_trials_are_sorted_by_value_with_the_best_marked(
    client: TestClient, runs: Path
) -> None:
    rows, groups = groups_of(client)
    study = groups[STUDY]
    recorded = json.loads((runs / STUDY / "study.json").read_text())["trials"]
    by_value = sorted(recorded, key=lambda t: -t["value"])  # accuracy: maximised
    assert [m["number"] for m in study["members"]] == [t["number"] for t in by_value]
    assert [m["value"] for m in study["members"]] == [t["value"] for t in by_value]
    assert [m["best"] for m in study["members"]] == [True, False, False]
    assert study["best_trial"] == by_value[0]["number"] and study["value"] == by_value[0]["value"]
    assert study["members"][0]["params"] == by_value[0]["params"]
    assert (study["study"], study["trials"], study["mode"]) == ("lr", 3, "max")
    trial = f"{STUDY}/trial-{by_value[0]['number']:04d}"
    assert study["members"][0]["run"] == trial
    assert (rows[trial]["group"], rows[trial]["member"]) == (
        STUDY,
        f"trial {by_value[0]['number']}",
    )


def test_a_study_still_running_is_grouped_from_its_runs(client: TestClient, runs: Path) -> None:
    (runs / STUDY / "study.json").unlink()  # written only when `shipyard tune` ends
    _, groups = groups_of(client)
    study = groups[STUDY]
    values = {m["number"]: m["value"] for m in study["members"]}
    assert values == {n: best_of(runs / STUDY / f"trial-{n:04d}") for n in (0, 1, 2)}
    assert study["complete"] is False and study["members"][0]["best"] is True
    assert study["members"][0]["value"] == max(values.values())
    # without the study's record, the parameters are the settings in which the trials differ
    assert set(study["members"][0]["params"]) == {"optim.lr"}


def test_a_cross_validated_study_nests_cv_groups_in_the_trials(
    client: TestClient, runs: Path
) -> None:
    # `tune.cv_folds` writes tune-STUDY/trial-NNNN/fold-<i>: copies of the real cv stand in
    nested = runs / "digits-mlp" / "tune-cv"
    for n in (0, 1):
        shutil.copytree(runs / CV, nested / f"trial-{n:04d}")
    fold = nested / "trial-0001" / "fold-0" / "metrics.jsonl"
    records = read_records(fold.parent)
    for r in records:
        if r["kind"] == "val":
            r["accuracy"] = 0.99
    fold.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, groups = groups_of(client)
    study = groups["digits-mlp/tune-cv"]
    assert [(m["label"], m["group"], m["run"]) for m in study["members"]] == [
        ("trial 1", "digits-mlp/tune-cv/trial-0001", None),  # its fold 0 now scores 0.99
        ("trial 0", "digits-mlp/tune-cv/trial-0000", None),
    ]
    inner = groups["digits-mlp/tune-cv/trial-0001"]
    assert (inner["kind"], inner["parent"], inner["member"]) == ("cv", study["id"], "trial 1")
    assert (
        study["members"][0]["value"]
        == inner["mean"]
        == pytest.approx((0.99 + best_of(runs / CV / "fold-1")) / 2)
    )
    assert rows["digits-mlp/tune-cv/trial-0001/fold-0"]["group"] == inner["id"]


def test_compare_a_group_expands_to_its_runs_and_names_their_groups(client: TestClient) -> None:
    body = client.get(f"/ui/api/compare?group={CV}").json()
    assert [r["id"] for r in body["runs"]] == [f"{CV}/fold-0", f"{CV}/fold-1"]
    assert body["differences"] == {"data.folds.index": [0, 1]}
    (group,) = body["groups"]
    assert group["id"] == CV and group["compared"] == [f"{CV}/fold-0", f"{CV}/fold-1"]

    # a study: its trials' runs, best first; with a run beside it, both groups are listed
    both = client.get(f"/ui/api/compare?group={STUDY}&run={CV}/fold-0").json()
    _, groups = groups_of(client)
    order = [m["run"] for m in groups[STUDY]["members"]]
    assert [r["id"] for r in both["runs"]] == [f"{CV}/fold-0", *order]
    assert {g["id"]: g["compared"] for g in both["groups"]} == {
        CV: [f"{CV}/fold-0"],
        STUDY: order,
    }
    assert set(both["differences"]) >= {"optim.lr", "data.folds"}

    r = client.get("/ui/api/compare?group=digits-mlp/nope")
    assert r.status_code == 400
    assert r.json()["error"].startswith("no cv or tune group 'digits-mlp/nope'; groups: ")
    assert CV in r.json()["error"]


def test_plain_runs_have_no_group(client: TestClient, runs: Path) -> None:
    shutil.copytree(runs / CV / "fold-0", runs / "digits-mlp" / "plain")
    rows, groups = groups_of(client)
    assert (rows["digits-mlp/plain"]["group"], rows["digits-mlp/plain"]["member"]) == (None, None)
    assert set(groups) == {CV, STUDY}
