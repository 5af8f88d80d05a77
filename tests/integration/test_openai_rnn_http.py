"""An rnn language model served like a GPT: a tiny character-level LSTM package behind uvicorn on
an ephemeral loopback port, driven by the official `openai` SDK and raw HTTP. The engine batches
its sequences with the recurrent state as their cache; every answer must equal single-stream
`shipyard.generate` on the same prompt.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from tests.lm_support import loaded_rnn_lm
from tests.serve_support import running_server

from shipyard.generate import Engine, GenerationResult, SamplingParams, generate
from shipyard.serve import ServeSettings, create_app
from shipyard.serve.protocols.openai.parsing import UNLIMITED_CHAT_MAX_TOKENS, chat_prompt_ids

pytestmark = pytest.mark.integration

MODEL = "tiny-rnn"
WAIT_S = 30.0  # bound on every wait, so a bug fails instead of hanging
CHAT = [{"role": "system", "content": "Py"}, {"role": "user", "content": "def f(x):"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return loaded_rnn_lm(tmp_path_factory.getbasetemp())


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


def alone(lm: Any, prompt: str | list[int], **params: Any) -> GenerationResult:
    return generate(lm.model, lm.tokenizer, prompt, SamplingParams(**params))


def test_greedy_completion_and_chat_equal_single_stream_generate(
    client: openai.OpenAI, lm: Any
) -> None:
    assert client.models.list().data[0].id == MODEL
    for prompt in ["import os\ndef ", "class ", "x" * 100]:  # the last is past the 64-token window
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=80, temperature=0)
        want = alone(lm, prompt, max_tokens=80, temperature=0)
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            want.prompt_tokens,
            want.completion_tokens,
        )
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, temperature=0)  # type: ignore[arg-type]
    ids = chat_prompt_ids(lm.tokenizer, CHAT)
    want = alone(lm, ids, max_tokens=60, temperature=0, stop=list(lm.tokenizer.chat_stops))
    assert chat.choices[0].message.content == want.text
    assert chat.choices[0].finish_reason == want.finish_reason
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    # no context limit: a chat without max_tokens gets a fixed default instead of "the rest"
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage is not None and r.usage.completion_tokens <= UNLIMITED_CHAT_MAX_TOKENS


def test_sampling_parameters_and_logprobs_match_generate(client: openai.OpenAI, lm: Any) -> None:
    args: dict[str, Any] = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 40}
    extra = {"top_k": 20, "repetition_penalty": 1.2}
    r = client.completions.create(
        model=MODEL, prompt="def ", logprobs=2, extra_body=extra, frequency_penalty=0.5, **args
    )
    want = alone(lm, "def ", logprobs=2, frequency_penalty=0.5, **extra, **args)
    assert r.choices[0].text == want.text
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and want.logprobs is not None
    for got, ref in zip(lp.token_logprobs, want.logprobs, strict=True):
        assert abs(got - ref.logprob) < 1e-4


def test_streaming_deltas_concatenate_to_the_non_streamed_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "temperature": 0.8, "seed": 3}
    full = client.completions.create(prompt="for i in ", **args)
    chunks = list(
        client.completions.create(
            prompt="for i in ", stream=True, stream_options={"include_usage": True}, **args
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage == full.usage and not chunks[-1].choices
    chat = client.chat.completions.create(messages=CHAT, **args)  # type: ignore[arg-type]
    parts = list(client.chat.completions.create(messages=CHAT, stream=True, **args))  # type: ignore[arg-type]
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    assert text == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


REQUESTS: list[dict[str, Any]] = [
    {"prompt": "import ", "max_tokens": 70, "temperature": 0},
    {"prompt": "class ", "max_tokens": 12, "temperature": 0},
    {"prompt": "x = ", "max_tokens": 30, "temperature": 0.9, "seed": 1},
    {"prompt": "return self.", "max_tokens": 45, "temperature": 0},
    {"prompt": "#", "max_tokens": 5, "temperature": 1.0, "seed": 2},
    {"prompt": "    def __init__(self", "max_tokens": 25, "temperature": 0.7, "seed": 3},
    {"prompt": "if ", "max_tokens": 60, "temperature": 0},
    {"prompt": "print(", "max_tokens": 18, "temperature": 0},
]


async def _concurrently(url: str) -> list[str]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:

        async def one(i: int, body: dict[str, Any]) -> str:
            if i % 2:  # half of them stream
                stream = await client.completions.create(model=MODEL, stream=True, **body)
                return "".join([c.choices[0].text async for c in stream])
            r = await client.completions.create(model=MODEL, **body)
            return r.choices[0].text

        return await asyncio.gather(*(one(i, b) for i, b in enumerate(REQUESTS)))


def test_concurrent_requests_give_the_tokens_of_each_alone(app: Any, url: str, lm: Any) -> None:
    """All requests share the decode batch (rows join and leave as they start and finish) and
    each one's text equals its own single-stream generation."""
    engine = _engine(app)
    before = engine.stats().requests_total
    batch_sizes: list[int] = []
    held = threading.Event()

    def hook(request_id: str, index: int, logits: torch.Tensor) -> None:
        batch_sizes.append(engine.stats().running)
        if held.is_set():
            return
        held.set()  # park at the first token until every request was accepted
        for _ in range(int(WAIT_S * 1000)):
            if engine.stats().requests_total >= before + len(REQUESTS):
                return
            threading.Event().wait(0.001)
        raise AssertionError("the other requests never arrived")

    engine.logits_hook = hook
    try:
        texts = asyncio.run(_concurrently(url))
    finally:
        engine.logits_hook = None
    assert max(batch_sizes) >= 4, batch_sizes  # really decoded together
    for body, text in zip(REQUESTS, texts, strict=True):
        params = {k: v for k, v in body.items() if k != "prompt"}
        assert text == alone(lm, body["prompt"], **params).text, body


def test_client_disconnect_cancels_the_engine_request(app: Any, url: str) -> None:
    engine = _engine(app)
    cancelled = threading.Event()
    original = engine.cancel

    def cancel(request_id: str) -> bool:
        cancelled.set()
        return original(request_id)

    def hold(request_id: str, index: int, logits: torch.Tensor) -> None:
        if index == 2:  # two tokens went out: decode on only once the server cancelled
            assert cancelled.wait(WAIT_S)

    engine.cancel = cancel  # type: ignore[method-assign]
    engine.logits_hook = hold
    before = engine.stats()
    body = {"model": MODEL, "prompt": "#", "max_tokens": 500, "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=WAIT_S) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # a first token arrived; now hang up
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
    assert after.generation_tokens_total - before.generation_tokens_total < 500
    assert after.running == 0


def test_limits_errors_and_metrics(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", temperature=3)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", n=17)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"
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


def test_a_full_engine_answers_503(lm: Any) -> None:
    """Bounded queue: beyond running + queued requests the server answers 503 + Retry-After."""
    app = create_app(ServeSettings(max_running_seqs=1, max_queue=1), preloaded=[lm])
    with running_server(app) as base:
        engine = _engine(app)
        reached, release = threading.Event(), threading.Event()

        def park(request_id: str, index: int, logits: torch.Tensor) -> None:
            reached.set()
            assert release.wait(WAIT_S)

        engine.logits_hook = park
        try:
            # the only slot, then the only place in the queue; their tokens are sampled
            # (temperature 1), so an end-of-text token must not finish them early
            first = engine.submit_sync("#", SamplingParams(max_tokens=3, stop_on_eos=False))
            assert reached.wait(WAIT_S)
            queued = engine.submit_sync("#", SamplingParams(max_tokens=2, stop_on_eos=False))
            body = {"model": MODEL, "prompt": "#", "max_tokens": 3}
            busy = httpx.post(f"{base}/v1/completions", json=body, timeout=WAIT_S)
            assert busy.status_code == 503 and "retry-after" in busy.headers
        finally:
            release.set()
            engine.logits_hook = None
        assert first.result().completion_tokens == 3 and queued.result().completion_tokens == 2
        again = httpx.post(f"{base}/v1/completions", json=body, timeout=WAIT_S)
        assert again.status_code == 200, again.text
