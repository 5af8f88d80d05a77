"""Tokenizers: byte-level (258 ids) or BPE trained locally, both saved as standard tokenizer.json.

Both kinds are `tokenizers`-library tokenizers (ByteLevel pre-tokenizer + ByteLevel decoder + BPE
model), so the saved `tokenizer.json` also loads with `tokenizers.Tokenizer.from_file`. Id layout:

    0 = <|pad|>          padding (sequence classification pads with id 0)
    1 = <|endoftext|>    end of document (language-model corpora put it between documents)
    byte kind: id = byte value + 2 (258 ids, no merges)
    bpe kind:  the 256 byte symbols, then learned merges (trained on the train split only)

Special-token text inside user input (e.g. a literal "<|endoftext|>") is encoded as plain text,
never as the special id, so input cannot inject control tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from shipyard.data.config import TokenizerConfig
from shipyard.errors import DataError

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
_BYTE_OFFSET = len(SPECIAL_TOKENS)


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (what ByteLevel produces)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, chars, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


def _configure(backend: HFTokenizer) -> HFTokenizer:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: b + _BYTE_OFFSET for b, sym in enumerate(_byte_symbols())})
    return vocab


def _is_byte_vocab(backend: HFTokenizer) -> bool:
    model = json.loads(backend.to_str())["model"]
    return not model.get("merges") and backend.get_vocab(with_added_tokens=True) == _byte_vocab()


class Tokenizer:
    """Text ⇄ token ids. Build with `Tokenizer.byte()`, `Tokenizer.train_bpe()` or `.load(path)`."""

    def __init__(self, backend: HFTokenizer) -> None:
        self._backend = backend
        # Not serialised by `tokenizers`: set on every construction so user text stays plain text.
        self._backend.encode_special_tokens = True
        for i, token in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(token) != i:
                raise DataError(
                    f"tokenizer must map {token!r} to id {i}; this tokenizer.json was not made by "
                    "shipyard (rebuild it with Tokenizer.byte() or Tokenizer.train_bpe())"
                )
        self.kind: Literal["byte", "bpe"] = "byte" if _is_byte_vocab(backend) else "bpe"

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def byte(cls) -> Tokenizer:
        """The byte-level tokenizer: every UTF-8 byte is one token (id = byte + 2)."""
        backend = _configure(HFTokenizer(models.BPE(vocab=_byte_vocab(), merges=[])))
        backend.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(backend)

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
    ) -> Tokenizer:
        """Train a byte-level BPE vocabulary on `texts` (pass the train split only)."""
        backend = _configure(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def from_config(cls, config: TokenizerConfig, train_texts: Sequence[str]) -> Tokenizer:
        """Build the tokenizer a `data.tokenizer` config asks for; BPE trains on `train_texts`."""
        if config.kind == "byte":
            return cls.byte()
        return cls.train_bpe(train_texts, config.vocab_size, config.min_frequency)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Rebuild a tokenizer from the text of a tokenizer.json."""
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception
            raise DataError(f"cannot read tokenizer JSON: {e}") from e
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `path` (a tokenizer.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist; save one with .save()")
        return cls.from_json(path.read_text(encoding="utf-8"))

    # -- use ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials included)."""
        return int(self._backend.get_vocab_size())

    @property
    def pad_id(self) -> int:
        """Id used to pad sequences (always 0)."""
        return 0

    @property
    def eos_id(self) -> int:
        """End-of-document id (always 1)."""
        return 1

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return [int(i) for i in self.encode_array(text)]

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array (fast path for the byte kind)."""
        if self.kind == "byte":
            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            return raw.astype(np.int64) + _BYTE_OFFSET
        return np.asarray(self._backend.encode(text).ids, dtype=np.int64)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Ids of every document, each followed by `eos_id`, concatenated (int64)."""
        eos = np.array([self.eos_id], dtype=np.int64)
        if self.kind == "byte":
            parts = [self.encode_array(t) for t in texts]
        else:
            parts = [np.asarray(e.ids, dtype=np.int64) for e in self._backend.encode_batch(texts)]
        return np.concatenate([p for part in parts for p in (part, eos)] or [eos[:0]])

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. Special tokens are dropped by default."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise DataError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.kind == "byte":
            if skip_special_tokens:
                return (
                    (arr[arr >= _BYTE_OFFSET] - _BYTE_OFFSET)
                    .astype(np.uint8)
                    .tobytes()
                    .decode("utf-8", errors="replace")
                )
            out: list[str] = []
            run: list[int] = []
            for i in arr.tolist():
                if i >= _BYTE_OFFSET:
                    run.append(i - _BYTE_OFFSET)
                    continue
                out.append(bytes(run).decode("utf-8", errors="replace"))
                out.append(SPECIAL_TOKENS[i])
                run = []
            out.append(bytes(run).decode("utf-8", errors="replace"))
            return "".join(out)
        return str(self._backend.decode(arr.tolist(), skip_special_tokens=skip_special_tokens))

    # -- persistence ----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The tokenizer.json text (the `tokenizers` library's own format)."""
        return str(self._backend.to_str())

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file, or a directory to put tokenizer.json in)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
