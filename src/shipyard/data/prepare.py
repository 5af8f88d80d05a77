"""`prepare_data`: config → loaded, split, preprocessed datasets plus what describes them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from shipyard.config_base import TASKS, Task
from shipyard.data.anonymize import Anonymizer
from shipyard.data.config import DataConfig
from shipyard.data.corpus import TokenWindows, default_cache_dir, tokenize_to_file
from shipyard.data.datasets import ArrayDataset
from shipyard.data.folds import fold_ids
from shipyard.data.instructions import (
    InstructionStats,
    pack_examples,
    packing_summary,
    pad_examples,
    read_examples,
    tokenize_examples,
)
from shipyard.data.preprocessing import Preprocessor, encode_labels, fit_class_names
from shipyard.data.sources import Table, load_table, load_texts, resolve_paths
from shipyard.data.splits import SPLITS, split_documents, split_indices
from shipyard.data.tokenization import Tokenizer
from shipyard.errors import DataError


@dataclass
class DataInfo:
    """What a model and a package need to know about the data (JSON via `to_dict`).

    input_shape is per example: (n_features,), (C, H, W) for images ((1, 8, 8) for digits), or
    (block_size,) for token sequences. num_outputs: classes, regression target columns, or vocab.
    split_sizes counts rows per split, or tokens per split for language modeling.
    fingerprint: SHA-256 over the loaded source content, the data config, task, seed and block size.
    anonymize: the `data.anonymize` rules applied to the rows, hash rules with their salt's id
    (never the salt), so serving can apply them to requests.
    """

    task: str
    input_shape: tuple[int, ...]
    num_outputs: int
    class_names: list[str] | None
    feature_names: list[str] | None
    vocab_size: int | None
    split_sizes: dict[str, int]
    fingerprint: str
    anonymize: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (input_shape becomes a list)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        if self.anonymize is None:
            del d["anonymize"]  # data without anonymisation keeps the section it always had
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        """Inverse of `to_dict`."""
        return cls(**{**d, "input_shape": tuple(int(v) for v in d["input_shape"])})


@dataclass
class PreparedData:
    """Datasets of (x, y) tensor pairs per split, plus the fitted preprocessing that made them.

    `val`/`test` are None when not requested. `preprocessor` is set for tabular/image/text-column
    data (fitted on train only); `tokenizer` for text.
    """

    train: Dataset[Any]
    val: Dataset[Any] | None
    test: Dataset[Any] | None
    info: DataInfo
    preprocessor: Preprocessor | None = None
    tokenizer: Tokenizer | None = None
    instructions: InstructionStats | None = None  # chat / prompt-completion: fit of the examples
    splits: dict[str, Dataset[Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.splits = {
            name: ds
            for name, ds in (("train", self.train), ("val", self.val), ("test", self.test))
            if ds is not None
        }


def prepare_data(
    config: DataConfig,
    task: Task,
    seed: int,
    *,
    block_size: int | None = None,
    cache_dir: Path | None = None,
    tokenizer: Tokenizer | None = None,
) -> PreparedData:
    """Load, split (seeded), fit preprocessing on train, and build the datasets for `task`.

    block_size: tokens per example; required for language modeling and `data.text_column`.
    cache_dir: where language-model token files are cached (default `$SHIPYARD_HOME/cache/tokens`).
    tokenizer: use this (a pretrained model's) tokenizer instead of building `data.tokenizer`.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if block_size is not None and block_size < 1:
        raise DataError(f"block_size must be ≥ 1, got {block_size}")
    fingerprint = hashlib.sha256()
    fingerprint.update(
        json.dumps(
            {
                "data": config.model_dump(mode="json"),
                "task": task,
                "seed": seed,
                "block_size": block_size,
                "tokenizer": None if tokenizer is None else tokenizer.to_json(),
            },
            sort_keys=True,
        ).encode()
    )
    if task == "language-modeling" and config.folds is not None:
        raise DataError(
            "cross-validation (data.folds) works for classification and regression, not "
            "language-modeling"
        )
    if task == "language-modeling" and config.is_instructions:
        return _prepare_instructions(config, seed, block_size, fingerprint, tokenizer)
    if task == "language-modeling":
        return _prepare_corpus(config, seed, block_size, cache_dir, fingerprint, tokenizer)
    if config.is_text_corpus:
        raise DataError(
            f"{config.source or 'text files'} is a text corpus, usable only for task "
            f"language-modeling, not {task}; for text classification use a CSV/JSONL with "
            "data.text_column"
        )
    return _prepare_rows(config, task, seed, block_size, fingerprint, tokenizer)


def _prepare_instructions(
    config: DataConfig,
    seed: int,
    block_size: int | None,
    fingerprint: Any,
    tokenizer: Tokenizer | None,
) -> PreparedData:
    """Chat / prompt-completion JSONL: seeded split by example, rows scored on answers only."""
    if block_size is None:
        raise DataError(f"data.format {config.format} needs block_size (tokens per example)")
    fmt = config.format
    if config.files is not None:
        records = {
            name: read_examples(resolve_paths(spec), fmt)
            for name in SPLITS
            if (spec := getattr(config.files, name)) is not None
        }
    else:
        if config.source is None or config.source.startswith("builtin:"):
            raise DataError(f"data.format {fmt} reads JSONL files: set data.source to a path/glob")
        everything = read_examples(resolve_paths(config.source), fmt)
        idx = split_indices(len(everything), config.splits, seed, config.shuffle, what="examples")
        records = {name: [everything[i] for i in rows] for name, rows in idx.items()}
    for name, recs in records.items():
        fingerprint.update(f"{name}:{len(recs)}".encode())
        for rec in recs:
            fingerprint.update(hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).digest())
    if tokenizer is None:
        if config.tokenizer is None:
            raise DataError(
                f"data.format {fmt} needs a tokenizer: fine-tune a pretrained model "
                "(model: {name: pretrained, ...}) or set data.tokenizer"
            )
        texts = [json.dumps(r, ensure_ascii=False) for r in records.get("train", [])]
        tokenizer = Tokenizer.from_config(config.tokenizer, texts)
    datasets: dict[str, Dataset[Any]] = {}
    stats = InstructionStats()
    for name, recs in records.items():
        ex = tokenize_examples(
            recs, fmt, tokenizer, block_size, overlong=config.overlong, train_on=config.train_on
        )
        if ex.answer_tokens == 0:
            raise DataError(
                f"the {name} split has no answer tokens within {block_size} tokens per example "
                f"({ex.truncated} of its examples were cut); raise data.block_size or shorten "
                "the prompts"
            )
        # only train is packed: val/test keep one example per row, comparable with any run
        if config.packing and name == "train":
            packed = pack_examples(ex, block_size, tokenizer.pad_id)
            stats.packing[name] = packing_summary(ex, len(packed), block_size)
            datasets[name] = packed
        else:
            datasets[name] = pad_examples(ex, block_size, tokenizer.pad_id)
        stats.examples[name] = len(ex)
        stats.truncated[name] = ex.truncated
        stats.dropped[name] = ex.dropped
        stats.answer_tokens[name] = ex.answer_tokens
    if "train" not in datasets:
        raise DataError("instruction data needs a train split")
    prepared = _lm_data(config, datasets, tokenizer, block_size, fingerprint, stats.answer_tokens)
    prepared.instructions = stats
    return prepared


def _split_tables(config: DataConfig, task: str, seed: int) -> dict[str, Table]:
    if config.files is not None:
        specs = {name: getattr(config.files, name) for name in SPLITS}
        tables = {
            name: load_table(spec, config, task, seed)
            for name, spec in specs.items()
            if spec is not None
        }
    else:
        assert config.source is not None
        table = load_table(config.source, config, task, seed)
        indices = split_indices(len(table), config.splits, seed, config.shuffle)
        tables = {name: table.take(idx) for name, idx in indices.items()}
    if config.group_column is not None and tables["train"].groups is None:
        raise DataError(
            f"data.group_column {config.group_column!r} needs a CSV or JSONL source with that "
            "column; remove it for other sources"
        )
    if config.folds is not None:
        tables = _fold_tables(tables, config, task, seed)
    return tables


def _fold_tables(
    tables: dict[str, Table], config: DataConfig, task: str, seed: int
) -> dict[str, Table]:
    """Pool train+val and cut them by fold (see data.folds); the test table stays as it was.

    A fold run gets no test table at all, so cross-validation never looks at it; the final run
    (fold index null) trains on the whole pool and keeps the test table.
    """
    assert config.folds is not None
    pool = _concat([tables[n] for n in ("train", "val") if n in tables])
    labels = None
    if task == "classification" and config.folds.stratify and pool.labels is not None:
        labels = np.unique(np.asarray(pool.labels).astype(str), return_inverse=True)[1]
    folds = fold_ids(len(pool), config.folds.k, seed, labels=labels, groups=pool.groups)
    if config.folds.index is None:
        out = {"train": pool}
        if "test" in tables:
            out["test"] = tables["test"]
        return out
    held = folds == config.folds.index
    return {"train": pool.take(np.flatnonzero(~held)), "val": pool.take(np.flatnonzero(held))}


def _concat(tables: list[Table]) -> Table:
    if len(tables) == 1:
        return tables[0]
    first = tables[0]

    def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        return None if arrays[0] is None else np.concatenate(arrays)  # type: ignore[arg-type]

    return Table(
        x=cat([t.x for t in tables]),
        labels=cat([t.labels for t in tables]),
        feature_names=first.feature_names,
        class_names=first.class_names,
        texts=None if first.texts is None else [s for t in tables for s in t.texts or []],
        groups=cat([t.groups for t in tables]),
    )


def _prepare_rows(
    config: DataConfig,
    task: str,
    seed: int,
    block_size: int | None,
    fingerprint: Any,
    tokenizer: Tokenizer | None = None,
) -> PreparedData:
    tables = _split_tables(config, task, seed)
    for name, table in tables.items():
        fingerprint.update(name.encode())
        table.update_hash(fingerprint)
        if len(table) == 0:
            raise DataError(f"the {name} split has no rows; check the file for that split")
    train = tables["train"]

    ys: dict[str, np.ndarray] = {}
    class_names: list[str] | None = None
    for name, table in tables.items():
        if table.labels is None:
            raise DataError(f"the {name} split has no target; set data.target for {task}")
    if task == "classification":
        if train.class_names is not None:  # declared by the source (digits, image folders)
            class_names = train.class_names
            ys = {n: np.asarray(t.labels, dtype=np.int64) for n, t in tables.items()}
        else:
            class_names = fit_class_names(train.labels)  # type: ignore[arg-type]
            ys = {n: encode_labels(t.labels, class_names, n) for n, t in tables.items()}  # type: ignore[arg-type]
        if len(class_names) < 2:
            raise DataError(
                f"classification needs at least 2 classes, but the train split has "
                f"{len(class_names)} ({', '.join(class_names)}); check data.target"
            )
    else:
        for name, table in tables.items():
            labels = np.asarray(table.labels)
            if labels.dtype == object:
                raise DataError(f"regression targets in the {name} split are not numbers")
            ys[name] = labels.reshape(len(labels), -1).astype(np.float32)  # (N, k)

    target_scaling = config.target_scaling if task == "regression" else "none"
    if train.texts is not None:
        if tokenizer is None and config.tokenizer is None:
            raise DataError(
                "data.text_column needs data.tokenizer (e.g. `tokenizer: {kind: byte}`)"
            )
        if block_size is None:
            raise DataError("data.text_column needs block_size (tokens per example)")
        if tokenizer is None:
            assert config.tokenizer is not None
            tokenizer = Tokenizer.from_config(config.tokenizer, train.texts)
        preprocessor = Preprocessor("none", target_scaling, class_names, None)
        preprocessor.fit(np.zeros((len(train), 0), np.float32), ys["train"])
        xs = {n: _encode_padded(t.texts or [], tokenizer, block_size) for n, t in tables.items()}
        input_shape: tuple[int, ...] = (block_size,)
    else:
        assert train.x is not None
        input_shape = tuple(int(d) for d in train.x.shape[1:])
        for name, table in tables.items():
            shape = tuple(table.x.shape[1:]) if table.x is not None else ()
            if shape != input_shape:
                raise DataError(
                    f"the {name} split has examples of shape {shape} but train has {input_shape}; "
                    "give every split the same columns"
                )
        preprocessor = Preprocessor(
            config.preprocessing, target_scaling, class_names, train.feature_names
        ).fit(train.x, ys["train"])
        xs = {n: preprocessor.transform(t.x) for n, t in tables.items() if t.x is not None}
    if task == "regression":  # identity unless data.target_scaling is standardize
        ys = {n: preprocessor.transform_target(y) for n, y in ys.items()}

    datasets = {n: ArrayDataset(xs[n], ys[n]) for n in tables}
    num_outputs = len(class_names) if class_names is not None else int(ys["train"].shape[1])
    info = DataInfo(
        task=task,
        input_shape=input_shape,
        num_outputs=num_outputs,
        class_names=class_names,
        feature_names=train.feature_names if train.texts is None else None,
        vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
        split_sizes={n: len(ds) for n, ds in datasets.items()},
        fingerprint=fingerprint.hexdigest(),
        anonymize=_describe_anonymize(config),
    )
    return PreparedData(
        train=datasets["train"],
        val=datasets.get("val"),
        test=datasets.get("test"),
        info=info,
        preprocessor=preprocessor,
        tokenizer=tokenizer,
    )


def _describe_anonymize(config: DataConfig) -> list[dict[str, Any]] | None:
    return Anonymizer(config.anonymize, {}).describe() if config.anonymize else None


def _encode_padded(texts: list[str], tokenizer: Tokenizer, block_size: int) -> np.ndarray:
    """(N, block_size) int64 ids: truncated, or right-padded with `tokenizer.pad_id` (0)."""
    out = np.full((len(texts), block_size), tokenizer.pad_id, dtype=np.int64)
    for i, text in enumerate(texts):
        ids = tokenizer.encode_array(text)[:block_size]
        out[i, : len(ids)] = ids
    return out


def _prepare_corpus(
    config: DataConfig,
    seed: int,
    block_size: int | None,
    cache_dir: Path | None,
    fingerprint: Any,
    tokenizer: Tokenizer | None = None,
) -> PreparedData:
    if block_size is None:
        raise DataError("language-modeling needs block_size (tokens per training window)")
    if tokenizer is None and config.tokenizer is None:
        raise DataError(
            "language-modeling needs data.tokenizer (e.g. `tokenizer: {kind: byte}` or "
            "`{kind: bpe, vocab_size: 1024}`)"
        )
    if config.files is not None:
        docs = {
            name: load_texts(spec, config)
            for name in SPLITS
            if (spec := getattr(config.files, name)) is not None
        }
    else:
        assert config.source is not None
        all_docs = load_texts(config.source, config)
        if not all_docs:
            raise DataError(f"text source {config.source!r} holds no text")
        docs = split_documents(all_docs, config.splits, seed, config.shuffle)
    for name, split_docs in docs.items():
        fingerprint.update(f"{name}:{len(split_docs)}".encode())
        for doc in split_docs:
            fingerprint.update(hashlib.sha256(doc.encode("utf-8")).digest())

    if tokenizer is None:
        assert config.tokenizer is not None
        tokenizer = Tokenizer.from_config(config.tokenizer, docs["train"])
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    tokens = {name: tokenize_to_file(d, tokenizer, cache) for name, d in docs.items()}
    for name, toks in tokens.items():
        if len(toks) < block_size + 1:
            raise DataError(
                f"the {name} split has {len(toks)} tokens, but one window of block_size "
                f"{block_size} needs {block_size + 1}; use more text (data.max_chars / "
                "max_documents), a smaller block_size, or a larger split ratio"
            )
    train_stride = 1 if config.sampling == "random" else block_size
    datasets = {
        name: TokenWindows(toks, block_size, train_stride if name == "train" else block_size)
        for name, toks in tokens.items()
    }
    sizes = {name: len(toks) for name, toks in tokens.items()}
    return _lm_data(config, datasets, tokenizer, block_size, fingerprint, sizes)


def _lm_data(
    config: DataConfig,
    datasets: Mapping[str, Dataset[Any]],
    tokenizer: Tokenizer,
    block_size: int,
    fingerprint: Any,
    split_sizes: Mapping[str, int],
) -> PreparedData:
    """A language model's prepared data: rows of `block_size` token ids over the vocabulary."""
    info = DataInfo(
        task="language-modeling",
        input_shape=(block_size,),
        num_outputs=tokenizer.vocab_size,
        class_names=None,
        feature_names=None,
        vocab_size=tokenizer.vocab_size,
        split_sizes=dict(split_sizes),
        fingerprint=fingerprint.hexdigest(),
        anonymize=_describe_anonymize(config),
    )
    return PreparedData(
        train=datasets["train"],
        val=datasets.get("val"),
        test=datasets.get("test"),
        info=info,
        preprocessor=None,
        tokenizer=tokenizer,
    )
