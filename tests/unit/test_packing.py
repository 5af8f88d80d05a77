"""Packing short instruction examples into full windows (`data.packing`): each example in a packed
row gets the logits and loss it gets alone (GPT and Llama, sliding windows included), the packer
keeps every example whole, the config refuses packing where it has no meaning, and a tiny run
trains on packed rows end to end with the counts in its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shipyard.config import load_config
from shipyard.data.instructions import (
    IGNORE_INDEX,
    TokenizedExamples,
    pack_examples,
    packing_summary,
    pad_examples,
)
from shipyard.errors import ConfigError, ModelError, TrainError
from shipyard.models import GPT, GPTConfig, Llama, LlamaConfig, RNNConfig, build_model
from shipyard.models.protocol import segment_attention_mask, segment_runs
from shipyard.train import build_data_and_model, evaluate_model, fit
from shipyard.train.trainer import check_packing

VOCAB = 50
BLOCK = 16


def _examples(lengths: list[int], seed: int = 0) -> TokenizedExamples:
    """Examples of the given input lengths; the second half of each is its answer."""
    gen = torch.Generator().manual_seed(seed)
    inputs, targets = [], []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n + 1,), generator=gen).numpy()
        y = ids[1:].copy()
        y[: n // 2] = IGNORE_INDEX
        inputs.append(ids[:-1])
        targets.append(y)
    return TokenizedExamples(inputs, targets)


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": BLOCK,
    }
    return {
        "gpt": GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=BLOCK), VOCAB),
        "llama": Llama(LlamaConfig(**llama)),
        # a sliding window shorter than the examples: the mask must combine both limits
        "mistral": Llama(LlamaConfig(**llama, model_type="mistral", sliding_window=3)),
        "qwen2": Llama(
            LlamaConfig(
                **llama,
                model_type="qwen2",
                qkv_bias=True,
                sliding_window=4,
                layer_types=["full_attention", "sliding_attention"],
            )
        ),
    }


@pytest.mark.parametrize("family", ["gpt", "llama", "mistral", "qwen2"])
def test_packed_rows_give_each_example_its_own_logits_and_loss(family: str) -> None:
    model = _models()[family].eval()
    ex = _examples([5, 9, 3, 7, 11, 2, 6])
    packed = pack_examples(ex, BLOCK, pad_id=0)
    assert len(packed) < len(ex)  # several examples share a row
    with torch.no_grad():
        logits = model(packed.x, segments=packed.segments)  # (rows, BLOCK, V)
        crossed = model(packed.x)  # the same rows with attention across examples
    found = 0
    for r in range(len(packed)):
        for seg in packed.segments[r].unique().tolist():
            slots = (packed.segments[r] == seg).nonzero().flatten()
            if bool((packed.x[r, slots] == 0).all()):
                continue  # the row's padding (example tokens are never 0 here)
            i = next(
                k
                for k, x in enumerate(ex.inputs)
                if len(x) == len(slots) and np.array_equal(x, packed.x[r, slots].numpy())
            )
            with torch.no_grad():
                alone = model(torch.as_tensor(ex.inputs[i])[None])[0]  # (n, V)
            torch.testing.assert_close(logits[r, slots], alone, atol=1e-5, rtol=1e-5)
            y = torch.as_tensor(ex.targets[i])
            loss_packed = F.cross_entropy(logits[r, slots], packed.y[r, slots], reduction="sum")
            loss_alone = F.cross_entropy(alone, y, reduction="sum")
            torch.testing.assert_close(loss_packed, loss_alone, atol=1e-5, rtol=1e-5)
            found += 1
            if slots[0] > 0:  # a later example of a row: attention across would change it
                assert not torch.allclose(crossed[r, slots], alone, atol=1e-3)
    assert found == len(ex)


def test_packed_batch_loss_equals_the_padded_batch_loss() -> None:
    """What the trainer sums: every answer token once, each scored as if alone."""
    ex = _examples([5, 9, 3, 7, 11, 2, 6], seed=1)
    padded, packed = pad_examples(ex, BLOCK, 0), pack_examples(ex, BLOCK, 0)
    assert int((packed.y != IGNORE_INDEX).sum()) == int((padded.y != IGNORE_INDEX).sum())
    for model in _models().values():
        model.eval()
        with torch.no_grad():
            a = model(padded.x).flatten(0, 1)
            b = model(packed.x, segments=packed.segments).flatten(0, 1)
        loss_padded = F.cross_entropy(a, padded.y.flatten(), reduction="sum")
        loss_packed = F.cross_entropy(b, packed.y.flatten(), reduction="sum")
        torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=1e-5)


def test_segment_runs_restart_positions_and_separate_repeated_ids() -> None:
    segments = torch.tensor([[1, 1, 1, 2, 2, 1, 1, 3]])
    runs, positions = segment_runs(segments)
    assert runs.tolist() == [[1, 1, 1, 2, 2, 3, 3, 4]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    mask = segment_attention_mask(runs, None)[0, 0]
    assert mask[6].tolist() == [False] * 5 + [True, True, False]  # the second run of id 1
    windowed = segment_attention_mask(runs, 2)[0, 0]
    assert windowed[2].tolist() == [False, True, True] + [False] * 5


def test_packer_keeps_every_example_whole_best_fit_decreasing() -> None:
    ex = _examples([10, 6, 6, 5, 4, 16, 1])
    packed = pack_examples(ex, BLOCK, pad_id=0)
    # longest first, each into the fullest row with room: [16], [10 6], [6 5 4 1]
    rows = [
        [int((packed.segments[r] == s).sum()) for s in range(1, int(packed.segments[r].max()) + 1)]
        for r in range(len(packed))
    ]
    assert rows == [[16], [10, 6], [6, 5, 4, 1]]
    assert packed.x.shape == (3, BLOCK)
    # every example's tokens and targets appear once, in one piece
    pieces = sorted(
        tuple(packed.x[r, packed.segments[r] == s].tolist())
        for r in range(3)
        for s in range(1, len(rows[r]) + 1)
    )
    assert pieces == sorted(tuple(x.tolist()) for x in ex.inputs)
    assert torch.equal(pack_examples(ex, BLOCK, 0).x, packed.x)  # deterministic
    summary = packing_summary(ex, len(packed), BLOCK)
    assert summary == {
        "examples": 7,
        "windows": 3,
        "padding_unpacked": round(1 - 48 / (7 * 16), 4),
        "padding_packed": 0.0,
    }


def test_segments_are_refused_with_a_cache_or_a_mask() -> None:
    model = _models()["gpt"]
    x = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ModelError, match="kv_cache or an attention_mask"):
        model(x, segments=torch.ones_like(x), kv_cache=model.new_kv_cache())  # type: ignore[operator]
    with pytest.raises(ModelError, match="shape of idx"):
        model(x, segments=torch.ones(1, 3, dtype=torch.long))


def _chat_config(path: Path, **data: Any) -> dict[str, Any]:
    return {
        "name": "packed-sft",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": str(path),
            "format": "prompt-completion",
            "tokenizer": {"kind": "byte"},
            "splits": {"train": 0.8, "val": 0.2, "test": 0.0},
            "packing": True,
            **data,
        },
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 48},
        "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": None, "max_steps": 3, "batch_size": 2, "log_every": 1},
        "eval": {"every_steps": 3},
    }


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_packing_config_errors(pairs: Path) -> None:
    text = _chat_config(pairs, format="text")
    with pytest.raises(ConfigError, match=r"data\.packing packs chat / prompt-completion"):
        load_config(text)
    rnn = {**_chat_config(pairs), "model": {"name": "rnn", "hidden_size": 8}}
    with pytest.raises(ConfigError, match=r"data.packing needs a model .*model.name='rnn'"):
        load_config(rnn)
    private = _chat_config(pairs)
    private["train"]["privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with pytest.raises(ConfigError, match=r"data\.packing \(DP-SGD protects one row"):
        load_config(private)
    assert load_config(_chat_config(pairs, packing=False)).data.packing is False


def test_packed_train_split_evaluates_like_the_padded_one(pairs: Path) -> None:
    config = load_config(_chat_config(pairs))
    data, model = build_data_and_model(config)
    padded, _ = build_data_and_model(load_config(_chat_config(pairs, packing=False)))
    assert len(data.train) < len(padded.train)  # type: ignore[arg-type]
    packed_loss = evaluate_model(model, data, "train", config)["loss"]
    padded_loss = evaluate_model(model, padded, "train", config)["loss"]
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)


def test_a_packed_run_trains_and_reports_its_packing(pairs: Path, tmp_path: Path) -> None:
    result = fit(load_config(_chat_config(pairs)), run_dir=tmp_path / "run")
    assert result.steps == 3
    stats = result.summary["instruction_examples"]
    packing = stats["packing"]["train"]
    assert packing["examples"] == stats["examples"]["train"] == 24
    assert packing["windows"] < packing["examples"]
    assert packing["padding_packed"] < packing["padding_unpacked"]
    assert "val" not in stats["packing"]  # val keeps one example per row
    assert result.metrics["val"]["loss"] > 0
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["run"]["instruction_examples"]["packing"]["train"] == packing


def test_packing_refuses_a_model_without_segments_and_a_teacher() -> None:
    lm = RNNConfig(head="lm", n_embd=8, hidden_size=8, block_size=BLOCK)
    rnn = build_model(lm, input_shape=(BLOCK,), num_outputs=VOCAB, vocab_size=VOCAB)
    with pytest.raises(TrainError, match="forward takes segments="):
        check_packing(rnn, None)
    gpt = _models()["gpt"]
    with pytest.raises(TrainError, match="cannot be combined with distillation"):
        check_packing(gpt, _models()["gpt"])
    check_packing(gpt, None)
