"""An imported Hugging Face checkpoint served by `shipyard serve` (a real subprocess on an
ephemeral loopback port) and called with the official `openai` SDK: chat and completions,
streaming and not. Prompt token counts equal transformers' `apply_chat_template`, and greedy
output equals `transformers`' own greedy generation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from tests.conftest import ROOT
from tests.hf_support import MESSAGES
from tests.integration.test_hf_checkpoints import build_checkpoint

from shipyard.compress import import_hf
from shipyard.serve.launch import serve_command, served

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

MODEL = "tiny-qwen"
WAIT_S = 60.0


STOP_AT = 4  # the greedy chat answer to MESSAGES[0] ends here: its next token is an EOS id


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, Path]:
    """A tiny Qwen2 checkpoint whose generation_config lists two EOS ids: <|im_end|> and the
    token its greedy answer to MESSAGES[0] produces at STOP_AT (so the second id must end it)."""
    root = tmp_path_factory.mktemp("openai-hf")
    ref, tok = build_checkpoint("qwen2", root / "hf", seed=3, initializer_range=0.3)
    greedy = _greedy(ref, _chat_ids(tok, MESSAGES[0]), STOP_AT + 1)
    assert greedy[STOP_AT] not in greedy[:STOP_AT] and greedy[STOP_AT] < len(tok)
    generation = json.loads((root / "hf" / "generation_config.json").read_text())
    generation["eos_token_id"] = [tok.convert_tokens_to_ids("<|im_end|>"), greedy[STOP_AT]]
    (root / "hf" / "generation_config.json").write_text(json.dumps(generation))
    package = import_hf(root / "hf", root / "pkg", name=MODEL)
    return root / "hf", ref, tok, package


@pytest.fixture(scope="module")
def url(checkpoint: tuple[Path, Any, Any, Path]) -> Iterator[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with served(serve_command(str(checkpoint[3])), env=env, cwd=ROOT) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _greedy(ref: Any, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of `ids` (EOS ignored), n tokens."""
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = ref.generate(
            x,
            attention_mask=torch.ones_like(x),  # not inferred from pad ids: prompts contain them
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_prompt_tokens_and_greedy_text_match_transformers(
    client: openai.OpenAI, checkpoint: tuple[Path, Any, Any, Path], messages: list[dict[str, str]]
) -> None:
    _, ref, tok, _ = checkpoint
    ids = _chat_ids(tok, messages)
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 12
    want = tok.decode(_greedy(ref, ids, 12), skip_special_tokens=True)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    # streamed: the same text in pieces, the same usage at the end
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == len(ids)


def test_completions_prompt_tokens_match_the_tokenizer(
    client: openai.OpenAI, checkpoint: tuple[Path, Any, Any, Path]
) -> None:
    _, ref, tok, _ = checkpoint
    prompt = "The quick brown fox"
    ids = tok(prompt)["input_ids"]
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    want = tok.decode(_greedy(ref, ids, 8), skip_special_tokens=True)
    assert r.choices[0].text == want
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == want


def test_generation_stops_at_any_eos_id_and_bad_messages_are_400(
    client: openai.OpenAI, checkpoint: tuple[Path, Any, Any, Path]
) -> None:
    _, ref, tok, _ = checkpoint
    messages = MESSAGES[0]
    greedy = _greedy(ref, _chat_ids(tok, messages), STOP_AT + 1)
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"  # the second EOS id of generation_config
    assert r.choices[0].message.content == tok.decode(greedy[:STOP_AT], skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError, match="tool messages are not supported"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "tool", "content": "x"}],  # type: ignore[list-item]
        )
