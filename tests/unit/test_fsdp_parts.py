"""FSDP pieces that need no second process: config errors, block discovery, the safe DCP
reader, the memory estimate against a measured run, and `train --dry-run`."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tests.conftest import ROOT
from tests.unit.test_trainer import regression_config
from torch import nn

from shipyard.config import load_config
from shipyard.errors import CheckpointError, ConfigError, TrainError
from shipyard.models import GPT, GPTConfig
from shipyard.train import estimate_run_memory, fit
from shipyard.train.checkpoint import DCP_DIR, load_sharded_part
from shipyard.train.sharding import find_blocks, grad_norm, tied_names


@pytest.mark.parametrize(
    ("train", "needle"),
    [
        ({"micro_batch_size": 4, "grad_accum": 2}, "set only one"),
        ({"fsdp": {"cpu_offload": True}}, "train.strategy=fsdp"),
        ({"strategy": "fsdp", "compile": True}, "train.compile"),
        ({"strategy": "fsdp", "precision": "fp16"}, "use bf16"),
        ({"strategy": "zero3"}, "fsdp"),
    ],
)
def test_bad_fsdp_configs_are_clear_errors(train: dict[str, Any], needle: str) -> None:
    raw = regression_config()
    raw["train"].update(train)
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert needle in str(info.value)


def test_fsdp_refuses_l1_penalty_before_starting(tmp_path: Path) -> None:
    cfg = load_config(regression_config(regularization={"l1": 0.01}, train__strategy="fsdp"))
    with pytest.raises(TrainError, match="weight_decay"):
        fit(cfg, run_dir=tmp_path / "run")


def test_global_batch_larger_than_the_train_split_is_refused(tmp_path: Path) -> None:
    raw = regression_config()
    raw["train"]["batch_size"] = 500  # the global batch: more than the train split
    with pytest.raises(TrainError, match=r"lower train\.batch_size"):
        fit(load_config(raw), run_dir=tmp_path / "run")


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


class LlamaLike(nn.Module):
    """Blocks at `model.layers`, as in Hugging Face Llama, and no shard_blocks()."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(10, 4)
        self.model.layers = nn.ModuleList([Layer() for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])  # mixed: not blocks


def test_block_discovery_is_generic_and_ties_are_found() -> None:
    model = LlamaLike()
    assert find_blocks(model) == list(model.model.layers)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8), vocab_size=11)
    assert find_blocks(gpt) == list(gpt.transformer.h)
    assert tied_names(gpt) == {"lm_head.weight": "transformer.wte.weight"}
    assert find_blocks(nn.Sequential(nn.Linear(2, 2))) == []


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def test_dcp_metadata_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    (tmp_path / DCP_DIR).mkdir()
    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"posix\.system is not allowed|not allowed"):
        load_sharded_part(tmp_path, {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="strategy fsdp"):
        load_sharded_part(tmp_path / "nothing", {})


def test_grad_norm_of_plain_tensors_is_the_l2_norm_of_every_gradient() -> None:
    # the trainer logs this norm for unsharded models too
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, bias=False))
    grads = [torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([4.0, 0.0]), None]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    assert float(grad_norm(model)) == pytest.approx(5.0)


def test_dcp_metadata_with_a_pickled_bytes_entry_is_refused(tmp_path: Path) -> None:
    # allowed classes only, but a bytes entry would be unpickled by DCP's own reader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    (tmp_path / DCP_DIR).mkdir()
    metadata = Metadata(state_dict_metadata={"extra": BytesStorageMetadata()})
    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="entry 'extra' is pickled bytes"):
        load_sharded_part(tmp_path, {"model": {"w": torch.zeros(2)}})


def test_estimate_matches_the_measured_state(tmp_path: Path) -> None:
    cfg = load_config(regression_config(model={"name": "mlp", "hidden_sizes": [16]}))
    measured = fit(cfg, run_dir=tmp_path / "run").summary["memory"]
    est = estimate_run_memory(cfg, processes=1).items
    state = est["params (fp32)"] + est["grads (fp32)"] + est["optimizer state"]
    # the optimizer's scalar step counters are the only difference
    assert abs(state - measured["max_bytes"]) <= 16 * len(measured["per_rank_bytes"]) * 8
    fsdp = estimate_run_memory(
        load_config(regression_config(train__strategy="fsdp")), processes=2
    ).items
    assert fsdp["params (fp32 shards)"] * 2 >= est["params (fp32)"]
    assert fsdp["params (fp32 shards)"] * 2 <= est["params (fp32)"] + 8


def test_dry_run_prints_the_estimate_and_trains_nothing(tmp_path: Path) -> None:
    raw = regression_config(train__strategy="fsdp", train__activation_checkpointing=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "shipyard", "train", str(path), "--nproc", "2", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
    )
    assert out.returncode == 0, out.stderr
    est = json.loads(out.stdout.strip().splitlines()[-1])
    assert est["strategy"] == "fsdp" and est["processes"] == 2 and est["micro_batch"] == 8
    assert est["device_total_bytes"] > 0
    assert not (tmp_path / "runs").exists()


def test_fsdp_on_one_process_restores_the_best_weights_at_the_end(tmp_path: Path) -> None:
    # a model without repeated blocks (one FSDP group) and a learning rate far too high, so
    # validation gets worse and the run ends on an earlier, better step's weights
    cfg = regression_config(
        model={"name": "mlp", "hidden_sizes": [8], "dropout": 0.0},
        optim={"name": "sgd", "lr": 0.5, "momentum": 0.9},
        schedule={"name": "constant"},
        train={"epochs": None, "max_steps": 12, "batch_size": 16, "strategy": "fsdp"},
        eval={"every_steps": 2},
    )
    result = fit(load_config(cfg), run_dir=tmp_path / "run")
    assert result.best_step is not None and result.best_step < 12
    vals = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "val"
    ]
    best = next(v for v in vals if v["step"] == result.best_step)
    assert result.metrics["val"]["loss"] == pytest.approx(best["loss"], rel=1e-6)
