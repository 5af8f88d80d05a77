"""Supervised fine-tuning on chat data: an imported Qwen2-style checkpoint (tiny, random, built
with transformers), its own chat template, loss on assistant tokens only, LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.integration.test_hf_checkpoints import build_checkpoint

from shipyard.compress import import_hf
from shipyard.config import load_config
from shipyard.data.instructions import IGNORE_INDEX, chat_tokens, instruction_rows
from shipyard.errors import ConfigError, DataError, TrainError
from shipyard.package import load_package
from shipyard.train import build_data_and_model, evaluate_model, fit

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Chile": "Santiago",
}


def _conversation(country: str, system: bool) -> list[dict[str, str]]:
    # without a system message Qwen's template adds a long default one
    messages = [{"role": "system", "content": "Answer briefly."}] if system else []
    messages += [
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"{CAPITALS[country]}."},
    ]
    return messages


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("sft")
    # initializer_range 0.2: with transformers' default 0.02 the frozen (tied) head's logits stay
    # within about ±1.3, so no adapter could make an answer likely; real checkpoints are not flat
    _, tok = build_checkpoint("qwen2", root / "hf", seed=0, initializer_range=0.2)
    return import_hf(root / "hf", root / "pkg", name="tiny-qwen"), tok


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [
        {"messages": _conversation(country, system=True)} for i in range(10) for country in CAPITALS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(base: Path, chats: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "capitals-sft",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": str(chats),
            "format": "chat",
            "block_size": 64,
            "splits": {"train": 0.8, "val": 0.1, "test": 0.1},
        },
        "model": {"name": "pretrained", "path": str(base)},
        "finetune": {
            "method": "lora",
            "rank": 2,
            "alpha": 16,
            "targets": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "train": {"epochs": None, "max_steps": 100, "batch_size": 8, "log_every": 1000},
        "eval": {"every_steps": 1000},
        **extra,
    }


def test_assistant_tokens_are_exactly_the_answer_and_its_end_of_turn(
    base: tuple[Path, Any],
) -> None:
    pkg, tok = base
    tokenizer = load_package(pkg).tokenizer
    messages = _conversation("Peru", system=True)
    ids, answer = chat_tokens(tokenizer, messages)
    reference = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if not isinstance(reference, list):  # transformers 5 returns a BatchEncoding
        reference = list(reference["input_ids"])
    assert ids == reference
    answer_ids = [i for i, a in zip(ids, answer, strict=True) if a]
    assert tok.decode(answer_ids) == "Lima.<|im_end|>\n"
    ds, truncated, dropped, n = instruction_rows([{"messages": messages}], "chat", tokenizer, 64)
    x, y = ds.x[0], ds.y[0]
    scored = y != IGNORE_INDEX
    assert int(scored.sum()) == n == len(answer_ids) and truncated == dropped == 0
    # y is x shifted by one, scored only where the next token is an answer token
    assert y[scored].tolist() == answer_ids
    assert x[: len(ids) - 1].tolist() == ids[:-1]


def test_overlong_examples_are_cut_dropped_or_refused(base: tuple[Path, Any]) -> None:
    tokenizer = load_package(base[0]).tokenizer
    recs = [
        {"prompt": "Q: " + "word " * 40, "completion": "A."},
        {"prompt": "Q:", "completion": "B"},
    ]
    _, cut, left, _ = instruction_rows(recs, "prompt-completion", tokenizer, 16)
    assert (cut, left) == (1, 0)
    ds, cut, left, _ = instruction_rows(recs, "prompt-completion", tokenizer, 16, overlong="drop")
    assert (cut, left, len(ds)) == (0, 1, 1)
    with pytest.raises(DataError, match="more than block_size"):
        instruction_rows(recs, "prompt-completion", tokenizer, 16, overlong="error")


def test_bad_instruction_data_is_a_clear_error(
    base: tuple[Path, Any], chats: Path, tmp_path: Path
) -> None:
    too_long = load_config(_config(base[0], chats), ["data.block_size=100000"])
    with pytest.raises(TrainError, match=r"data\.block_size 100000 is longer than the model's"):
        build_data_and_model(too_long)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = load_config(_config(base[0], bad))
    with pytest.raises(DataError, match=r"bad.jsonl:1: no assistant message"):
        build_data_and_model(config)
    with pytest.raises(ConfigError, match="instruction data for task language-modeling"):
        load_config(
            {
                "name": "x",
                "task": "classification",
                "data": {"source": str(bad), "format": "chat"},
                "model": {"name": "mlp"},
            }
        )


def test_lora_sft_learns_the_answers(base: tuple[Path, Any], chats: Path, tmp_path: Path) -> None:
    pkg = base[0]
    config = load_config(_config(pkg, chats))
    result = fit(config, run_dir=tmp_path / "run", progress=False)
    summary = result.summary
    assert summary["trainable_parameters"] < 0.05 * summary["parameters"]
    stats = summary["instruction_examples"]
    assert stats["examples"]["train"] == 48 and stats["truncated"]["train"] == 0
    data, _ = build_data_and_model(load_config(_config(pkg, chats), ["finetune.method=full"]))
    before = evaluate_model(load_package(pkg).model, data, "test", config)["loss"]
    after = result.metrics["test"]["loss"]
    # measured: about 6 -> 0.05 nats per answer token
    assert after < 0.3 * before, (after, before)
    # greedy answer of the fine-tuned package to a question it was trained on
    tuned = load_package(result.run_dir / "package")
    prompt = tuned.tokenizer.chat_prompt_ids(_conversation("Kenya", system=True)[:2])
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(10):
            nxt = int(tuned.model(ids)[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert tuned.tokenizer.decode(out).startswith("Nairobi")
