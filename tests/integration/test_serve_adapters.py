"""One base, several LoRA adapters: `shipyard serve BASE --adapter NAME=PACKAGE`.

Two adapters are trained for a few steps on different text from the session's tiny GPT. A server
holding the base once plus both adapters must answer each model name exactly as a server holding
the three packages whole (each adapter package alone, with its own copy of the base); the base's
name must answer without an adapter. An adapter of another base is refused at start-up.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from tests.lm_support import LM_CONFIG, lm_package
from tests.serve_support import running_server
from typer.testing import CliRunner

from shipyard.cli import app as cli_app
from shipyard.config import load_config
from shipyard.package import load_package
from shipyard.package.registry import Registry
from shipyard.serve import ServeSettings, create_app
from shipyard.serve.core import ModelRepository
from shipyard.serve.settings import ServeError
from shipyard.train import fit

pytestmark = pytest.mark.integration

BASE = "tiny-lm"
TEXTS = {
    "fox": "the quick brown fox jumps over the lazy dog. ",
    "cat": "a cat sat on the mat and purred at the rain. ",
}
PROMPTS = ["the ", "import os\n"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and no noisy neighbours
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm_package(tmp_path_factory.getbasetemp())


def _train_adapter(base: Path, root: Path, name: str) -> Path:
    corpus = root / f"{name}-text"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(TEXTS[name] * (10 + i), encoding="utf-8")
    config = {
        "name": f"{name}-lora",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": str(corpus / "*.txt"),
            "format": "text",
            "splits": {"train": 0.75, "val": 0.125, "test": 0.125},
            "sampling": "random",
        },
        "model": {"name": "pretrained", "path": str(base)},
        "finetune": {"method": "lora", "rank": 4, "alpha": 32, "targets": ["c_attn", "c_fc"]},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "train": {"epochs": None, "max_steps": 15, "batch_size": 8, "log_every": 1000},
        "eval": {"every_steps": 1000, "max_batches": 1},
    }
    result = fit(load_config(config), run_dir=root / f"{name}-run", progress=False)
    return result.run_dir / "package"


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: _train_adapter(base, root, name) for name in TEXTS}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny GPT of the same shape (a few steps from scratch): a different base."""
    config = {**LM_CONFIG, "name": "other-lm", "train": {**LM_CONFIG["train"], "max_steps": 2}}
    run = tmp_path_factory.mktemp("other") / "run"
    return fit(load_config(config), run_dir=run, progress=False).run_dir / "package"


def _settings(**kwargs: Any) -> ServeSettings:
    return ServeSettings(max_running_seqs=4, max_queue=16, **kwargs)


@pytest.fixture(scope="module")
def shared_app(base: Path, adapters: dict[str, Path]) -> Any:
    """The base once, both adapters on it."""
    return create_app(_settings(packages=[base], adapters=adapters))


@pytest.fixture(scope="module")
def shared(shared_app: Any) -> Iterator[str]:
    with running_server(shared_app) as url:
        yield url


@pytest.fixture(scope="module")
def alone(base: Path, adapters: dict[str, Path]) -> Iterator[str]:
    """The base and each adapter package as plain packages (each with its own base copy)."""
    packages = [base, *adapters.values()]
    with running_server(create_app(_settings(packages=packages))) as url:
        yield url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(url: str, model: str, prompt: str) -> str:
    r = _client(url).completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"top_k": 1}
    )
    assert r.model == model
    return r.choices[0].text


def _logits(url: str, model: str, ids: list[int], input_name: str) -> np.ndarray:
    body = {"inputs": [{"name": input_name, "datatype": "INT64", "shape": [1, len(ids)],
                        "data": ids}]}  # fmt: skip
    r = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)


def test_each_name_answers_like_its_package_served_alone(
    shared: str, alone: str, base: Path
) -> None:
    pairs = {BASE: BASE, "fox": "fox-lora", "cat": "cat-lora"}  # shared name -> alone name
    texts: dict[str, list[str]] = {}
    for name, whole in pairs.items():
        texts[name] = [_greedy(shared, name, p) for p in PROMPTS]
        assert texts[name] == [_greedy(alone, whole, p) for p in PROMPTS], name
    # the adapters do change the model, and each differently
    assert texts["fox"] != texts[BASE] and texts["cat"] != texts[BASE]
    assert texts["fox"] != texts["cat"]
    loaded = load_package(base)
    assert loaded.tokenizer is not None
    ids = loaded.tokenizer.encode("the quick ")
    name = loaded.signature.inputs[0].name
    logits = {n: _logits(shared, n, ids, name) for n in pairs}
    for n, whole in pairs.items():
        np.testing.assert_allclose(logits[n], _logits(alone, whole, ids, name), rtol=0, atol=1e-6)
    with torch.inference_mode():
        want = loaded.model(torch.tensor([ids])).numpy().ravel()
    np.testing.assert_allclose(logits[BASE], want, rtol=0, atol=1e-5)
    assert float(np.abs(logits["fox"] - logits[BASE]).max()) > 1e-2


def test_concurrent_requests_for_base_and_adapters_keep_their_own_answers(
    shared: str, alone: str
) -> None:
    pairs = {BASE: BASE, "fox": "fox-lora", "cat": "cat-lora"}
    want = {(n, p): _greedy(alone, whole, p) for n, whole in pairs.items() for p in PROMPTS}
    got: dict[tuple[str, str], str] = {}
    errors: list[BaseException] = []

    def ask(name: str, prompt: str) -> None:
        try:
            got[(name, prompt)] = _greedy(shared, name, prompt)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=key) for key in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert got == want


def test_adapters_hold_only_their_own_tensors(shared: str, shared_app: Any) -> None:
    repo = shared_app.state.server.repo
    base_params = {id(p) for p in repo.get(BASE).loaded.model.parameters()}
    for name in ("fox", "cat"):
        model = repo.get(name).loaded.model
        own = {n for n, p in model.named_parameters() if id(p) not in base_params}
        assert own and all(n.endswith((".lora_A", ".lora_B")) for n in own), own
        assert model is not repo.get(BASE).loaded.model


def test_models_list_the_base_and_the_adapters(
    shared: str, base: Path, adapters: dict[str, Path]
) -> None:
    ids = {m.id for m in _client(shared).models.list().data}
    assert {BASE, "fox", "cat"} <= ids
    version = str(load_package(adapters["fox"]).manifest.version)
    assert f"fox:{version}" in ids
    assert all(i.split(":")[0] in {BASE, "fox", "cat"} for i in ids)
    r = httpx.get(f"{shared}/v2/models/fox", timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "fox"


def test_an_adapter_of_another_base_or_no_adapter_is_refused(
    other_base: Path, base: Path, adapters: dict[str, Path]
) -> None:
    async def load(base_pkg: Path, name: str, adapter: Path) -> None:
        repo = ModelRepository(_settings(packages=[base_pkg], adapters={name: adapter}))
        try:
            served = await repo.load(base_pkg)
            await repo.load_adapter(name, adapter, served)
        finally:
            await repo.close()

    with pytest.raises(ServeError, match=r"trained on base tiny-lm .*not on the served base other"):
        asyncio.run(load(other_base, "fox", adapters["fox"]))
    with pytest.raises(ServeError, match="holds no LoRA adapter"):
        asyncio.run(load(base, "plain", other_base))
    with pytest.raises(ServeError, match="a served model is already named 'tiny-lm'"):
        asyncio.run(load(base, BASE, adapters["fox"]))
    # the console script: one line, exit 2, before binding
    args = ["serve", str(other_base), "--port", "0", "--adapter", f"fox={adapters['fox']}"]
    out = subprocess.run(
        [sys.executable, "-m", "shipyard", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "tiny-lm" in out.stderr and "other-lm" in out.stderr
    assert "an adapter only runs on its own base" in out.stderr


def test_a_registry_ref_can_be_the_base_and_be_unloaded_first(
    home: Path, base: Path, adapters: dict[str, Path]
) -> None:
    with Registry() as registry:
        registry.register(base, name="prod-lm")
    ids = [40, 41, 42]

    async def serve() -> np.ndarray:
        repo = ModelRepository(_settings(registry_refs=["prod-lm"], adapters=adapters))
        try:
            served = await repo.load("prod-lm")
            fox = await repo.load_adapter("fox", adapters["fox"], served)
            assert fox.source.endswith("(adapter on prod-lm:1)")
            await repo.remove("prod-lm", served.version)  # the adapter keeps serving
            assert repo.names() == ["fox"]
            out = await repo.get("fox").infer(np.asarray([ids]), timeout_s=30)
            return out["logits"]
        finally:
            await repo.close()

    want = load_package(adapters["fox"]).predict_arrays(np.asarray([ids]))["logits"]
    # served: oneDNN-packed base layers; in-process: F.linear (float32 rounding apart)
    np.testing.assert_allclose(asyncio.run(serve()), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", "fox"], "expected NAME=PACKAGE_DIR"),
        (["--adapter", "=x"], "expected NAME=PACKAGE_DIR"),
        (["--adapter", "fox={fox}", "--adapter", "fox={cat}"], "given twice"),
        (["--adapter", ".fox={fox}"], "is not a model name"),
        (["--adapter", "tiny-lm={fox}"], "the base is served as 'tiny-lm'"),
        (["--adapter", "plain={base}"], "holds no LoRA adapter"),
        (["--adapter", "fox={fox}", "{cat}"], "exactly one served package"),
        (["--adapter", "fox={fox}", "--decode-weights", "int8"], "int8 cannot serve --adapter"),
        (["--adapter", "fox={base}/missing"], "not a package directory"),
    ],
)
def test_bad_adapter_flags_are_one_clear_error(
    flags: list[str], message: str, base: Path, adapters: dict[str, Path]
) -> None:
    paths = {"base": base, "fox": adapters["fox"], "cat": adapters["cat"]}
    args = ["serve", str(base), *(f.format(**paths) for f in flags)]
    r = CliRunner().invoke(cli_app, args)
    assert isinstance(r.exception, ServeError), (r.exception, r.output)
    assert message in str(r.exception)
