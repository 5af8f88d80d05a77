"""Sampling parameters of one generation request (OpenAI-style names and semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from shipyard.errors import GenerationError

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Invalid values raise `GenerationError`.

    max_tokens: most tokens to generate (>= 1); reaching it finishes with reason "length".
    temperature: 0 picks the most likely token (greedy); higher flattens the distribution.
    top_k: keep only the k most likely tokens (None = all).
    top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    repetition_penalty: CTRL/Hugging Face style, over prompt and output tokens: a seen token's
        logit is divided by it when positive and multiplied by it when negative (1 = off).
    presence_penalty, frequency_penalty: OpenAI style, over generated tokens only:
        logit -= presence_penalty * [count > 0] + frequency_penalty * count  (in [-2, 2]).
    stop: strings that end generation (reason "stop"); the stop string is not returned.
    seed: seeds this request's own random generator, so the same seed and prompt give the same
        text whatever else is batched alongside. None = a fresh random seed.
    logprobs: None/False = off; True or 0 = log-probability of each chosen token; n > 0 = also
        the n most likely alternatives (at most 20). Log-probabilities are those of the model
        (log-softmax of the raw logits, before penalties and temperature).
    stop_on_eos: finish when the model emits the tokenizer's end-of-text id.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = field(default=())
    seed: int | None = None
    logprobs: bool | int | None = None
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if _integer("max_tokens", self.max_tokens) < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if _number("temperature", self.temperature) < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and _integer("top_k", self.top_k) < 1:
            raise GenerationError(f"top_k must be >= 1 or None (no limit), got {self.top_k}")
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise GenerationError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= _number(name, value) <= 2:
                raise GenerationError(f"{name} must be in [-2, 2], got {value}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}")
        if len(stop) > MAX_STOP_SEQUENCES or any(s == "" for s in stop):
            raise GenerationError(
                f"stop must hold at most {MAX_STOP_SEQUENCES} non-empty strings, got {stop!r}"
            )
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None:
            _integer("seed", self.seed)
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            n = _integer("logprobs", self.logprobs)
            if not 0 <= n <= MAX_TOP_LOGPROBS:
                raise GenerationError(
                    f"logprobs must be a bool or an integer in [0, {MAX_TOP_LOGPROBS}], got {n}"
                )
        if not isinstance(self.stop_on_eos, bool):
            raise GenerationError(f"stop_on_eos must be true or false, got {self.stop_on_eos!r}")

    @property
    def greedy(self) -> bool:
        """True when every token is the argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def top_logprobs(self) -> int | None:
        """None = no log-probabilities; n >= 0 = chosen token's plus n alternatives."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return 0
        return int(self.logprobs)

    @property
    def uses_penalties(self) -> bool:
        """True when any penalty needs the token history."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
