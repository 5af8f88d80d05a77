"""OpenAI-compatible routes in process (FastAPI TestClient, a random tiny GPT): the chat template,
strict parameter checks with OpenAI error bodies, model listing, engine wiring and metrics.

The official SDK against a real server and a trained model is in
tests/integration/test_openai_http.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from shipyard.data.tokenization import Tokenizer
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.serve import ServeSettings, create_app
from shipyard.serve.auth import add_key
from shipyard.serve.protocols.openai import CHAT_STOPS, chat_prompt
from shipyard.serve.protocols.openai.streaming import EventStream

TOK = Tokenizer.byte()


def fake_lm(name: str = "lm") -> Any:
    """Just what the server reads from a LoadedModel of a language-model package."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=48), TOK.vocab_size).eval()
    spec = SimpleNamespace(name="tokens", datatype="INT64", shape=[-1, -1])
    return SimpleNamespace(
        model=model,
        tokenizer=TOK,
        task="language-modeling",
        manifest=SimpleNamespace(name=name, version=1),
        signature=SimpleNamespace(inputs=[spec], outputs=[]),
    )


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(ServeSettings(access_log=False, max_running_seqs=4), preloaded=[fake_lm()])
    with TestClient(app) as c:
        yield c


def test_chat_template() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert chat_prompt(messages) == (
        "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\nHello.\n<|user|>\nBye\n"
        "<|assistant|>\n"
    )
    assert "\n<|user|>" in CHAT_STOPS and "<|user|>" in CHAT_STOPS


def test_completion_shape_and_usage(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "lm", "prompt": ["ab", "cde"], "max_tokens": 3, "n": 2, "seed": 1,
              "ignore_eos": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    # seeds: choice 0 and 2 use seed 1, choices 1 and 3 seed 2 (per prompt)
    alone = client.post(
        "/v1/completions",
        json={"model": "lm", "prompt": "cde", "max_tokens": 3, "seed": 2, "ignore_eos": True},
    ).json()
    assert alone["choices"][0]["text"] == body["choices"][3]["text"]


def test_streaming_sse_format(client: TestClient) -> None:
    body = {"model": "lm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "logprobs": True}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    tokens = [c for c in chunks[1:-1] if c["choices"][0]["logprobs"]]
    assert len(tokens) == 4 and all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize(
    ("route", "extra", "param", "code"),
    [
        ("chat", {"tools": []}, "tools", "unsupported_parameter"),
        ("chat", {"functions": []}, "functions", "unsupported_parameter"),
        ("chat", {"response_format": {"type": "text"}}, "response_format", "unsupported_parameter"),
        ("chat", {"logit_bias": {"3": 1}}, "logit_bias", "unsupported_parameter"),
        ("chat", {"whatever": 1}, "whatever", "unknown_parameter"),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", None),
        ("chat", {"messages": []}, "messages", None),
        ("chat", {"max_tokens": 1, "max_completion_tokens": 1}, "max_tokens", None),
        (
            "chat",
            {"max_completion_tokens": 100},
            "max_completion_tokens",
            "context_length_exceeded",
        ),
        ("completions", {"suffix": "x"}, "suffix", "unsupported_parameter"),
        ("completions", {"best_of": 3}, "best_of", "unsupported_parameter"),
        ("completions", {"echo": True}, "echo", "unsupported_parameter"),
        ("completions", {"prompt": [1, 999]}, "prompt", None),
        ("completions", {"top_p": 0}, "top_p", None),
        ("completions", {"n": 17}, "n", None),
        ("completions", {"stop": ""}, "stop", None),
        ("completions", {"logprobs": 21}, "logprobs", None),
        ("completions", {"model": None}, "model", None),
        ("completions", {"seed": "1"}, "seed", None),
        ("completions", {"stream": "yes"}, "stream", None),
        ("completions", {"best_of": True}, "best_of", "unsupported_parameter"),  # not 1
        ("completions", {"echo": 0}, "echo", "unsupported_parameter"),  # not false
        ("completions", {"user": 5}, "user", None),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x", "name": 1}]},
            "messages[0].name",
            None,
        ),
    ],
)
def test_bad_parameters_name_the_parameter(
    client: TestClient, route: str, extra: dict[str, Any], param: str, code: str | None
) -> None:
    if route == "chat":
        body = {"model": "lm", "messages": [{"role": "user", "content": "x"}], **extra}
        r = client.post("/v1/chat/completions", json=body)
    else:
        r = client.post("/v1/completions", json={"model": "lm", "prompt": "x", **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == code and error["message"]


def test_accepted_no_op_values(client: TestClient) -> None:
    body = {"model": "lm", "prompt": "x", "max_tokens": 2, "best_of": 1, "echo": False,
            "logit_bias": {}, "user": "u-1", "top_k": 5, "repetition_penalty": 1.2,
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "stop": ["\n"]}  # fmt: skip
    assert client.post("/v1/completions", json=body).status_code == 200


def test_not_json_and_unknown_model(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["message"] == "request body is not valid JSON"
    r = client.post("/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/other").status_code == 404


def test_models_list(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["lm", "lm:1"]
    assert body["data"][0]["owned_by"] == "shipyard" and body["data"][0]["object"] == "model"


def test_metrics_from_the_engine_observer(client: TestClient) -> None:
    client.post("/v1/completions", json={"model": "lm", "prompt": "abc", "max_tokens": 3,
                                          "ignore_eos": True})  # fmt: skip
    text = client.get("/metrics").text
    assert 'shipyard_generated_tokens_total{model="lm"}' in text
    assert 'shipyard_prompt_tokens_total{model="lm"}' in text
    assert 'shipyard_time_to_first_token_seconds_bucket{le="0.001",model="lm"}' in text
    assert 'shipyard_inter_token_latency_seconds_count{model="lm"}' in text
    assert 'shipyard_running_sequences{model="lm",version="1"} 0.0' in text
    assert 'shipyard_waiting_sequences{model="lm",version="1"} 0.0' in text


def test_auth_errors_use_the_openai_body(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    add_key(keys, "infer")
    app = create_app(ServeSettings(keys_file=keys, access_log=False), preloaded=[fake_lm()])
    with TestClient(app) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.json()["error"]["code"] == "invalid_api_key"
        # the other protocols keep their own body
        assert c.get("/v2/models/lm").json() == {"error": r.json()["error"]["message"]}


def test_generation_routes_keep_the_openai_error_body_and_route_metrics(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    secret, _ = add_key(keys, "infer")
    app = create_app(ServeSettings(keys_file=keys, access_log=False), preloaded=[fake_lm()])
    body = {"model": "lm", "prompt": "ab", "max_tokens": 2, "ignore_eos": True}
    with TestClient(app) as c:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = c.post(path, json=body)  # no key: refused by the lane, in OpenAI's body
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get(path).status_code == 405  # FastAPI still owns the other methods
        auth = {"Authorization": f"Bearer {secret}"}
        r = c.post("/v1/completions", json={**body, "model": "nope"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # the lane reports the route template to the metrics, as FastAPI's router would
        admin_secret, _ = add_key(keys, "admin")
        text = c.get("/metrics", headers={"Authorization": f"Bearer {admin_secret}"}).text
    assert 'route="/v1/completions",status="200"' in text
    assert 'route="/v1/chat/completions",status="401"' in text


def test_engine_is_created_at_load_and_closed_at_shutdown() -> None:
    app = create_app(ServeSettings(access_log=False, max_running_seqs=3, max_queue=5),
                     preloaded=[fake_lm()])  # fmt: skip
    with TestClient(app):
        engine = app.state.server.repo.get("lm").engine
        assert engine is not None and engine.max_batch_size == 3 and engine.max_queue == 5
    assert engine._thread is not None and not engine._thread.is_alive()


class _Exchange:
    """One streamed response over raw ASGI: the body generator's chunks, what was sent, and
    whether the generator was closed; the client hangs up after `hang_up_after` chunks."""

    def __init__(self, chunks: int, hang_up_after: int | None = None) -> None:
        self.chunks, self.hang_up_after = chunks, hang_up_after
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.gone = asyncio.Event()

    async def body(self) -> AsyncGenerator[bytes, None]:
        try:
            for i in range(self.chunks):
                yield b"data: %d\n\n" % i
            await asyncio.Event().wait()  # a token that never comes
        finally:
            self.closed = True

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if len(self.sent) - 1 == self.hang_up_after:
            self.gone.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def test_event_stream_stops_and_closes_its_body_when_the_client_hangs_up() -> None:
    ex = _Exchange(chunks=3, hang_up_after=2)

    async def run() -> None:  # returns normally: a hang-up ends the response, not the server
        await asyncio.wait_for(EventStream(ex.body())({"type": "http"}, ex.receive, ex.send), 10)

    asyncio.run(run())
    start = ex.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and b"content-length" not in headers
    assert ex.bodies() == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert ex.closed


def test_event_stream_passes_on_a_cancellation_from_outside() -> None:
    ex = _Exchange(chunks=1)

    async def run() -> None:
        task = asyncio.ensure_future(EventStream(ex.body())({"type": "http"}, ex.receive, ex.send))
        while len(ex.sent) < 2:
            await asyncio.sleep(0)
        task.cancel()  # the server stopping, say: not a hang-up, so it must propagate
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert ex.closed and ex.bodies() == [b"data: 0\n\n"]
