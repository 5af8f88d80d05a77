"""Instruction data for supervised fine-tuning: chat or prompt/completion JSONL → token rows whose
loss is on the answer only.

    data.format: chat               {"messages": [{"role": "user", "content": ...}, ...]}
    data.format: prompt-completion  {"prompt": ..., "completion": ...}

Chat examples are rendered with the model's own chat template (the tokenizer's); an assistant
turn's tokens are those the template adds between `messages[:i]` with the generation prompt
and `messages[:i+1]`, so exactly the tokens the model must produce are scored (its end-of-turn
token included). A tokenizer without a template uses shipyard's fallback chat format.
Prompt/completion: prompt ids (with the BOS the tokenizer adds) then completion ids + EOS.

Each example becomes one row of `block_size` tokens: x = ids[:-1], y = ids[1:] with -100
(`IGNORE_INDEX`) wherever the target is not an answer token, and padding after the end.
Longer examples are truncated (`data.overlong: truncate`), dropped (`drop`) or refused
(`error`); the counts travel in `InstructionStats`.

With `data.packing: true` the train split's examples are packed whole into rows instead
(`pack_examples`), with segment ids that keep attention and positions inside each example.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.data.chat import FALLBACK_TEMPLATE, fallback_prompt
from shipyard.data.datasets import ArrayDataset, PackedDataset
from shipyard.data.sources import iter_jsonl
from shipyard.data.tokenization import Tokenizer
from shipyard.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class InstructionStats:
    """How the examples fit the window: counts per split."""

    examples: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    answer_tokens: dict[str, int] = field(default_factory=dict)
    packing: dict[str, dict[str, Any]] = field(default_factory=dict)  # data.packing: per split


def read_examples(paths: Sequence[Path], fmt: str) -> list[dict[str, Any]]:
    """Records of JSONL files, checked for the format's fields (errors name file and line)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        for n, rec in iter_jsonl(path):
            records.append(_check_record(rec, fmt, f"{path}:{n}"))
    if not records:
        raise DataError(f"no {fmt} examples in {', '.join(str(p) for p in paths)}")
    return records


def _check_record(rec: Any, fmt: str, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object per line")
    if fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise DataError(
                    f'{where}: prompt-completion lines need string "prompt" and "completion" '
                    f"fields; {key!r} is {type(rec.get(key)).__name__}"
                )
        return rec
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: chat lines need a non-empty "messages" list')
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: each message needs string "role" and "content"')
        if m.get("role") not in ROLES:
            raise DataError(
                f"{where}: message role {m.get('role')!r} is not one of {', '.join(ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this example")
    return rec


def _render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], prompt: bool) -> list[int]:
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)
    if prompt:
        return tokenizer.encode_prompt(fallback_prompt(messages))
    text = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return tokenizer.encode_prompt(text)


def chat_tokens(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[bool]]:
    """(ids, is_answer) of a whole conversation; is_answer marks assistant-turn tokens."""
    ids = _render(tokenizer, messages, prompt=False)
    answer = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        through = _render(tokenizer, messages[: i + 1], prompt=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError(
                "the chat template does not render conversations as prefixes of each other, so "
                "the assistant tokens cannot be located; use data.format: prompt-completion"
            )
        for t in range(len(before), len(through)):
            answer[t] = True
    if tokenizer.chat_template is None:  # the fallback format has no end-of-turn token: add EOS
        ids.append(tokenizer.eos_id)
        answer.append(True)
    return ids, answer


def completion_tokens(
    tokenizer: Tokenizer, prompt: str, completion: str
) -> tuple[list[int], list[bool]]:
    """(ids, is_answer) of a prompt/completion pair; the completion ends with EOS."""
    head = tokenizer.encode_prompt(prompt)
    tail = [*tokenizer.encode(completion), tokenizer.eos_id]
    return head + tail, [False] * len(head) + [True] * len(tail)


@dataclass
class TokenizedExamples:
    """Every kept example as its own (x, y) pair of equal length (ids[:-1], scored ids[1:])."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    truncated: int = 0
    dropped: int = 0
    answer_tokens: int = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def tokens(self) -> int:
        """Input tokens over all examples: the part of the windows that is not padding."""
        return sum(len(x) for x in self.inputs)


def tokenize_examples(
    records: Sequence[Mapping[str, Any]],
    fmt: str,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    overlong: str = "truncate",
    train_on: str = "answers",
) -> TokenizedExamples:
    """Render and tokenize `records`; an example longer than the window follows `overlong`."""
    out = TokenizedExamples([], [])
    for n, rec in enumerate(records):
        if fmt == "chat":
            ids, answer = chat_tokens(tokenizer, rec["messages"])
        else:
            ids, answer = completion_tokens(tokenizer, rec["prompt"], rec["completion"])
        if train_on == "all":
            answer = [True] * len(ids)
        if len(ids) > block_size + 1:
            if overlong == "error":
                raise DataError(
                    f"example {n} has {len(ids)} tokens, more than block_size + 1 = "
                    f"{block_size + 1}; shorten it, raise the block size, or set "
                    "data.overlong: truncate | drop"
                )
            if overlong == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
            ids, answer = ids[: block_size + 1], answer[: block_size + 1]
        targets = np.asarray(ids[1:], dtype=np.int64)
        scored = np.asarray(answer[1:], dtype=bool)
        out.inputs.append(np.asarray(ids[:-1], dtype=np.int64))
        out.targets.append(np.where(scored, targets, IGNORE_INDEX))
        out.answer_tokens += int(scored.sum())
    if not out.inputs:
        raise DataError("no example fits the window (all dropped as overlong)")
    return out


def pad_examples(examples: TokenizedExamples, block_size: int, pad_id: int) -> ArrayDataset:
    """One example per row of `block_size` ids, padded after its end (targets IGNORE_INDEX)."""
    x = np.full((len(examples), block_size), pad_id, dtype=np.int64)
    y = np.full((len(examples), block_size), IGNORE_INDEX, dtype=np.int64)
    for i, (xi, yi) in enumerate(zip(examples.inputs, examples.targets, strict=True)):
        x[i, : len(xi)] = xi
        y[i, : len(yi)] = yi
    return ArrayDataset(x, y)


def pack_examples(examples: TokenizedExamples, block_size: int, pad_id: int) -> PackedDataset:
    """Whole examples packed into rows of `block_size` ids, best-fit decreasing.

    Examples go longest first (ties in their given, seeded order) into the fullest row that still
    has room, else a new row; within a row they keep that order. No example is split, so none
    loses context. Segment ids count 1, 2, ... along a row; the padding after the last example
    gets the next id (its targets are IGNORE_INDEX like everywhere else it is padding).
    """
    sizes = [len(x) for x in examples.inputs]
    order = sorted((i for i, n in enumerate(sizes) if n > 0), key=lambda i: -sizes[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), ascending: best fit = first with room
    for i in order:
        at = bisect.bisect_left(free, (sizes[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = block_size - sizes[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= sizes[i]
        if room > 0:
            bisect.insort(free, (room, row))
    x = np.full((len(rows), block_size), pad_id, dtype=np.int64)
    y = np.full((len(rows), block_size), IGNORE_INDEX, dtype=np.int64)
    segments = np.zeros((len(rows), block_size), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            n = sizes[i]
            x[r, at : at + n] = examples.inputs[i]
            y[r, at : at + n] = examples.targets[i]
            segments[r, at : at + n] = seg
            at += n
        segments[r, at:] = len(members) + 1
    return PackedDataset(x, y, segments)


def packing_summary(examples: TokenizedExamples, windows: int, block_size: int) -> dict[str, Any]:
    """How many examples went into how many windows, and the padding share of the windows
    one example per row (`padding_unpacked`) and packed (`padding_packed`)."""
    tokens = examples.tokens()
    return {
        "examples": len(examples),
        "windows": windows,
        "padding_unpacked": round(1 - tokens / (len(examples) * block_size), 4),
        "padding_packed": round(1 - tokens / (windows * block_size), 4),
    }


def instruction_rows(
    records: Sequence[Mapping[str, Any]],
    fmt: str,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    overlong: str = "truncate",
    train_on: str = "answers",
) -> tuple[ArrayDataset, int, int, int]:
    """(dataset, truncated, dropped, answer tokens) for `records`: one example per row of
    `block_size` ids."""
    ex = tokenize_examples(
        records, fmt, tokenizer, block_size, overlong=overlong, train_on=train_on
    )
    return (
        pad_examples(ex, block_size, tokenizer.pad_id),
        ex.truncated,
        ex.dropped,
        ex.answer_tokens,
    )
