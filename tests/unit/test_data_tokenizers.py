"""Tokenizers (byte, BPE) and language-model corpora (token cache, windows)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from shipyard.data import DataConfig, SplitRatios, Tokenizer, TokenWindows, prepare_data
from shipyard.data.corpus import tokenize_to_file
from shipyard.errors import DataError

TEXT = "Hello, wörld! 日本語 ☃ emoji 🚀\n\ttabs and  spaces\x00"


def test_byte_tokenizer_round_trip_and_layout() -> None:
    tok = Tokenizer.byte()
    assert tok.kind == "byte" and tok.vocab_size == 258
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids = tok.encode(TEXT)
    assert ids == [b + 2 for b in TEXT.encode("utf-8")]  # id = byte + 2
    assert tok.decode(ids) == TEXT
    assert tok.decode([2 + 0xE2]) == "\ufffd"  # a lone lead byte: replacement character
    assert tok.decode([tok.eos_id, *tok.encode("a")], skip_special_tokens=False) == (
        "<|endoftext|>a"
    )


def test_special_token_text_is_plain_text() -> None:
    for tok in (Tokenizer.byte(), Tokenizer.train_bpe(["some text " * 20], 300, 2)):
        ids = tok.encode("a<|endoftext|>b")
        assert tok.eos_id not in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_byte_tokenizer_file_is_standard_tokenizer_json(tmp_path: Path) -> None:
    tok = Tokenizer.byte()
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    assert Tokenizer.load(tmp_path) == tok and Tokenizer.load(path).kind == "byte"
    assert Tokenizer.from_json(tok.to_json()) == tok
    hf = HFTokenizer.from_file(str(path))  # the `tokenizers` library reads it as is
    assert hf.encode(TEXT).ids == tok.encode(TEXT)
    assert hf.decode(tok.encode(TEXT)) == TEXT


def test_bpe_round_trip_save_load(tmp_path: Path) -> None:
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "naïve café über straße " * 10]
    tok = Tokenizer.train_bpe(corpus, vocab_size=300, min_frequency=2)
    assert tok.kind == "bpe" and 258 < tok.vocab_size <= 300
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    for text in (TEXT, corpus[1], "unseen ЖЖЖ text ✓"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    loaded = Tokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    assert loaded == tok and loaded.kind == "bpe"
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_bpe_is_trained_on_train_split_only(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"train{i}.txt").write_text("abab abab abab " * 50)
    (tmp_path / "val.txt").write_text("xyzq xyzq xyzq " * 400)
    config = DataConfig(
        files={"train": str(tmp_path / "train*.txt"), "val": str(tmp_path / "val.txt")},
        tokenizer={"kind": "bpe", "vocab_size": 300, "min_frequency": 2},
    )
    data = prepare_data(config, "language-modeling", seed=0, block_size=4, cache_dir=tmp_path)
    tok = data.tokenizer
    assert tok is not None
    assert len(tok.encode("abab")) == 1  # a train word is one token
    assert len(tok.encode("xyzq")) == 4  # a val-only word got no merges


def test_token_windows_shift_by_one() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    ds = TokenWindows(tokens, block_size=4, stride=1)
    assert len(ds) == 6  # windows start at 0..5 (need block_size + 1 tokens each)
    x, y = ds[2]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(ds[-1][1], torch.tensor([6, 7, 8, 9]))
    with pytest.raises(IndexError):
        ds[6]
    xb, yb = ds.get_batch([0, 5])
    assert torch.equal(xb[1], ds[5][0]) and torch.equal(yb[0], ds[0][1])
    blocks = TokenWindows(tokens, block_size=4)  # stride = block_size
    assert len(blocks) == 2 and blocks[1][0].tolist() == [4, 5, 6, 7]
    assert len(TokenWindows(tokens[:4], block_size=4)) == 0


def _lm_config(tmp_path: Path) -> DataConfig:
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 30)
    return DataConfig(
        source=str(tmp_path / "d*.txt"),
        tokenizer={"kind": "byte"},
        splits=SplitRatios(train=0.5, val=0.25, test=0.25),
    )


def test_token_cache_is_reused_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, cache = _lm_config(tmp_path), tmp_path / "cache"
    first = prepare_data(config, "language-modeling", 0, block_size=16, cache_dir=cache)
    files = sorted(cache.iterdir())
    assert len(files) == 3 and all(f.suffix == ".uint16" for f in files)  # one per split
    mtimes = [f.stat().st_mtime_ns for f in files]

    calls = []
    original = Tokenizer.encode_documents

    def counting(self: Tokenizer, texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_documents", counting)
    second = prepare_data(config, "language-modeling", 0, block_size=16, cache_dir=cache)
    assert calls == []  # nothing re-tokenized
    assert [f.stat().st_mtime_ns for f in sorted(cache.iterdir())] == mtimes
    assert torch.equal(first.train[3][0], second.train[3][0])
    assert not list(cache.glob("*.tmp"))


def test_crash_while_writing_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        tokenize_to_file(["some text"], Tokenizer.byte(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_token_windows_pickle_reopens_memmap(tmp_path: Path) -> None:
    tokens = tokenize_to_file(["abcdefghij" * 3], Tokenizer.byte(), tmp_path)
    assert isinstance(tokens, np.memmap)
    ds = TokenWindows(tokens, block_size=5, stride=2)
    again = pickle.loads(pickle.dumps(ds))
    assert isinstance(again.tokens, np.memmap) and len(again) == len(ds)
    assert torch.equal(again[3][0], ds[3][0])


def test_lm_errors(tmp_path: Path) -> None:
    config = _lm_config(tmp_path)
    with pytest.raises(DataError, match="needs block_size"):
        prepare_data(config, "language-modeling", 0, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"needs data\.tokenizer"):
        prepare_data(
            config.model_copy(update={"tokenizer": None}), "language-modeling", 0, block_size=4
        )
    per_doc = len("document 0 " * 30) + 1
    with pytest.raises(DataError) as err:
        prepare_data(config, "language-modeling", 0, block_size=per_doc, cache_dir=tmp_path)
    msg = str(err.value)
    assert "split has" in msg and f"{per_doc} tokens" in msg and f"needs {per_doc + 1}" in msg
