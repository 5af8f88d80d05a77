"""The published OpenAPI document against the real server: Schemathesis, every check, every phase.

One uvicorn server serves a trained digits classifier and a trained tiny GPT. Schemathesis reads
`/openapi.json` and sends what it derives from it (examples, boundary cases, random and
deliberately invalid bodies, then stateful sequences): every answer must be documented (status,
media type, body schema), invalid data must be refused, and nothing may answer 5xx.

The V2 and simple routes are pointed at the classifier, the OpenAI routes at the language model
(Schemathesis' parameter overrides), so the fuzzed requests reach the models rather than 404.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ROOT
from tests.lm_support import lm_package
from tests.serve_support import digits_inputs, digits_package, running_server

from shipyard.serve import ServeSettings, create_app

pytestmark = pytest.mark.integration

# A JSON Schema cannot say that a tensor's data must match its shape and the model's signature,
# or that a prompt plus max_tokens must fit the model's context: on these routes a schema-valid
# body may still be a 400 (which names the field). Every other check keeps its defaults.
_CONFIG = """
[[operations]]
include-path-regex = "^/v[12]/models/.model_name.(/versions/.version.)?(/infer|:predict|/ready)?$"
parameters = {{ "path.model_name" = "{classifier}", "path.version" = "{classifier_version}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]

# Unloading the model under test would leave the rest of the run nothing to reach.
[[operations]]
include-path-regex = "^/v2/admin/models/"
parameters = {{ "path.model_name" = "{classifier}", "path.version" = "not-loaded" }}

[[operations]]
include-path-regex = "^/v1/models/.model.$"
parameters = {{ "path.model" = "{lm}" }}

[[operations]]
include-path-regex = "^/v1/(chat/)?completions$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.getbasetemp()
    settings = ServeSettings(packages=[digits_package(base), lm_package(base)], access_log=False)
    with running_server(create_app(settings)) as url:
        yield url


def _interactions(report_dir: Path) -> dict[str, collections.Counter[int]]:
    """Status codes per operation, from Schemathesis' NDJSON report."""
    (report,) = report_dir.glob("*.ndjson")
    statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        for interaction in (finished["recorder"].get("interactions") or {}).values():
            response = interaction.get("response") or {}
            request = interaction["request"]
            path = request["uri"].split("/", 3)[-1].split("?")[0]
            statuses[f"{request['method']} /{path}"][response.get("status_code", 0)] += 1
    return statuses


def test_schemathesis_finds_nothing(url: str, tmp_path: Path) -> None:
    models = httpx.get(f"{url}/v2/admin/models").json()["models"]
    versions = {m["name"]: m["default_version"] for m in models}
    signature = httpx.get(f"{url}/v2/models/digits").json()
    data = {
        "classifier": "digits",
        "classifier_version": versions["digits"],
        "lm": "tiny-lm",
        "input": signature["inputs"][0]["name"],
        "row": digits_inputs(1).reshape(-1).tolist(),
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
        "SHIPYARD_CONTRACT_DATA": json.dumps(data),
    }
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        _CONFIG.format(classifier="digits", classifier_version=versions["digits"], lm="tiny-lm")
    )
    reports = tmp_path / "reports"
    cli: list[str] = [sys.executable, "-m", "schemathesis.cli"]
    out = subprocess.run(
        [
            *cli,
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "5",
            "--workers",
            "1",
            "--seed",
            "1",
            "--report",
            "ndjson",
            "--report-dir",
            str(reports),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # its cache of past failures stays out of the repository
        env=env,
    )
    summary = out.stdout[out.stdout.rfind("SUMMARY") :]
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary
    statuses = _interactions(reports)
    assert not [(op, code) for op, counts in statuses.items() for code in counts if code >= 500], (
        statuses
    )
    # the generated requests reached both models, not only their error paths
    reached: dict[str, Any] = {op: counts[200] for op, counts in statuses.items()}
    for op in (
        "POST /v2/models/digits/infer",
        "POST /v1/models/digits:predict",
        "POST /v1/completions",
        "POST /v1/chat/completions",
    ):
        assert reached.get(op, 0) > 0, (op, dict(statuses.get(op, {})))
