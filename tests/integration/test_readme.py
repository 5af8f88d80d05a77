"""Every command of the README's "What you get" block, run for real in order.

Training commands get `--set` overrides that shorten them (the README's full runs are the
quickstart's job); `RUN-ID`, `$KEY` and the server address are filled in as a user would.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.conftest import ROOT

from shipyard.serve.launch import start_server, stop_server

pytestmark = pytest.mark.integration

SHORTER = {
    "examples/digits-mlp.yaml": ["--set", "train.epochs=4", "--set", "schedule.warmup_steps=5"],
    "examples/digits-tune.yaml": ["--set", "train.epochs=1"],
    "examples/gpt-tiny.yaml": [
        "--set", "train.max_steps=20", "--set", "schedule.warmup_steps=2",
        "--set", "data.max_chars=60000", "--set", "data.tokenizer.kind=byte",
        "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.block_size=96",
        "--set", "eval.every_steps=10",
    ],
}  # fmt: skip


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## What you get", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        line = line.split("  #", 1)[0].rstrip() if not line.startswith("#") else ""
        if not line:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_readme_lifecycle(tmp_path: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 12
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHIPYARD_HOME": str(tmp_path / "home")}
    server: subprocess.Popen[str] | None = None
    url = "http://localhost:8000"
    key = ""

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
        )
        assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout}\n{out.stderr}"
        return out

    def run_id(name: str) -> str:
        runs = sorted((tmp_path / "runs" / name).iterdir())
        return runs[-1].name

    try:
        for command in commands:
            argv = shlex.split(command.replace("$KEY", key))
            for name in ("digits-mlp", "gpt-tiny"):
                if (tmp_path / "runs" / name).is_dir():
                    argv = [a.replace(f"{name}/RUN-ID", f"{name}/{run_id(name)}") for a in argv]
            if argv[0] == "curl":
                argv = [a.replace("localhost:8000", url.removeprefix("http://")) for a in argv]
                target = "http://" + next(a for a in argv if "/v1/models/" in a)
                data = argv[argv.index("-d") + 1]
                auth = argv[argv.index("-H") + 1].split(": ", 1)[1]
                response = httpx.post(target, content=data, headers={"Authorization": auth})
                assert response.status_code == 200, response.text
                assert response.json()["predictions"][0]["label"] == "0"
                continue
            assert argv[0] == "shipyard", command
            expanded = []
            for a in argv[1:]:  # the shell's glob expansion
                hits = sorted(glob.glob(a, root_dir=tmp_path)) if "*" in a else []
                expanded += hits or [a]
            argv = [sys.executable, "-m", "shipyard", *expanded]
            if argv[3] in ("train", "cv", "tune"):
                argv += SHORTER[argv[4]] + (["--no-progress"] if argv[3] != "tune" else [])
            if argv[3] == "cv":  # five folds: two epochs each show the same thing
                argv += ["--set", "train.epochs=2"]
            if argv[3] == "serve":
                server, url = start_server([*argv, "--port", "0"], cwd=tmp_path, env=env)
                continue
            out = run(argv)
            if argv[3:5] == ["api-keys", "add"]:
                key = re.search(r"sy_[0-9a-f]{8}_\S+", out.stdout + out.stderr).group(0)  # type: ignore[union-attr]
            if argv[3] == "generate":
                assert out.stdout.strip(), "generate printed no text"
    finally:
        if server is not None:
            stop_server(server)
    report = json.loads((tmp_path / "digits-small" / "report.json").read_text())
    assert "child" in report and "parent" in report
    assert (tmp_path / "digits-onnx" / "manifest.json").is_file()
    assert json.loads((tmp_path / "digits-cv" / "cv.json").read_text())["k"] == 5
    assert (tmp_path / "runs" / "digits-tune" / "tune-digits-tune" / "best.yaml").is_file()
