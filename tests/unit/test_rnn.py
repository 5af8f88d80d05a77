"""The rnn model: shapes, padding, parity with torch LSTM/GRU, training, packaging, generation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.data import DataInfo
from shipyard.data.tokenization import Tokenizer
from shipyard.errors import ConfigError, ModelError
from shipyard.generate import SamplingParams, generate
from shipyard.models import RNN, RNNConfig, build_model
from shipyard.package import load_package
from shipyard.package.loading import build_empty_model
from shipyard.serve import ServeSettings, create_app
from shipyard.train import fit

VOCAB = 12


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def rnn(**overrides: Any) -> RNN:
    cfg = RNNConfig(n_embd=4, hidden_size=5, head="sequence").model_copy(update=overrides)
    model = build_model(cfg, num_outputs=3, vocab_size=VOCAB)
    assert isinstance(model, RNN)
    return model.eval()


# --- shapes, padding, parity ---------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_sequence_head_shapes(cell: str, bidirectional: bool) -> None:
    model = rnn(cell=cell, bidirectional=bidirectional, n_layer=2)
    x = torch.randint(1, VOCAB, (4, 7))
    assert model(x).shape == (4, 3)
    assert model.head.in_features == 5 * (2 if bidirectional else 1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_head_shapes(cell: str) -> None:
    model = rnn(cell=cell, head="lm", n_layer=2)
    assert model(torch.randint(1, VOCAB, (2, 6))).shape == (2, 6, VOCAB)


def reference_sequence_output(model: RNN, ids: list[int]) -> torch.Tensor:
    """The prediction for one unpadded sequence from a separate torch LSTM/GRU with the same
    weights, no packing: forward state after the last token, backward state after the first."""
    cfg = model.config
    cls = torch.nn.LSTM if cfg.cell == "lstm" else torch.nn.GRU
    ref = cls(
        cfg.n_embd,
        cfg.hidden_size,
        num_layers=cfg.n_layer,
        batch_first=True,
        bidirectional=cfg.bidirectional,
    )
    ref.load_state_dict(model.rnn.state_dict())
    emb = model.wte(torch.tensor([ids]))  # (1, T, E)
    out, _ = ref(emb)  # (1, T, dirs * H)
    H = cfg.hidden_size
    last = out[0, -1, :H]
    if cfg.bidirectional:
        last = torch.cat([last, out[0, 0, H:]])  # backward direction ends at the first token
    return model.head(last)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_is_ignored_and_matches_torch_reference(cell: str, bidirectional: bool) -> None:
    model = rnn(cell=cell, bidirectional=bidirectional, n_layer=2)
    seqs = [[3, 4, 5], [6, 7, 8, 9, 2, 11], [10]]
    x = torch.zeros(3, 8, dtype=torch.long)  # right-padded with PAD_ID 0
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        batched = model(x)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(batched[i], reference_sequence_output(model, s))
            # the same row with more padding, alone, gives the same prediction
            alone = torch.zeros(1, 12, dtype=torch.long)
            alone[0, : len(s)] = torch.tensor(s)
            torch.testing.assert_close(model(alone)[0], batched[i])


def test_all_padding_row_stays_finite() -> None:
    out = rnn(bidirectional=True)(torch.zeros(2, 5, dtype=torch.long))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_matches_torch_and_state_continues_the_sequence(cell: str) -> None:
    model = rnn(cell=cell, head="lm", n_layer=2)
    x = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(x)
        y, _ = model.rnn(model.wte(x))
        torch.testing.assert_close(full, model.head(y))  # plain torch layers, same weights
        state = model.new_state()
        parts = [model(x[:, :4], kv_cache=state)]
        parts += [model(x[:, t : t + 1], kv_cache=state) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    assert state.seq_len == 9


def test_meta_device_rebuild_then_load_runs_with_the_loaded_weights() -> None:
    """Packages rebuild models on the meta device and swap in fresh storage; nn.LSTM keeps its
    own list of weight tensors, which loading the state must refresh."""
    model = rnn(bidirectional=True, n_layer=2)
    info = DataInfo("classification", (8,), 3, None, None, VOCAB, {"train": 1}, "0" * 64)
    empty = build_empty_model(model.config, info)
    empty.load_state_dict(model.state_dict())
    x = torch.randint(1, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(empty.eval()(x), model(x))


def test_model_errors() -> None:
    with pytest.raises(ModelError, match="needs head"):
        build_model(RNNConfig(), num_outputs=2, vocab_size=VOCAB)
    with pytest.raises(ModelError, match=r"shape \(B, T\)"):
        rnn()(torch.ones(3, dtype=torch.long))
    with pytest.raises(ModelError, match="takes no state"):
        rnn()(torch.ones(1, 3, dtype=torch.long), kv_cache=rnn(head="lm").new_state())
    with pytest.raises(ModelError, match="vocab_size=7"):
        build_model(RNNConfig(head="lm", vocab_size=7), vocab_size=VOCAB)


# --- config --------------------------------------------------------------------------------------


def text_config(tmp_path: Path, **model: Any) -> dict[str, Any]:
    return {
        "name": "rnn-cls",
        "task": "classification",
        "data": {
            "source": str(tmp_path / "reviews.csv"),
            "text_column": "text",
            "target": "label",
            "tokenizer": {"kind": "byte"},
            "splits": {"train": 0.7, "val": 0.15, "test": 0.15},
        },
        "model": {"name": "rnn", "n_embd": 8, "hidden_size": 16, "block_size": 16, **model},
        "optim": {"name": "adam", "lr": 0.02},
        "train": {"epochs": None, "max_steps": 40, "batch_size": 16, "log_every": 10},
        "eval": {"every_steps": 20},
    }


def lm_config(tmp_path: Path, **model: Any) -> dict[str, Any]:
    return {
        "name": "rnn-lm",
        "task": "language-modeling",
        "data": {
            "source": str(tmp_path / "corpus.txt"),
            "format": "text",
            "tokenizer": {"kind": "byte"},
            "shuffle": False,
            "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
        },
        "model": {"name": "rnn", "n_embd": 16, "hidden_size": 32, "block_size": 16, **model},
        "optim": {"name": "adam", "lr": 0.02},
        "train": {"epochs": None, "max_steps": 80, "batch_size": 16, "log_every": 20},
    }


def test_head_follows_the_task_and_mismatches_are_errors(tmp_path: Path) -> None:
    assert load_config(text_config(tmp_path)).model.head == "sequence"  # type: ignore[union-attr]
    assert load_config(lm_config(tmp_path)).model.head == "lm"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"model\.head 'lm' does not fit task 'classification'"):
        load_config(text_config(tmp_path, head="lm"))
    with pytest.raises(ConfigError, match="reads left to right only"):
        load_config(lm_config(tmp_path, bidirectional=True))
    with pytest.raises(ConfigError, match=r"model\.cell"):
        load_config(text_config(tmp_path, cell="rnn"))


# --- real runs -----------------------------------------------------------------------------------


def write_reviews(path: Path) -> None:
    """Texts whose class is whether they contain 'x' (anywhere, so order matters little)."""
    gen = torch.Generator().manual_seed(1)
    rows = ["text,label"]
    for i in range(240):
        n = int(torch.randint(3, 12, (1,), generator=gen))
        letters = [chr(97 + int(c)) for c in torch.randint(0, 6, (n,), generator=gen)]
        pos = i % 2 == 0
        if pos:
            letters[int(torch.randint(0, n, (1,), generator=gen))] = "x"
        rows.append(f"{''.join(letters)},{'pos' if pos else 'neg'}")
    path.write_text("\n".join(rows) + "\n")


def test_lstm_classifier_trains_packages_and_predicts(tmp_path: Path) -> None:
    write_reviews(tmp_path / "reviews.csv")
    cfg = load_config(text_config(tmp_path, bidirectional=True))
    result = fit(cfg, run_dir=tmp_path / "run")
    assert result.metrics["test"]["accuracy"] >= 0.9, result.metrics["test"]
    loaded = load_package(result.run_dir / "package")
    assert loaded.manifest.architecture.name == "rnn"
    assert loaded.signature.inputs[0].name == "input_ids"
    texts = ["abxcd", "abcdef", "x"]
    preds = loaded.predict(texts)
    assert [p["label"] for p in preds] == ["pos", "neg", "pos"]
    # the package predicts exactly what the in-process model does on the same token ids
    ids = torch.from_numpy(loaded.encode_texts(texts))
    model = build_model(
        cfg.model, num_outputs=2, vocab_size=Tokenizer.byte().vocab_size
    )  # same architecture, weights from the package
    model.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        probs = torch.softmax(model.eval()(ids), dim=-1)
    for row, pred in zip(probs, preds, strict=True):
        assert [pred["probabilities"][n] for n in ("neg", "pos")] == pytest.approx(row.tolist())
    with TestClient(create_app(ServeSettings(max_wait_ms=0), preloaded=[loaded])) as client:
        r = client.post("/v1/models/rnn-cls:predict", json={"instances": texts})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == preds


def test_char_lstm_language_model_trains_packages_and_generates(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("hello world. " * 200)
    result = fit(load_config(lm_config(tmp_path, cell="gru")), run_dir=tmp_path / "run")
    package = result.run_dir / "package"
    loaded = load_package(package)
    assert loaded.task == "language-modeling"
    # the tensor protocol: logits for every position
    assert loaded.predict_arrays(loaded.encode_texts(["hello"]))["logits"].shape == (
        1,
        5,
        loaded.tokenizer.vocab_size,  # type: ignore[union-attr]
    )
    ids = loaded.encode_texts(["hello"])
    with TestClient(create_app(ServeSettings(max_wait_ms=0), preloaded=[loaded])) as client:
        tensor = {
            "name": "input_ids",
            "datatype": "INT64",
            "shape": [1, 5],
            "data": ids[0].tolist(),
        }
        r = client.post("/v2/models/rnn-lm/infer", json={"inputs": [tensor]})
        assert r.status_code == 200, r.text
        logits = r.json()["outputs"][0]
        assert logits["shape"] == [1, 5, loaded.tokenizer.vocab_size]  # type: ignore[union-attr]
        want = loaded.predict_arrays(ids)["logits"].reshape(-1)
        assert logits["data"] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
        # the OpenAI routes serve it through the batching engine (tests/integration has more)
        body = {"model": "rnn-lm", "prompt": "hello ", "max_tokens": 24, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "world. hello world. hell"
    params = SamplingParams(max_tokens=24, temperature=0.0)
    out = generate(loaded.model, loaded.tokenizer, "hello ", params)  # type: ignore[arg-type]
    assert out.text == "world. hello world. hell"
    # longer than block_size: a recurrent model has no context limit
    params = SamplingParams(max_tokens=40)
    long = generate(loaded.model, loaded.tokenizer, "hello", params)  # type: ignore[arg-type]
    assert long.completion_tokens == 40

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard",
            "generate",
            str(package),
            "-p",
            "hello ",
            "-n",
            "12",
            "-t",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["text"] == "world. hello"
