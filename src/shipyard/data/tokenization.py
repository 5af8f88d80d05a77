"""Tokenizers: byte-level (258 ids) or BPE trained locally, both saved as standard tokenizer.json.

Both kinds are `tokenizers`-library tokenizers (ByteLevel pre-tokenizer + ByteLevel decoder + BPE
model), so the saved `tokenizer.json` also loads with `tokenizers.Tokenizer.from_file`. Id layout:

    0 = <|pad|>          padding (sequence classification pads with id 0)
    1 = <|endoftext|>    end of document (language-model corpora put it between documents)
    byte kind: id = byte value + 2 (258 ids, no merges)
    bpe kind:  the 256 byte symbols, then learned merges (trained on the train split only)

Special-token text inside user input (e.g. a literal "<|endoftext|>") is encoded as plain text,
never as the special id, so input cannot inject control tokens.

A third kind, "hf", is a Hugging Face checkpoint's own tokenizer.json taken as it is (special
tokens anywhere in the vocabulary) together with `HFTokenizerConfig`: its special tokens, whether
a prompt starts with BOS, every id that ends generation (EOS may be a list), and the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from shipyard.data.chat import FALLBACK_STOPS, ChatTemplate, fallback_prompt, select_template
from shipyard.data.config import TokenizerConfig
from shipyard.errors import DataError

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # an HF tokenizer's settings, beside it
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
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


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@dataclass(frozen=True)
class HFTokenizerConfig:
    """What a Hugging Face checkpoint says about its tokenizer beyond tokenizer.json.

    special_tokens: {"bos_token": "<s>", "eos_token": ..., ...} (the template sees these).
    add_bos_token / add_eos_token: None keeps tokenizer.json's post-processor; True/False
        replace it, as transformers does when tokenizer_config.json sets them.
    eos_token_ids: every id that ends generation (eos_token's id and generation_config's).
    chat_template: the Jinja chat template text, if the model has one.
    generation_config: generation_config.json as read (kept for export).
    """

    special_tokens: dict[str, str] = field(default_factory=dict)
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    model_max_length: int | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(
        cls,
        tokenizer_config: Mapping[str, Any],
        backend: HFTokenizer,
        *,
        generation_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        where: str = TOKENIZER_CONFIG_FILE,
    ) -> HFTokenizerConfig:
        """Read tokenizer_config.json (+ generation_config.json, config.json) as transformers
        would. chat_template: the text of chat_template.jinja, which wins over the config's."""
        special = {
            name: text
            for name in SPECIAL_TOKEN_NAMES
            if (text := _token_text(tokenizer_config.get(name))) is not None
        }
        for name, text in special.items():
            if backend.token_to_id(text) is None:
                raise DataError(
                    f"{where}: {name} {text!r} is not in tokenizer.json's vocabulary; fix the "
                    "tokenizer files (they must come from the same checkpoint)"
                )
        eos: list[int] = []
        if "eos_token" in special:
            eos.append(int(backend.token_to_id(special["eos_token"]) or 0))  # checked above
        source = generation_config if generation_config else model_config or {}
        for i in _id_list(source.get("eos_token_id")):
            if i not in eos:
                eos.append(i)
        template = chat_template or select_template(tokenizer_config.get("chat_template"), where)
        max_len = tokenizer_config.get("model_max_length")
        flags = {
            k: tokenizer_config[k] if isinstance(tokenizer_config.get(k), bool) else None
            for k in ("add_bos_token", "add_eos_token")
        }
        return cls(
            special_tokens=special,
            eos_token_ids=tuple(eos),
            chat_template=template,
            model_max_length=int(max_len) if isinstance(max_len, int) and max_len < 2**40 else None,
            generation_config=dict(generation_config or {}),
            **flags,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the package's tokenizer_config.json)."""
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HFTokenizerConfig:
        """Inverse of `to_dict`; DataError naming a bad key."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise DataError(
                f"tokenizer config: unknown key {sorted(unknown)[0]!r}; known: {sorted(known)}"
            )
        try:
            return cls(
                special_tokens={
                    str(k): str(v) for k, v in dict(data.get("special_tokens", {})).items()
                },
                add_bos_token=data.get("add_bos_token"),
                add_eos_token=data.get("add_eos_token"),
                eos_token_ids=tuple(int(i) for i in data.get("eos_token_ids", ())),
                chat_template=data.get("chat_template"),
                model_max_length=data.get("model_max_length"),
                generation_config=dict(data.get("generation_config") or {}),
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"tokenizer config: bad value ({exc})") from None


class Tokenizer:
    """Text ⇄ token ids. Build with `Tokenizer.byte()`, `Tokenizer.train_bpe()` or `.load(path)`."""

    def __init__(
        self, backend: HFTokenizer, hf: HFTokenizerConfig | None = None, source: str | None = None
    ) -> None:
        self._backend = backend
        # Not serialised by `tokenizers`: set on every construction so user text stays plain text.
        self._backend.encode_special_tokens = True
        self.hf = hf
        self.chat_template: ChatTemplate | None = None
        self.kind: Literal["byte", "bpe", "hf"] = "hf"
        self._eos_ids: tuple[int, ...] = (1,)
        self._pad: int | None = None
        if hf is not None:
            self._init_hf(hf, source if source is not None else backend.to_str())
            return
        for i, token in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(token) != i:
                raise DataError(
                    f"tokenizer must map {token!r} to id {i}; this tokenizer.json was not made by "
                    "shipyard (rebuild it with Tokenizer.byte() or Tokenizer.train_bpe())"
                )
        self.kind = "byte" if _is_byte_vocab(backend) else "bpe"

    def _init_hf(self, hf: HFTokenizerConfig, source: str) -> None:
        self._source = source  # tokenizer.json exactly as the checkpoint had it
        if hf.add_bos_token is not None or hf.add_eos_token is not None:
            # as transformers: explicit add_bos/add_eos_token replace the post-processor
            bos = hf.special_tokens.get("bos_token") if hf.add_bos_token else None
            eos = hf.special_tokens.get("eos_token") if hf.add_eos_token else None
            head, tail = (f"{bos}:0 " if bos else ""), (f" {eos}:0" if eos else "")
            pair_head, pair_tail = (f" {bos}:1" if bos else ""), (f" {eos}:1" if eos else "")
            single = f"{head}$A:0{tail}"
            self._backend.post_processor = processors.TemplateProcessing(
                single=single,
                pair=f"{single}{pair_head} $B:1{pair_tail}",
                special_tokens=[
                    (t, int(self._backend.token_to_id(t) or 0)) for t in (bos, eos) if t is not None
                ],
            )
        # chat prompts: special tokens the template writes must become their ids
        self._template_backend = HFTokenizer.from_str(self._backend.to_str())
        self._template_backend.encode_special_tokens = False
        self._eos_ids = tuple(hf.eos_token_ids)
        self._pad = self._special_id("pad_token")
        if hf.chat_template is not None:
            self.chat_template = ChatTemplate(hf.chat_template, hf.special_tokens)

    def _special_id(self, name: str) -> int | None:
        token = self.hf.special_tokens.get(name) if self.hf is not None else None
        found = self._backend.token_to_id(token) if token is not None else None
        return int(found) if found is not None else None

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
    def from_json(cls, text: str, hf: HFTokenizerConfig | None = None) -> Tokenizer:
        """Rebuild a tokenizer from the text of a tokenizer.json (with `hf`: a Hugging Face
        checkpoint's tokenizer, taken as it is)."""
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception
            raise DataError(f"cannot read tokenizer JSON: {e}") from e
        return cls(backend, hf, source=text)

    @classmethod
    def from_hf_dir(
        cls,
        path: str | Path,
        *,
        generation_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """A Hugging Face checkpoint's tokenizer: tokenizer.json, tokenizer_config.json and the
        chat template (chat_template.jinja wins over tokenizer_config.json's)."""
        root = Path(path)
        file = root / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(
                f"{root}: no {TOKENIZER_FILE}; save the tokenizer with transformers' "
                "tokenizer.save_pretrained() (a fast tokenizer writes tokenizer.json)"
            )
        config: dict[str, Any] = {}
        config_file = root / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(f"{config_file}: cannot read ({exc})") from None
        template_file = root / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        text = file.read_text(encoding="utf-8")
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception
            raise DataError(f"{file}: cannot read tokenizer JSON: {e}") from e
        hf = HFTokenizerConfig.from_hf(
            config,
            backend,
            generation_config=generation_config,
            model_config=model_config,
            chat_template=template,
            where=str(config_file),
        )
        return cls(backend, hf, source=text)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `path` (a tokenizer.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist; save one with .save()")
        settings = path.with_name(TOKENIZER_CONFIG_FILE)
        hf = None
        if settings.is_file():  # written by `save` for an HF checkpoint's tokenizer
            try:
                hf = HFTokenizerConfig.from_dict(json.loads(settings.read_text(encoding="utf-8")))
            except (ValueError, TypeError, KeyError) as exc:
                raise DataError(
                    f"{settings}: not a tokenizer config shipyard wrote ({exc})"
                ) from None
        return cls.from_json(path.read_text(encoding="utf-8"), hf)

    # -- use ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials included)."""
        return int(self._backend.get_vocab_size())

    @property
    def pad_id(self) -> int:
        """Id used to pad sequences (0; an HF tokenizer's pad token, else its EOS)."""
        if self.hf is None:
            return 0
        return self._pad if self._pad is not None else self.eos_id

    @property
    def eos_id(self) -> int:
        """End-of-document id (1; an HF tokenizer's first EOS id)."""
        if not self._eos_ids:
            raise DataError(
                "this tokenizer has no end-of-sequence token (no eos_token in "
                "tokenizer_config.json and no eos_token_id in generation_config.json)"
            )
        return self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (an HF checkpoint may list several)."""
        return self._eos_ids

    @property
    def bos_id(self) -> int | None:
        """An HF tokenizer's beginning-of-sequence id (None for shipyard's own)."""
        return self._special_id("bos_token")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return [int(i) for i in self.encode_array(text)]

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw-text prompt as the model expects it: with the BOS an HF checkpoint's
        tokenizer adds (tokenizer.json's post-processor, or add_bos_token); special-token text in
        `text` stays plain text. Same as `encode` for shipyard's own tokenizers."""
        if self.hf is None:
            return self.encode(text)
        return [int(i) for i in self._backend.encode(text, add_special_tokens=True).ids]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids for chat `messages` through the model's own template, equal to
        transformers' `tokenizer.apply_chat_template(messages, add_generation_prompt=...)`
        (the rendered text is tokenized without adding specials; the specials it writes, e.g.
        <|im_start|>, become their ids). DataError when the tokenizer has no template."""
        if self.chat_template is None:
            raise DataError(
                "this tokenizer has no chat template; format the prompt yourself (or use "
                "shipyard's fallback chat format)"
            )
        text = self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return [int(i) for i in self._template_backend.encode(text, add_special_tokens=False).ids]

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
        if self.hf is not None and arr.size and arr.max() >= self.vocab_size:
            # checkpoints pad their embedding past the tokenizer (Qwen: 151936 rows for 151665
            # tokens); those ids have no text, as in transformers
            arr = arr[arr < self.vocab_size]
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

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt ids for chat `messages` ({role, content}): the model's own template when it
        has one, else shipyard's fallback format (see `chat_stops`)."""
        if self.chat_template is not None:
            return self.apply_chat_template(messages, add_generation_prompt=True) or [self.eos_id]
        return self.encode_prompt(fallback_prompt(messages)) or [self.eos_id]

    @property
    def chat_stops(self) -> tuple[str, ...]:
        """Stop strings chat generation needs: none with the model's own template (its
        end-of-turn token is an EOS id), the fallback format's block headers otherwise."""
        return () if self.chat_template is not None else FALLBACK_STOPS

    # -- persistence ----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The tokenizer.json text (the `tokenizers` library's own format; an HF checkpoint's
        exactly as it was read)."""
        if self.hf is not None:
            return self._source
        return str(self._backend.to_str())

    def config_json(self) -> str | None:
        """The package's tokenizer_config.json text for an HF tokenizer (None otherwise)."""
        if self.hf is None:
            return None
        return json.dumps(self.hf.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file, or a directory to put tokenizer.json in); an
        HF checkpoint's tokenizer also writes its settings to tokenizer_config.json beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        settings = self.config_json()
        if settings is not None:
            path.with_name(TOKENIZER_CONFIG_FILE).write_text(settings, encoding="utf-8")
        return path

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Tokenizer)
            and self.to_json() == other.to_json()
            and self.hf == other.hf
        )

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
