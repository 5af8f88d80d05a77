"""LoRA fine-tuning end to end: a pretrained GPT package → LoRA run on new text → package with
the adapter → PEFT export that `peft` loads on the `transformers` base with the same logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.lm_support import lm_package
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.compress import export
from shipyard.config import load_config
from shipyard.errors import ShipyardError
from shipyard.models.lora import LoRALinear, adapter_state_dict
from shipyard.package import load_package, manifest_sha256, verify_package
from shipyard.train import build_data_and_model, evaluate_model, fit

pytestmark = pytest.mark.integration

PHRASE = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm_package(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fox")
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(PHRASE * (20 + i), encoding="utf-8")
    return root


def _config(base: Path, corpus: Path, **finetune: Any) -> dict[str, Any]:
    return {
        "name": "fox-lora",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": str(corpus / "*.txt"),
            "format": "text",
            "splits": {"train": 0.8, "val": 0.1, "test": 0.1},
            "sampling": "random",
        },
        "model": {"name": "pretrained", "path": str(base)},
        "finetune": {
            "method": "lora",
            "rank": 4,
            "alpha": 32,
            "targets": ["c_attn", "c_fc"],
            **finetune,
        },
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "train": {"epochs": None, "max_steps": 100, "batch_size": 8, "log_every": 1000},
        "eval": {"every_steps": 1000, "max_batches": 2},
    }


@pytest.fixture(scope="module")
def lora_run(base: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = load_config(_config(base, corpus))
    return fit(config, run_dir=tmp_path_factory.mktemp("lora") / "run", progress=False)


def test_lora_run_learns_the_new_text_training_few_parameters(
    base: Path, corpus: Path, lora_run: Any
) -> None:
    summary = lora_run.summary
    assert summary["trainable_parameters"] < 0.05 * summary["parameters"]
    config = load_config(_config(base, corpus, method="full"))
    data, _ = build_data_and_model(config)
    base_loss = evaluate_model(load_package(base).model, data, "test", config)["loss"]
    tuned_loss = lora_run.metrics["test"]["loss"]
    # measured: 3.31 -> ~2.0 nats per byte (a 2-layer, 64-wide base; rank-4 adapters)
    assert tuned_loss < 0.7 * base_loss, (tuned_loss, base_loss)


def test_package_keeps_the_adapter_and_the_base_fingerprint(base: Path, lora_run: Any) -> None:
    pkg = lora_run.run_dir / "package"
    manifest = verify_package(pkg)
    assert manifest.lora is not None
    assert manifest.lora.layers == [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
    ]
    assert manifest.lora.base.manifest_sha256 == manifest_sha256(base)
    entry = verify_package(base).files["model.safetensors"]
    assert manifest.lora.base.weights_hash == f"{entry.algorithm}:{entry.digest}"
    assert manifest.lineage.parent is not None and manifest.lineage.parent.name == "tiny-lm"
    assert manifest.architecture.name == "gpt"  # the base's architecture, not "pretrained"
    loaded = load_package(pkg)
    assert sum(isinstance(m, LoRALinear) for m in loaded.model.modules()) == 4
    # starting a new run from an unmerged adapter package is refused with the fix
    with pytest.raises(ShipyardError, match="unmerged LoRA adapter"):
        build_data_and_model(
            load_config({**_config(pkg, pkg), "model": {"name": "pretrained", "path": str(pkg)}})
        )


def test_peft_loads_the_export_on_the_transformers_base(
    base: Path, lora_run: Any, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pkg = lora_run.run_dir / "package"
    base_hf, _ = export(base, tmp_path / "base-hf", format="hf")
    adapter = tmp_path / "adapter"
    cli = CliRunner().invoke(app, ["export", str(pkg), "--format", "peft", "-o", str(adapter)])
    assert cli.exit_code == 0, cli.output
    assert "exported peft adapter" in cli.output and "4 layers" in cli.output
    merged_hf, _ = export(pkg, tmp_path / "merged-hf", format="hf")
    ids = torch.tensor([list(range(40, 72)), list(range(72, 104))])
    with torch.inference_mode():
        ours = load_package(pkg).model(ids)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_hf).eval()
        plain = hf_base(ids).logits
        with_adapter = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
        theirs = with_adapter(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_hf).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-4)
    assert float((plain - ours).abs().max()) > 1e-2  # the adapter does change the model


def test_peft_export_needs_an_adapter(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ShipyardError, match="holds no LoRA adapter"):
        export(base, tmp_path / "x", format="peft")
    args = ["export", str(base), "--format", "peft", "-o", str(tmp_path / "y")]
    cli = subprocess.run(  # the console script: project errors are one line and exit 2
        [sys.executable, "-m", "shipyard", *args],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "holds no LoRA adapter" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and not (tmp_path / "y").exists()


def test_lora_run_resumes_exactly(base: Path, corpus: Path, tmp_path: Path) -> None:
    straight = fit(
        load_config(
            _config(base, corpus), ["train.max_steps=12", "train.checkpoint.every_steps=6"]
        ),
        run_dir=tmp_path / "straight",
        progress=False,
    )
    first = fit(
        load_config(_config(base, corpus), ["train.max_steps=6", "train.checkpoint.every_steps=6"]),
        run_dir=tmp_path / "resumed",
        progress=False,
    )
    resumed = fit(
        load_config(
            _config(base, corpus), ["train.max_steps=12", "train.checkpoint.every_steps=6"]
        ),
        run_dir=first.run_dir,
        resume="auto",
        progress=False,
    )
    assert resumed.resumed_from == 6
    a = adapter_state_dict(load_package(straight.run_dir / "package").model)
    b = adapter_state_dict(load_package(resumed.run_dir / "package").model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
