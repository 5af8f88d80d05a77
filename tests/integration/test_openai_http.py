"""The OpenAI-compatible routes for real: the official `openai` SDK (sync and async, streaming and
not) against uvicorn on an ephemeral loopback port, serving a tiny GPT trained for the session.

Batched-vs-alone numerics of the engine (logits within 1e-4) are tested in
tests/unit/test_generate_engine.py; here the same engine is driven through HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from tests.lm_support import lm_package, loaded_lm
from tests.serve_support import running_server
from typer.testing import CliRunner

from shipyard.generate import Engine, SamplingParams, generate
from shipyard.serve import ServeSettings, create_app
from shipyard.serve.auth import add_key

pytestmark = pytest.mark.integration

MODEL = "tiny-lm"
WAIT_S = 30.0  # bound on every wait, so a bug fails instead of hanging


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and no noisy neighbours
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return loaded_lm(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def app(lm: Any) -> Any:
    return create_app(ServeSettings(max_running_seqs=8, max_queue=8), preloaded=[lm])


@pytest.fixture(scope="module")
def url(app: Any) -> Iterator[str]:
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _engine(app: Any) -> Engine:
    engine = app.state.server.repo.get(MODEL).engine
    assert engine is not None
    return engine


CHAT = [{"role": "user", "content": "x = "}]  # 28 tokens with the template: 36 left


# ------------------------------------------------------------------------------ basics


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert models.object == "list"
    ids = [m.id for m in models.data]
    assert ids[0] == MODEL and all(i.startswith(MODEL) for i in ids)
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "shipyard" and card.created > 0
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_matches_in_process_generate_and_counts_tokens(
    client: openai.OpenAI, lm: Any
) -> None:
    prompt = "import os\ndef "
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0.8, seed=7
    )
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=7)
    want = generate(lm.model, lm.tokenizer, prompt, params)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI, lm: Any) -> None:
    r = client.completions.create(
        model=MODEL, prompt="class ", max_tokens=5, temperature=0, extra_body={"top_k": 1}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert len(lm.tokenizer.encode(r.choices[0].text)) == 5  # byte tokenizer, ASCII output


def test_streaming_deltas_concatenate_to_the_non_streamed_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "max_tokens": 30, "temperature": 0.9, "seed": 11}
    full = client.completions.create(prompt="for i in ", **args)
    chunks = list(
        client.completions.create(
            prompt="for i in ", stream=True, stream_options={"include_usage": True}, **args
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and usage == full.usage

    chat = client.chat.completions.create(messages=CHAT, **args)  # type: ignore[arg-type]
    stream = client.chat.completions.create(messages=CHAT, stream=True, **args)  # type: ignore[arg-type]
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    )
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_sequences_cut_the_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "def ", "temperature": 0.9, "seed": 3}
    full = client.completions.create(max_tokens=40, **args).choices[0].text
    stop = full[10:12]
    cut = client.completions.create(max_tokens=40, stop=[stop, "@@@"], **args).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(max_tokens=40, stop=stop, stream=True, **args)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_chat_template_and_role_markers_stop(client: openai.OpenAI, lm: Any) -> None:
    messages = [{"role": "system", "content": "Py"}, *CHAT]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, seed=0)  # type: ignore[arg-type]
    prompt = "<|system|>\nPy\n<|user|>\nx = \n<|assistant|>\n"
    assert r.usage is not None and r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert "<|" not in (r.choices[0].message.content or "")


def test_n_choices_use_seed_plus_index(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "x = ", "max_tokens": 12, "temperature": 1}
    both = client.completions.create(n=2, seed=100, **args)
    assert [c.index for c in both.choices] == [0, 1]
    for i, choice in enumerate(both.choices):
        alone = client.completions.create(seed=100 + i, **args).choices[0].text
        assert choice.text == alone
    assert both.usage is not None and both.usage.completion_tokens == 24
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        n=2,
        seed=5,
        max_tokens=8,
        stream=True,  # type: ignore[arg-type]
    )
    texts = ["", ""]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, seed=5, max_tokens=8)  # type: ignore[arg-type]
    assert texts == [c.message.content for c in chat.choices]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="def ", max_tokens=4, logprobs=2, seed=0)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=3,
        logprobs=True,
        top_logprobs=3,
        seed=0,  # type: ignore[arg-type]
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3 and len(content[0].top_logprobs) == 3
    top = content[0].top_logprobs
    assert top[0].logprob >= top[1].logprob >= top[2].logprob


async def _async_calls(url: str) -> tuple[str, str]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as aclient:
        args: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "seed": 9}
        full = await aclient.chat.completions.create(messages=CHAT, **args)  # type: ignore[arg-type]
        stream = await aclient.chat.completions.create(messages=CHAT, stream=True, **args)  # type: ignore[arg-type]
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        return full.choices[0].message.content or "", text


def test_async_client(url: str) -> None:
    full, streamed = asyncio.run(_async_calls(url))
    assert full == streamed


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"10": 5}}, "logit_bias"),
        ({"extra_body": {"bogus": 1}}, "bogus"),
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tokens": 10_000}, "max_tokens"),
    ],
)
def test_bad_chat_parameters_are_named(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error" and param in body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True}, "echo"),
        ({"prompt": "x" * 80}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_completion_parameters_are_named(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    args = {"model": MODEL, "prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == param


def test_context_overflow_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x" * 50, max_tokens=20)
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "context_length_exceeded"
    assert "context is 64 tokens" in body["message"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


def test_keys_and_rate_limits(lm: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    key, _ = add_key(keys, "infer")
    app = create_app(ServeSettings(keys_file=keys, rate_limit=0.001, rate_burst=2), preloaded=[lm])
    with running_server(app) as base:
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for api_key in ("wrong", "sy_00000000_" + "a" * 43):
            anonymous = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as info:
                anonymous.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert (
                isinstance(info.value.body, dict) and info.value.body["code"] == "invalid_api_key"
            )
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
        assert good.models.list().data
        with pytest.raises(openai.RateLimitError) as limited:
            good.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert limited.value.response.headers["retry-after"]


# ------------------------------------------------------------------------------ batching


class _HoldFirst:
    """Logits hook: park the engine thread when the first request reaches token 2 (its first
    two tokens have been delivered) until `ready()` is true (e.g. the later requests were
    accepted), so the schedule is deterministic."""

    def __init__(self, ready: Any) -> None:
        self.ready, self.used = ready, False

    def __call__(self, request_id: str, index: int, logits: torch.Tensor) -> None:
        if index != 2 or self.used:
            return
        self.used = True
        for _ in range(int(WAIT_S * 1000)):
            if self.ready():
                return
            threading.Event().wait(0.001)
        raise AssertionError("the later requests never arrived")


async def _long_then_short(url: str, shorts: int) -> list[str]:
    order: list[str] = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        long = await client.completions.create(
            model=MODEL, prompt="#", max_tokens=60, stream=True, extra_body={"top_k": 1}
        )
        chunks = long.__aiter__()
        await chunks.__anext__()  # the long request is decoding

        async def drain_long() -> None:
            async for _ in chunks:
                pass
            order.append("long")

        async def short(i: int) -> None:
            stream = await client.completions.create(
                model=MODEL, prompt="#", max_tokens=3, stream=True
            )
            async for _ in stream:
                pass
            order.append(f"short-{i}")

        await asyncio.gather(drain_long(), *(short(i) for i in range(shorts)))
    return order


def test_continuous_batching_short_request_overtakes_long_one(app: Any, url: str) -> None:
    engine = _engine(app)
    before = engine.stats().requests_total
    engine.logits_hook = _HoldFirst(lambda: engine.stats().requests_total >= before + 4)
    try:
        order = asyncio.run(_long_then_short(url, shorts=3))
    finally:
        engine.logits_hook = None
    assert order[-1] == "long", order
    assert sorted(order[:-1]) == ["short-0", "short-1", "short-2"]


def test_client_disconnect_cancels_the_engine_request(app: Any, url: str) -> None:
    engine = _engine(app)
    cancelled = threading.Event()
    original = engine.cancel

    def cancel(request_id: str) -> bool:
        cancelled.set()
        return original(request_id)

    engine.cancel = cancel  # type: ignore[method-assign]
    engine.logits_hook = _HoldFirst(cancelled.is_set)
    before = engine.stats()
    try:
        body = {"model": MODEL, "prompt": "#", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=WAIT_S) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # first token arrived; now hang up
        assert cancelled.wait(WAIT_S)
        for _ in range(int(WAIT_S * 100)):
            if engine.stats().requests_cancelled > before.requests_cancelled:
                break
            threading.Event().wait(0.01)
    finally:
        engine.logits_hook = None
        engine.cancel = original  # type: ignore[method-assign]
    after = engine.stats()
    assert after.requests_cancelled == before.requests_cancelled + 1
    assert after.generation_tokens_total - before.generation_tokens_total < 60


# ------------------------------------------------------------------------------ the rest


def test_metrics_and_kserve_logits_still_work(url: str, client: openai.OpenAI, lm: Any) -> None:
    client.completions.create(model=MODEL, prompt="def ", max_tokens=4, seed=0)
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "shipyard_time_to_first_token_seconds_count",
        "shipyard_inter_token_latency_seconds_count",
        "shipyard_generated_tokens_total",
        "shipyard_prompt_tokens_total",
        "shipyard_running_sequences",
        "shipyard_waiting_sequences",
    ):
        assert f'{name}{{model="{MODEL}"' in text, name
    ids = lm.tokenizer.encode("def f")
    body = {"inputs": [{"name": lm.signature.inputs[0].name, "datatype": "INT64",
                        "shape": [1, len(ids)], "data": ids}]}  # fmt: skip
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    want = lm.predict_arrays(np.asarray([ids]))["logits"]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(want.shape), want, atol=1e-5)


def test_generate_cli_streams_and_reports_json(tmp_path_factory: pytest.TempPathFactory) -> None:
    from shipyard.cli import app as cli

    package = str(lm_package(tmp_path_factory.getbasetemp()))
    runner = CliRunner()
    args = ["generate", package, "--prompt", "def ", "--max-tokens", "12", "--seed", "1"]
    out = runner.invoke(cli, [*args, "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["completion_tokens"] == 12 and result["prompt_tokens"] == 4
    assert result["time_to_first_token_s"] > 0 and result["tokens_per_s"] > 0
    plain = runner.invoke(cli, args)
    assert plain.exit_code == 0 and plain.stdout.startswith(result["text"])
    bad = runner.invoke(cli, [*args[:4], "--max-tokens", "500"])
    assert bad.exit_code != 0
