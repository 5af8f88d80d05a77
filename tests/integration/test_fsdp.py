"""FSDP2 on CPU with torchrun + gloo: same losses as one process, 1/N of the state per rank, and
a run killed on one number of processes resumes on another with the same trajectory. A tiny
Llama-family model (blocks found generically at `model.layers`, tied embeddings) and the GPT
(blocks found at `transformer.h`, with activation checkpointing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.package import manifest_sha256, verify_package
from shipyard.train import fit
from shipyard.train.checkpoint import list_checkpoints

STEPS = 20
KILL_AT = 10

CONFIG: dict[str, Any] = {
    "name": "fsdp-tiny",
    "seed": 0,
    "task": "language-modeling",
    "data": {
        "source": "builtin:python-stdlib",
        "max_chars": 20000,
        "tokenizer": {"kind": "byte"},
        "sampling": "random",
    },
    "model": {
        "name": "llama",
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 16,
        "tie_word_embeddings": True,
    },
    "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "schedule": {"name": "cosine", "warmup_steps": 3},
    "regularization": {"grad_clip_norm": 1.0},
    "train": {
        "epochs": None,
        "max_steps": STEPS,
        "batch_size": 12,
        "micro_batch_size": 4,
        "log_every": 1,
        "strategy": "fsdp",
        "checkpoint": {"every_steps": KILL_AT},
    },
    "eval": {"every_steps": STEPS, "max_batches": 2},
}


GPT = {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16}


def write_config(tmp_path: Path, model: dict[str, Any] | None = None, **train: Any) -> Path:
    raw = json.loads(json.dumps(CONFIG))
    raw["train"].update(train)
    if model is not None:
        raw["model"] = model
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]


def shipyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard", *args, "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def torchrun_killed(config: Path, run_dir: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    """Train under torchrun and os._exit every rank right after step KILL_AT's checkpoint."""
    script = run_dir.parent / f"killed-{nproc}.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from shipyard.config import load_config
            from shipyard.train import fit

            def die(info):
                if info.step == {KILL_AT}:
                    os._exit(137)  # no clean-up at all, like a kill -9

            fit(load_config({str(config)!r}), run_dir={str(run_dir)!r}, callbacks=[die])
            """
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*cmd, f"--nproc-per-node={nproc}", str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict[str, Any]]:
    """One plain process (no sharding): the trajectory every FSDP run of the Llama must follow."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_config(tmp, strategy="ddp"))
    result = fit(cfg, run_dir=tmp / "run")
    return losses(result.run_dir), result.summary["memory"]


@pytest.fixture(scope="module")
def gpt_reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    tmp = tmp_path_factory.mktemp("gpt-reference")
    cfg = load_config(write_config(tmp, GPT, strategy="ddp"))
    return losses(fit(cfg, run_dir=tmp / "run").run_dir)


def assert_same(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= rel * abs(x), (a, b)


def test_fsdp_three_processes_match_one_and_shard_the_state(
    tmp_path: Path, reference: tuple[list[float], dict[str, Any]]
) -> None:
    ref_losses, ref_memory = reference
    run = tmp_path / "three"
    out = shipyard("train", str(write_config(tmp_path)), "--nproc", "3", "--run-dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same(ref_losses, losses(run), 1e-5)
    report = json.loads((run / "report.json").read_text())["run"]
    assert report["strategy"] == "fsdp" and report["processes"] == 3
    memory = report["memory"]
    total = ref_memory["max_bytes"]  # the whole state, in one process
    assert len(memory["per_rank_bytes"]) == 3
    for value in memory["per_rank_bytes"]:
        assert 0.30 * total <= value <= 0.37 * total, (value, total)
    assert memory["max_bytes"] == max(memory["per_rank_bytes"])
    assert memory["per_rank_bytes"][memory["max_rank"]] == memory["max_bytes"]
    # the package is plain safetensors: no DCP (pickled) file in it
    package = run / "package"
    assert (package / "model.safetensors").is_file()
    assert not [p for p in package.rglob("*") if p.name == ".metadata" or p.suffix == ".distcp"]


def test_fsdp_killed_on_two_resumes_on_three_and_on_one(
    tmp_path: Path, reference: tuple[list[float], dict[str, Any]]
) -> None:
    ref_losses, _ = reference
    config = write_config(tmp_path)
    killed = tmp_path / "killed"
    out = torchrun_killed(config, killed, 2)
    assert out.returncode != 0
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step-00000010"]
    assert_same(ref_losses[:KILL_AT], losses(killed), 1e-5)  # two processes match one
    on_three, on_one = tmp_path / "on-three", tmp_path / "on-one"
    shutil.copytree(killed, on_three)
    shutil.copytree(killed, on_one)
    out = shipyard(
        "train", str(config), "--nproc", "3", "--run-dir", str(on_three), "--resume", "auto"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same(ref_losses, losses(on_three), 1e-4)
    result = fit(load_config(config), run_dir=on_one, resume="auto")  # fsdp on one process
    assert result.resumed_from == KILL_AT
    assert_same(ref_losses, losses(on_one), 1e-4)


def test_fsdp_gpt_with_activation_checkpointing_killed_on_one_resumes_on_two(
    tmp_path: Path, gpt_reference: list[float]
) -> None:
    ref_losses = gpt_reference
    config = write_config(tmp_path, GPT, activation_checkpointing=True)
    killed = tmp_path / "killed"
    out = torchrun_killed(config, killed, 1)
    assert out.returncode != 0
    assert_same(ref_losses[:KILL_AT], losses(killed), 1e-5)
    out = shipyard(
        "train", str(config), "--nproc", "2", "--run-dir", str(killed), "--resume", "auto"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same(ref_losses, losses(killed), 1e-4)


LORA = {"method": "lora", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj", "down_proj"]}
LORA_STEPS = 6


@pytest.fixture(scope="module")
def lora_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run (fsdp) on the tiny Llama, trained one step and packaged as its base."""
    tmp = tmp_path_factory.mktemp("lora-base")
    raw = json.loads(json.dumps(CONFIG))
    raw.pop("schedule")  # one step: no room for warm-up
    raw["train"].update(strategy="ddp", max_steps=1, checkpoint={"every_steps": 100})
    base = fit(load_config(raw), run_dir=tmp / "base").run_dir / "package"
    raw = json.loads(json.dumps(CONFIG))
    raw["name"] = "fsdp-lora"
    raw["data"].pop("tokenizer")  # the base brings its own
    raw["model"] = {"name": "pretrained", "path": str(base)}
    raw["finetune"] = LORA
    raw["schedule"]["warmup_steps"] = 2
    raw["train"].update(max_steps=LORA_STEPS, checkpoint={"every_steps": 100})
    raw["eval"]["every_steps"] = LORA_STEPS
    path = tmp / "lora.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_fsdp_lora_on_two_processes_matches_one_and_packages_the_adapter(
    tmp_path: Path, lora_config: Path
) -> None:
    config = load_config(lora_config)
    one = fit(
        config.model_copy(update={"train": config.train.model_copy(update={"strategy": "ddp"})}),
        run_dir=tmp_path / "one",
    )
    two = tmp_path / "two"
    out = shipyard("train", str(lora_config), "--nproc", "2", "--run-dir", str(two))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same(losses(one.run_dir), losses(two), 1e-5)
    report = json.loads((two / "report.json").read_text())["run"]
    assert report["strategy"] == "fsdp" and report["processes"] == 2
    assert report["trainable_parameters"] == one.summary["trainable_parameters"]
    # the frozen base is sharded too: each rank holds about half of the one-process state
    for value in report["memory"]["per_rank_bytes"]:
        assert (
            0.45 * one.summary["memory"]["max_bytes"]
            <= value
            <= 0.55 * one.summary["memory"]["max_bytes"]
        )
    # the package: the base's weights untouched, the adapters trained, the base's fingerprint
    base = Path(config.model.path)  # type: ignore[union-attr]
    manifest = verify_package(two / "package")
    assert manifest.lora is not None
    assert manifest.lora.layers == [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    assert manifest.lora.base.manifest_sha256 == manifest_sha256(base)
    ours = load_file(str(two / "package" / "model.safetensors"))
    reference = load_file(str(one.run_dir / "package" / "model.safetensors"))
    frozen = load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(reference)
    for name, tensor in frozen.items():
        assert torch.equal(ours[name], tensor), name
    adapters = [n for n in ours if n not in frozen]
    assert len(adapters) == 12 and all(".lora_" in n for n in adapters)
    for name in adapters:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6)
    assert all(float(ours[n].abs().max()) > 0 for n in adapters if n.endswith("lora_B"))
