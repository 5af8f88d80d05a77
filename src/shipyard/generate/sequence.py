"""One request's decoding state: output tokens, incremental detokenization, stop strings.

Shared by `generate`/`stream` (one sequence) and the batching `Engine`, so both produce exactly
the same events for the same tokens.
"""

from __future__ import annotations

import codecs
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from shipyard.data.tokenization import SPECIAL_TOKENS, Tokenizer
from shipyard.generate.params import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]
""""stop": end-of-text token or a stop string; "length": max_tokens; "cancelled": by the caller."""


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a chosen token, and of the most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation. Timings are seconds from submission (queueing included)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None
    time_to_first_token_s: float | None
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (0 when fewer than two tokens)."""
        if self.time_to_first_token_s is None or self.completion_tokens < 2:
            return 0.0
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else float("inf")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a stream.

    text: the new text this token completes; "" while a multi-byte character or a possible stop
        string is incomplete. Concatenating every event's text gives the final text.
    finish_reason and result: set on the last event only.
    """

    request_id: str
    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None


class IncrementalDetokenizer:
    """Turns token ids into text deltas, holding back bytes of an incomplete UTF-8 character.

    Byte tokenizers feed an incremental UTF-8 decoder (O(1) per token). Others decode a short
    window of recent tokens each time (as Hugging Face TGI does), so the cost per token does not
    grow with the length of the output. Special tokens produce no text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")(errors="replace")
            if tokenizer.kind == "byte"
            else None
        )
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are fully emitted
        self._read = 0  # tokens before it have had their text emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" if a character is still incomplete)."""
        if self._utf8 is not None:
            byte = token_id - len(SPECIAL_TOKENS)  # byte kind: id = byte value + 2
            return self._utf8.decode(bytes((byte,))) if 0 <= byte < 256 else ""
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        new_text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character becomes U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        new_text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


def new_request_id() -> str:
    """A random request id (OpenAI style)."""
    return "cmpl-" + secrets.token_hex(12)


class SequenceState:
    """Everything one request accumulates while it decodes; `add_token` makes its events."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        *,
        submitted_at: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.eos_ids = frozenset(tokenizer.eos_ids)  # an HF checkpoint may end on several ids
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.top_logprobs is not None else None
        self.finish_reason: FinishReason | None = None
        self.submitted_at = time.perf_counter() if submitted_at is None else submitted_at
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self._detok = IncrementalDetokenizer(tokenizer)
        self._text = ""  # all complete text so far (cut at the stop string once finished)
        self._emitted = 0  # characters of _text already sent in events
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def reserved_tokens(self) -> int:
        """Most cache slots this sequence can reach (prompt + max_tokens)."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None

    def _find_stop(self, start: int) -> int | None:
        hits = [i for s in self.params.stop if (i := self._text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        best = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

    def add_token(self, token_id: int, logprob: TokenLogprob | None = None) -> TokenEvent:
        """Record a sampled token; return its event (the last one carries the result)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.output_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        finish: FinishReason | None = None
        stop_at: int | None = None
        if self.params.stop_on_eos and token_id in self.eos_ids:
            finish = "stop"
        else:
            old_len = len(self._text)
            self._text += self._detok.push(token_id)
            stop_at = self._find_stop(max(0, old_len - self._max_stop + 1))
            if stop_at is not None:
                finish = "stop"
        if finish is None and len(self.output_ids) >= self.params.max_tokens:
            finish = "length"
        if finish is not None and stop_at is None:
            old_len = len(self._text)
            self._text += self._detok.flush()
            stop_at = self._find_stop(max(0, old_len - self._max_stop + 1))
        if finish is not None:
            if stop_at is not None:
                finish, self._text = "stop", self._text[:stop_at]
            end = len(self._text)
        else:
            end = max(self._emitted, len(self._text) - self._held_back())
        delta, self._emitted = self._text[self._emitted : end], end
        result = None
        if finish is not None:
            self.finish_reason, self.finished_at = finish, now
            result = self.result()
        return TokenEvent(
            request_id=self.request_id,
            index=len(self.output_ids) - 1,
            token_id=token_id,
            text=delta,
            logprob=logprob,
            finish_reason=finish,
            result=result,
        )

    def cancel(self) -> GenerationResult:
        """Finish as "cancelled"; the text is what was already emitted."""
        if self.finish_reason is None:
            self.finish_reason, self.finished_at = "cancelled", time.perf_counter()
            self._text = self._text[: self._emitted]
        return self.result()

    def result(self) -> GenerationResult:
        """The result so far (final once `finished`)."""
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return GenerationResult(
            request_id=self.request_id,
            text=self._text[: self._emitted] if self.finish_reason is None else self._text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            logprobs=None if self.logprobs is None else list(self.logprobs),
            time_to_first_token_s=(
                None if self.first_token_at is None else self.first_token_at - self.submitted_at
            ),
            total_s=end - self.submitted_at,
        )
