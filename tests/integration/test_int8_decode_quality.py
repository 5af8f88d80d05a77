"""Int8 decoding (the x86 int8 GEMM) on a trained model: perplexity within 1% of fp32, greedy
tokens agree at least 80% of the time; the same through the decode path itself (traced step,
KV cache: float16 with int8 weights by default), where the cache's rounding moves perplexity
by far less than the int8 weights do."""

from __future__ import annotations

import copy
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.lm_support import lm_package, loaded_lm
from typer.testing import CliRunner

from shipyard.errors import GenerationError
from shipyard.generate import SamplingParams, generate
from shipyard.generate.cache import BatchKVCache
from shipyard.generate.packed import kv_cache_dtype, prepare_decoding
from shipyard.generate.traced import traced_step
from shipyard.kernels import native
from shipyard.models.quantized import int8_gemm_available
from shipyard.serve.settings import ServeError

pytestmark = pytest.mark.skipif(not int8_gemm_available(), reason="no x86 int8 GEMM here")


def perplexity(model: torch.nn.Module, ids: list[int], block: int) -> float:
    x = torch.tensor(ids[: (len(ids) - 1) // block * block + 1])
    inputs = x[:-1].view(-1, block)  # (n, block)
    targets = x[1:].view(-1, block)
    with torch.inference_mode():
        logits = model(inputs)  # (n, block, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return float(torch.exp(loss))


def trained_fp32_and_int8(base: Path) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    """The trained test GPT's package, and two copies of its model prepared for decoding: fp32
    and int8 (checking that the int8 copy got the fastest int8 kernel here)."""
    loaded = loaded_lm(base)
    fp32 = copy.deepcopy(loaded.model).eval()
    int8 = copy.deepcopy(loaded.model).eval()
    prepare_decoding(fp32, "fp32")
    kernel = "native" if native.load() else "int8-gemm"
    assert f"int8 linear(s): {kernel}" in prepare_decoding(int8, "int8")
    return loaded, fp32, int8


def python_source_ids(tokenizer: Any, n: int) -> list[int]:
    """The first n token ids of some Python source (what the test GPT was trained on)."""
    return tokenizer.encode(textwrap.dedent(inspect.getsource(textwrap)))[:n]


def test_trained_gpt_int8_perplexity_within_one_percent(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    loaded, fp32, int8 = trained_fp32_and_int8(tmp_path_factory.getbasetemp())
    ids = python_source_ids(loaded.tokenizer, 4097)
    block = fp32.config.block_size
    ppl32, ppl8 = perplexity(fp32, ids, block), perplexity(int8, ids, block)
    assert ppl8 == pytest.approx(ppl32, rel=0.01), (ppl32, ppl8)

    params = SamplingParams(max_tokens=32, temperature=0, stop_on_eos=False)
    agree = total = 0
    for prompt in ("def main(", "import os\n", "class Foo:\n    def "):
        a = generate(fp32, loaded.tokenizer, prompt, params).token_ids
        b = generate(int8, loaded.tokenizer, prompt, params, weights="int8").token_ids
        agree += sum(x == y for x, y in zip(a, b, strict=True))
        total += len(a)
    assert agree / total >= 0.8, agree / total


def decode_perplexity(
    model: torch.nn.Module, ids: list[int], kv_dtype: torch.dtype | None
) -> float:
    """Perplexity of `ids` read one token at a time through the traced decode step and a KV
    cache of `kv_dtype`: what generation computes, where `perplexity` runs the plain forward."""
    step = traced_step(model, kv_dtype)  # type: ignore[arg-type]
    assert step is not None
    cache = BatchKVCache(model.n_layer, kv_dtype)  # type: ignore[arg-type]
    start = torch.zeros(1, dtype=torch.long)
    losses = []
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            logits = step(torch.tensor([[ids[t]]]), cache, start)  # (1, V)
            losses.append(F.cross_entropy(logits, torch.tensor([ids[t + 1]])))
    return float(torch.exp(torch.stack(losses).mean()))


def test_trained_gpt_decode_path_perplexity_with_a_float16_cache(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    loaded, fp32, int8 = trained_fp32_and_int8(tmp_path_factory.getbasetemp())
    if native.load():
        assert kv_cache_dtype(int8) is torch.float16  # what int8 decoding uses by default
    ids = python_source_ids(loaded.tokenizer, fp32.config.block_size)  # one context's worth
    reference = decode_perplexity(fp32, ids, torch.float32)
    half_cache = decode_perplexity(fp32, ids, torch.float16)
    int8_full = decode_perplexity(int8, ids, torch.float32)
    int8_half = decode_perplexity(int8, ids, torch.float16)
    assert half_cache == pytest.approx(reference, rel=1e-3), (reference, half_cache)
    assert int8_half == pytest.approx(int8_full, rel=1e-3), (int8_full, int8_half)
    assert int8_half == pytest.approx(reference, rel=0.01), (reference, int8_half)


def test_generate_cli_decode_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    from shipyard.cli import app as cli

    package = str(lm_package(tmp_path_factory.getbasetemp()))
    args = ["generate", package, "--prompt", "def ", "--max-tokens", "8", "--temperature", "0"]
    runner = CliRunner()
    out = runner.invoke(cli, [*args, "--decode-weights", "int8", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["completion_tokens"] == 8
    out = runner.invoke(cli, [*args, "--kv-cache", "fp16", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["completion_tokens"] == 8
    bad = runner.invoke(cli, [*args, "--kv-cache", "int4"])
    assert isinstance(bad.exception, GenerationError)
    assert "unknown KV cache 'int4'; choose one of auto, fp32, fp16" in str(bad.exception)
    bad = runner.invoke(cli, ["serve", package, "--kv-cache", "int4"])
    assert isinstance(bad.exception, ServeError)
    assert "unknown --kv-cache 'int4'; choose one of auto, fp32, fp16" in str(bad.exception)
    # project errors (the console script turns them into one red line and exit code 2)
    bad = runner.invoke(cli, [*args, "--decode-weights", "int4"])
    assert isinstance(bad.exception, GenerationError)
    assert "unknown decode weights 'int4'; choose one of auto, fp32, int8" in str(bad.exception)
    bad = runner.invoke(cli, ["serve", package, "--decode-weights", "int4"])
    assert isinstance(bad.exception, ServeError)
    assert "unknown --decode-weights 'int4'; choose one of auto, fp32, int8" in str(bad.exception)
