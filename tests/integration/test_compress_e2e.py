"""Compression and export end to end: a digits MLP and a tiny GPT, trained once per session, are
quantized, pruned, distilled and exported; every child is checked against the parent, against a
separate evaluation, and loaded again in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.conftest import ROOT
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.compress import (
    BenchParams,
    CompressError,
    ExportError,
    compress,
    distill,
    export,
    import_hf,
    prune,
    quantize,
)
from shipyard.compress.source import as_inputs, rebuild_data, split_tensors
from shipyard.config import RunConfig, load_config, validate_config
from shipyard.package import load_package, manifest_sha256, verify_package
from shipyard.train import evaluate_model, fit

pytestmark = pytest.mark.integration

BENCH = BenchParams(latency_calls=10, throughput_calls=2, rounds=1, warmup=1, threads=1)

DIGITS: dict[str, Any] = {
    "name": "digits",
    "task": "classification",
    "data": {"source": "builtin:digits", "preprocessing": "standardize"},
    "model": {"name": "mlp", "hidden_sizes": [64, 32]},
    "optim": {"name": "adamw", "lr": 0.003},
    "train": {"epochs": None, "max_steps": 300, "batch_size": 64},
    "eval": {"every_steps": 100},
}
GPT: dict[str, Any] = {
    "name": "gpt",
    "task": "language-modeling",
    "data": {"source": "builtin:python-stdlib", "max_chars": 50000, "tokenizer": {"kind": "byte"}},
    "model": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {"epochs": None, "max_steps": 50, "batch_size": 8},
    "eval": {"max_batches": 2},
}


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compress")


@pytest.fixture(scope="session")
def digits(work: Path) -> Path:
    fit(load_config(DIGITS), run_dir=work / "digits")
    return work / "digits" / "package"


@pytest.fixture(scope="session")
def gpt(work: Path) -> Path:
    fit(load_config(GPT), run_dir=work / "gpt")
    return work / "gpt" / "package"


def _config(package: Path) -> RunConfig:
    return validate_config(verify_package(package).config)


def separate_accuracy(package: Path) -> dict[str, Any]:
    """Evaluate a package with the trainer's own code, on freshly rebuilt data."""
    config = _config(package)
    data = rebuild_data(config)
    return evaluate_model(load_package(package).model, data, "test", config)


def check_lineage(child: Path, parent: Path, method: str) -> None:
    manifest = verify_package(child)
    assert manifest.lineage.parent is not None
    assert manifest.lineage.parent.manifest_sha256 == manifest_sha256(parent)
    assert manifest.lineage.parent.name == verify_package(parent).name
    assert manifest.derivation is not None and manifest.derivation.method == method


def test_quantize_int8_digits(digits: Path, work: Path) -> None:
    result = quantize(digits, work / "int8", "int8", bench=BENCH)
    check_lineage(result.package, digits, "quantize")
    manifest = verify_package(result.package)
    assert manifest.quantization is not None
    assert manifest.quantization.scheme == "dynamic-int8"
    assert manifest.quantization.layers == ["body.0", "body.2", "head"]
    report = json.loads((work / "int8" / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert "| child:" in (work / "int8" / "report.md").read_text()
    # the child names its report, and the report the exact packages it measured
    assert manifest.lineage.compression_report == str((work / "int8" / "report.json").resolve())
    assert report["child"]["manifest_sha256"] == manifest_sha256(result.package)
    assert report["parent"]["manifest_sha256"] == manifest_sha256(digits)
    # the report's numbers are the measured ones
    child_acc = separate_accuracy(result.package)["accuracy"]
    assert report["child"]["quality"]["accuracy"] == child_acc
    assert report["parent"]["quality"]["accuracy"] == separate_accuracy(digits)["accuracy"]
    assert report["delta"]["quality"]["accuracy"] == pytest.approx(
        child_acc - report["parent"]["quality"]["accuracy"]
    )
    assert report["delta"]["quality"]["accuracy"] >= -0.02
    assert report["child"]["file_bytes"] < 0.5 * report["parent"]["file_bytes"]
    assert report["child"]["parameters"] == report["parent"]["parameters"]
    for key in ("latency_p50_ms", "latency_p99_ms", "throughput_rows_per_s"):
        assert report["child"][key] > 0 and report["parent"][key] > 0


def test_prune_unstructured_keeps_sparsity_through_fine_tuning(digits: Path, work: Path) -> None:
    result = prune(digits, work / "pruned", 0.6, finetune_steps=20, bench=BENCH)
    check_lineage(result.package, digits, "prune+finetune")
    child = load_package(result.package)
    weights = [child.model.body[0].weight, child.model.body[2].weight, child.model.head.weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01)
    assert result.report["child"]["sparsity"] == zeros
    steps = verify_package(result.package).derivation.params  # type: ignore[union-attr]
    assert steps["prune"]["sparsity"] == 0.6 and steps["finetune"]["steps"] == 20


def test_structured_pruning_shrinks_the_architecture(digits: Path, work: Path) -> None:
    result = prune(digits, work / "half", 0.5, structured=True, bench=BENCH)
    manifest = verify_package(result.package)
    assert manifest.architecture.config["hidden_sizes"] == [32, 16]
    assert manifest.config["model"]["hidden_sizes"] == [32, 16]
    assert manifest.derivation.params["prune"]["hidden_sizes"] == [[64, 32], [32, 16]]  # type: ignore[union-attr]
    report = result.report
    assert report["child"]["parameters"] < 0.55 * report["parent"]["parameters"]
    assert report["child"]["file_bytes"] < report["parent"]["file_bytes"]
    assert report["child"]["quality"]["accuracy"] == separate_accuracy(result.package)["accuracy"]


def test_distillation_trains_a_smaller_student(digits: Path, work: Path) -> None:
    student = work / "student.yaml"
    student.write_text(
        "model: {name: mlp, hidden_sizes: [16]}\noptim: {name: adamw, lr: 0.01}\n"
        "train: {epochs: null, max_steps: 150, batch_size: 64}\n"
    )
    result = distill(digits, work / "student", student, alpha=0.7, temperature=3.0, bench=BENCH)
    check_lineage(result.package, digits, "distill")
    params = verify_package(result.package).derivation.params["distill"]  # type: ignore[union-attr]
    assert params["alpha"] == 0.7 and params["temperature"] == 3.0
    report = result.report
    assert report["child"]["parameters"] < report["parent"]["parameters"] / 3
    assert report["child"]["quality"]["accuracy"] > 0.85
    bad = work / "bad-student.yaml"
    bad.write_text("model: {name: mlp}\ndata: {source: builtin:synthetic-regression}\n")
    with pytest.raises(CompressError, match="data differs from the teacher"):
        distill(digits, work / "bad", bad)


def test_gpt_weight_only_int8(gpt: Path, work: Path) -> None:
    result = quantize(gpt, work / "gpt-int8w", "int8-weight", bench=BENCH)
    check_lineage(result.package, gpt, "quantize")
    manifest = verify_package(result.package)
    assert manifest.quantization is not None and manifest.quantization.scheme == "weight-int8"
    assert "lm_head" not in manifest.quantization.layers  # tied to the embedding: left fp32
    assert len(manifest.quantization.layers) == 2 * 4
    report = result.report
    ppl_parent = report["parent"]["quality"]["perplexity"]
    assert report["child"]["quality"]["perplexity"] == pytest.approx(ppl_parent, rel=0.02)
    assert report["child"]["file_bytes"] < report["parent"]["file_bytes"]


def test_gpt_structured_pruning_narrows_the_mlp(gpt: Path, work: Path) -> None:
    result = prune(gpt, work / "gpt-structured", 0.5, structured=True, bench=BENCH)
    check_lineage(result.package, gpt, "prune")
    child = load_package(result.package)
    parent_width = load_package(gpt).manifest.architecture.config.get("mlp_hidden") or 4 * 32
    assert child.manifest.architecture.config["mlp_hidden"] == parent_width // 2
    report = result.report
    assert report["child"]["parameters"] < report["parent"]["parameters"]
    assert report["child"]["file_bytes"] < report["parent"]["file_bytes"]
    assert report["child"]["quality"]["perplexity"] > 1.0  # reported honestly, even if worse


def test_onnx_export_parity_and_onnxruntime_package(digits: Path, work: Path) -> None:
    path, parity = export(digits, work / "onnx", format="onnx")
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    manifest = verify_package(path)
    assert manifest.backend == "onnxruntime" and "model.onnx" in manifest.files
    check_lineage(path, digits, "export-onnx")
    parent, child = load_package(digits), load_package(path)
    x = as_inputs(split_tensors(rebuild_data(_config(digits)), "test")[0])
    want, got = parent.predict_arrays(x), child.predict_arrays(x)
    assert np.abs(want["probabilities"] - got["probabilities"]).max() <= 1e-4
    assert (want["label"] == got["label"]).all()
    assert child.predict([[0.0] * 64])[0]["label"] in manifest.labels  # type: ignore[operator]
    # ONNX Runtime int8 of the exported package
    result = quantize(path, work / "onnx-int8", "int8", bench=BENCH)
    check_lineage(result.package, path, "quantize")
    assert verify_package(result.package).backend == "onnxruntime"
    assert result.report["child"]["file_bytes"] < result.report["parent"]["file_bytes"]
    assert result.report["delta"]["quality"]["accuracy"] >= -0.03
    with pytest.raises(CompressError, match="prune or distill its PyTorch parent"):
        prune(path, work / "nope", 0.5)
    # encryption at rest covers the ONNX graph too
    from shipyard.package import encrypt_package, generate_package_key

    key = generate_package_key()
    enc = encrypt_package(path, work / "onnx-encrypted", key=key)
    assert (enc / "model.onnx").read_bytes() != (path / "model.onnx").read_bytes()
    secret = load_package(enc, key=key).predict_arrays(x)
    assert np.array_equal(secret["probabilities"], got["probabilities"])


def test_export_fails_loudly_beyond_tolerance(digits: Path, work: Path) -> None:
    with pytest.raises(ExportError, match="parity check failed"):
        export(digits, work / "ts-strict", format="torchscript", tolerance=-1.0)
    path, parity = export(digits, work / "ts", format="torchscript")
    assert parity["max_abs_diff"] <= 1e-5
    traced = torch.jit.load(str(path / "model.pt"))
    x = split_tensors(rebuild_data(_config(digits)), "test", limit=8)[0]
    with torch.inference_mode():
        assert torch.allclose(traced(x), load_package(digits).model(x), atol=1e-5)


def test_hf_round_trip(gpt: Path, work: Path) -> None:
    hf_dir, parity = export(gpt, work / "gpt-hf", format="hf")
    assert parity["max_abs_diff"] <= 1e-5
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    pkg = import_hf(hf_dir, work / "gpt-imported")
    check_lineage(pkg, gpt, "import-hf")
    ids = np.random.default_rng(0).integers(0, 258, (2, 32)).astype(np.int64)
    want = load_package(gpt).predict_arrays(ids)["logits"]
    got = load_package(pkg).predict_arrays(ids)["logits"]
    assert np.abs(want - got).max() <= 1e-5
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    with torch.inference_mode():
        logits = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(want - logits).max() <= 1e-5


CHILD = """
import json, pickle, sys
import numpy as np
import torch
from shipyard.package import load_package

def refuse(*args, **kwargs):
    raise RuntimeError("something tried to unpickle while loading a package")

pickle.load = pickle.loads = torch.load = refuse  # loading must never need these
for name, path, x in json.loads(sys.argv[1]):
    result = load_package(path).predict_arrays(np.load(x, allow_pickle=False))
    np.save(path + "-fresh.npy", result[next(iter(result))], allow_pickle=False)
"""


def test_children_load_in_a_fresh_process(digits: Path, gpt: Path, work: Path) -> None:
    """Every child written above (plus a dynamic-int8 GPT) loads in a new interpreter, with
    pickle disabled, and predicts exactly what it predicts in this process."""
    quantize(gpt, work / "gpt-int8", "int8", bench=BENCH)
    x_digits = as_inputs(split_tensors(rebuild_data(_config(digits)), "test", limit=32)[0])
    x_gpt = np.random.default_rng(1).integers(0, 258, (3, 32)).astype(np.int64)
    np.save(work / "x-digits.npy", x_digits, allow_pickle=False)
    np.save(work / "x-gpt.npy", x_gpt, allow_pickle=False)
    jobs = []
    for name in ("int8", "pruned", "half", "student", "onnx", "onnx-int8"):
        path = work / name if name == "onnx" else work / name / "package"
        if path.is_dir():
            jobs.append((name, str(path), str(work / "x-digits.npy")))
    for name in ("gpt-int8w", "gpt-int8"):
        if (work / name / "package").is_dir():
            jobs.append((name, str(work / name / "package"), str(work / "x-gpt.npy")))
    assert len(jobs) >= 2
    script = work / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(jobs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name, path, x in jobs:
        result = load_package(path).predict_arrays(np.load(x, allow_pickle=False))
        fresh = np.load(path + "-fresh.npy", allow_pickle=False)
        first = result[next(iter(result))]
        if "onnx" in name:
            np.testing.assert_allclose(fresh, first, atol=1e-6)
        else:
            np.testing.assert_array_equal(fresh, first)  # bitwise


def test_cli_compress_and_export(digits: Path, work: Path) -> None:
    runner = CliRunner()
    out = work / "cli-int8w"
    result = runner.invoke(
        app,
        ["compress", str(digits), "--quantize", "int8-weight", "-o", str(out), "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "package" / "manifest.json").is_file()
    assert "child" in result.output
    result = runner.invoke(app, ["compress", str(digits), "-o", str(work / "cli-nothing")])
    assert isinstance(result.exception, CompressError)
    result = runner.invoke(
        app, ["export", str(digits), "--format", "torchscript", "-o", str(work / "cli-ts")]
    )
    assert result.exit_code == 0, result.output
    assert "max abs difference" in result.output and "argmax agreement 100.00%" in result.output


def test_onnx_package_serves_like_the_parent(digits: Path, work: Path) -> None:
    from fastapi.testclient import TestClient

    from shipyard.serve import ServeSettings, create_app

    onnx = work / "onnx"
    if not onnx.is_dir():
        export(digits, onnx, format="onnx")
    x = as_inputs(split_tensors(rebuild_data(_config(digits)), "test", limit=16)[0])
    answers = []
    for package in (digits, onnx):
        app_ = create_app(ServeSettings(max_wait_ms=0), preloaded=[load_package(package)])
        with TestClient(app_) as client:
            r = client.post("/v1/models/digits:predict", json={"instances": x.tolist()})
            assert r.status_code == 200, r.text
            answers.append(r.json()["predictions"])
    for a, b in zip(*answers, strict=True):
        assert a["label"] == b["label"]
        for k, p in a["probabilities"].items():
            assert b["probabilities"][k] == pytest.approx(p, abs=1e-4)


def test_compress_refuses_bad_requests(digits: Path, work: Path) -> None:
    with pytest.raises(CompressError, match="nothing to do"):
        compress(digits, work / "x")
    with pytest.raises(CompressError, match="sparsity must be between 0 and 1"):
        prune(digits, work / "x", 1.5)
    with pytest.raises(CompressError, match="unknown quantization"):
        quantize(digits, work / "x", "int4")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="--format hf exports language models"):
        export(digits, work / "x-hf", format="hf")
