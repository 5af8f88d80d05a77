"""A Llama-family model through the lifecycle like the GPT: trained from scratch by `fit` on the
text corpus, packaged, loaded (meta-device build), generated from by `generate` and by the
server's continuous-batching engine, weight-only int8 quantized and structurally pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shipyard.compress import prune, quantize
from shipyard.compress.layers import Int8Linear
from shipyard.compress.measure import BenchParams
from shipyard.config import load_config
from shipyard.generate import SamplingParams, generate
from shipyard.kernels import native
from shipyard.models import Llama, is_language_model
from shipyard.models.quantized import int8_gemm_available
from shipyard.package import load_package, verify_package
from shipyard.serve.lm import start_engine, supports_generation
from shipyard.serve.settings import ServeSettings
from shipyard.train import StepInfo, fit

pytestmark = pytest.mark.integration

BENCH = BenchParams(latency_calls=5, throughput_calls=1, rounds=1, warmup=1, threads=1)
LLAMA: dict[str, Any] = {
    "name": "tiny-llama",
    "seed": 0,
    "task": "language-modeling",
    "data": {
        "source": "builtin:python-stdlib",
        "max_chars": 60_000,
        "splits": {"train": 0.9, "val": 0.05, "test": 0.05},
        "tokenizer": {"kind": "byte"},
        "sampling": "random",
    },
    "model": {
        "name": "llama",
        "model_type": "qwen2",  # GQA, q/k/v biases and a sliding window on the second layer
        "qkv_bias": True,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "sliding_window": 16,
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "optim": {"name": "adamw", "lr": 0.01},
    "train": {"epochs": None, "max_steps": 40, "batch_size": 8, "log_every": 5},
    "eval": {"every_steps": 1000, "max_batches": 2},
}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, stop_on_eos=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    losses: list[float] = []

    def record(info: StepInfo) -> None:
        if info.loss is not None:
            losses.append(info.loss)

    run = tmp_path_factory.mktemp("llama") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(load_config(LLAMA), run_dir=run, callbacks=[record])
    finally:
        torch.set_num_threads(threads)
    return run / "package", losses


def test_fit_trains_and_packages_a_llama(trained: tuple[Path, list[float]]) -> None:
    package, losses = trained
    assert len(losses) == 8  # one mean per 5 steps
    assert losses[-1] < losses[0] - 1.0  # bytes: from about ln(258) = 5.6 down
    manifest = verify_package(package)
    assert manifest.architecture.name == "llama"
    assert manifest.architecture.config["layer_types"] == ["full_attention", "sliding_attention"]
    loaded = load_package(package)
    assert isinstance(loaded.model, Llama) and is_language_model(loaded.model)
    assert loaded.model.model.layers[0].self_attn.k_proj.out_features == 2 * 8  # kv heads x hs
    assert supports_generation(loaded)


def test_engine_and_generate_agree_on_a_trained_llama(trained: tuple[Path, list[float]]) -> None:
    loaded = load_package(trained[0])
    assert loaded.tokenizer is not None
    prompts = ["def ", "import os\n", "class Foo:\n    x"]  # 16 + 12 tokens: past the window
    solo = [generate(loaded.model, loaded.tokenizer, p, GREEDY).token_ids for p in prompts]
    engine = start_engine(loaded, "tiny-llama", "1", ServeSettings(max_running_seqs=2))
    try:
        streams = [engine.submit_sync(p, GREEDY) for p in prompts]
        assert [s.result().token_ids for s in streams] == solo
    finally:
        engine.close()
    assert all(len(ids) == 12 for ids in solo)


def test_weight_only_int8_llama(trained: tuple[Path, list[float]], tmp_path: Path) -> None:
    package = trained[0]
    result = quantize(package, tmp_path / "int8w", "int8-weight", bench=BENCH)
    manifest = verify_package(result.package)
    assert manifest.quantization is not None and manifest.quantization.scheme == "weight-int8"
    assert "lm_head" not in manifest.quantization.layers  # tied to the embedding: left fp32
    assert len(manifest.quantization.layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    report = result.report
    ppl = report["parent"]["quality"]["perplexity"]
    assert report["child"]["quality"]["perplexity"] == pytest.approx(ppl, rel=0.02)
    child = load_package(result.package)
    assert isinstance(child.model.model.layers[1].mlp.down_proj, Int8Linear)
    assert child.tokenizer is not None
    out = generate(child.model, child.tokenizer, "def ", GREEDY)
    assert len(out.token_ids) == 12
    # generation picked the fastest int8 kernel here for the int8 layers (decode weights "auto")
    kernels = {m.kernel for m in child.model.modules() if isinstance(m, Int8Linear)}
    fastest = "int8-gemm" if int8_gemm_available() else "dequantized"
    assert kernels == {"native" if native.load() else fastest}


def test_structured_pruning_narrows_the_llama_mlp(
    trained: tuple[Path, list[float]], tmp_path: Path
) -> None:
    result = prune(trained[0], tmp_path / "pruned", 0.5, structured=True, bench=BENCH)
    child = load_package(result.package)
    assert child.manifest.architecture.config["intermediate_size"] == 32
    assert isinstance(child.model, Llama)
    assert child.model.model.layers[0].mlp.gate_proj.out_features == 32
    report = result.report
    assert report["child"]["parameters"] < report["parent"]["parameters"]
    assert report["child"]["quality"]["perplexity"] > 1.0
