"""Logits processing and sampling: pure tensor functions, batched over rows with per-row params.

Order (as Hugging Face and vLLM): repetition penalty, presence/frequency penalties,
temperature, top-k, top-p, then sample. Rows with temperature 0 take the argmax of the
penalised logits. A row draws its random number from its own `torch.Generator` and picks the
token by inverse-CDF, so its choice never depends on the other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from shipyard.errors import GenerationError
from shipyard.generate.params import SamplingParams
from shipyard.generate.sequence import TokenLogprob


@dataclass
class TokenHistory:
    """What the penalties need to know about each row's tokens, as (B, V) tensors.

    seen: True for every token in the row's prompt or output (repetition penalty).
    counts: occurrences of each token in the row's output (presence/frequency penalties).
    """

    seen: torch.Tensor  # (B, V) bool
    counts: torch.Tensor  # (B, V) float32

    @classmethod
    def from_ids(
        cls,
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str | None = None,
    ) -> TokenHistory:
        """History of B rows from their prompt ids and generated ids."""
        if len(prompts) != len(outputs):
            raise GenerationError(f"got {len(prompts)} prompts but {len(outputs)} outputs")
        B = len(prompts)
        seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
        for b, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            ids = torch.as_tensor([*prompt, *output], dtype=torch.long, device=device)
            seen[b, ids] = True
            out = torch.as_tensor(list(output), dtype=torch.long, device=device)
            counts[b].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        return cls(seen, counts)

    def append(self, tokens: torch.Tensor) -> None:
        """Record one newly generated token per row; `tokens` is (B,)."""
        rows = torch.arange(tokens.numel(), device=tokens.device)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1.0


def _param_column(name: str) -> cached_property[torch.Tensor]:
    """A `SamplingBatch` property: the rows' `name` parameter as a (B, 1) float32 column, built
    on first use."""

    def column(self: SamplingBatch) -> torch.Tensor:
        return self._column([getattr(p, name) for p in self.params])

    return cached_property(column)


@dataclass
class SamplingBatch:
    """The sampling parameters of B rows: flags saying which steps any row needs, and per-row
    (B, 1) tensors, each built on first use (an all-greedy batch without penalties, the
    common case, never builds one). Made once per batch composition."""

    params: tuple[SamplingParams, ...]
    vocab_size: int
    device: torch.device | str | None
    all_greedy: bool
    any_temperature: bool  # some row divides by a temperature other than 1
    any_top_k: bool
    any_top_p: bool
    any_repetition: bool
    any_presence_frequency: bool

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device | str | None = None,
    ) -> SamplingBatch:
        """The batch of B rows with these parameters."""
        rows = tuple(params)
        return cls(
            params=rows,
            vocab_size=vocab_size,
            device=device,
            all_greedy=all(p.greedy for p in rows),
            any_temperature=any(p.temperature > 0 and p.temperature != 1.0 for p in rows),
            any_top_k=any(p.top_k is not None and p.top_k < vocab_size for p in rows),
            any_top_p=any(p.top_p < 1.0 for p in rows),
            any_repetition=any(p.repetition_penalty != 1.0 for p in rows),
            any_presence_frequency=any(
                p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in rows
            ),
        )

    def _column(self, values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device).view(-1, 1)

    @cached_property
    def temperature(self) -> torch.Tensor:
        """(B, 1); 1 for greedy rows (their argmax ignores it)."""
        return self._column([p.temperature if p.temperature > 0 else 1.0 for p in self.params])

    @cached_property
    def greedy(self) -> torch.Tensor:
        """(B,) bool."""
        return torch.tensor([p.greedy for p in self.params], dtype=torch.bool, device=self.device)

    @cached_property
    def top_k(self) -> torch.Tensor:
        """(B, 1) long; vocab_size when off."""
        V = self.vocab_size
        return self._column([min(p.top_k, V) if p.top_k else V for p in self.params], torch.long)

    # (B, 1) float32 columns of one parameter each, as the rows set it
    top_p = _param_column("top_p")
    repetition_penalty = _param_column("repetition_penalty")
    presence_penalty = _param_column("presence_penalty")
    frequency_penalty = _param_column("frequency_penalty")


def _as_batch(
    params: SamplingParams | Sequence[SamplingParams] | SamplingBatch,
    B: int,
    V: int,
    device: torch.device,
) -> SamplingBatch:
    if isinstance(params, SamplingBatch):
        return params
    rows = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(rows) != B:
        raise GenerationError(f"got {len(rows)} SamplingParams for {B} rows of logits")
    return SamplingBatch.from_params(rows, V, device)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams] | SamplingBatch,
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """Apply penalties, temperature, top-k and top-p to raw logits (V,) or (B, V).

    Returns float32 logits of the same shape; tokens ruled out by top-k/top-p are -inf.
    history: needed when a penalty is on (else GenerationError).
    """
    single = logits.dim() == 1
    x = (logits.unsqueeze(0) if single else logits).float()  # (B, V)
    B, V = x.shape
    batch = _as_batch(params, B, V, x.device)
    if batch.any_repetition or batch.any_presence_frequency:
        if history is None:
            raise GenerationError("penalties need the token history; pass history=TokenHistory")
        if batch.any_repetition:
            rp = batch.repetition_penalty  # (B, 1)
            penalised = torch.where(x > 0, x / rp, x * rp)  # (B, V)
            x = torch.where(history.seen, penalised, x)
        if batch.any_presence_frequency:
            present = (history.counts > 0).float()  # (B, V)
            x = x - batch.presence_penalty * present - batch.frequency_penalty * history.counts
    if batch.any_temperature:
        x = x / batch.temperature
    if batch.any_top_k or batch.any_top_p:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)  # (B, V)
        remove = torch.zeros_like(sorted_x, dtype=torch.bool)
        if batch.any_top_k:
            rank = torch.arange(V, device=x.device).unsqueeze(0)  # (1, V)
            kth = sorted_x.gather(1, batch.top_k - 1)  # (B, 1): ties with the k-th stay in
            remove |= (rank >= batch.top_k) & (sorted_x < kth)
        if batch.any_top_p:
            probs = torch.softmax(sorted_x.masked_fill(remove, float("-inf")), dim=-1)  # (B, V)
            before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
            remove |= (before >= batch.top_p) & (batch.top_p < 1.0)
        x = x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return x.squeeze(0) if single else x


def sample_from_uniform(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row of (B, V) logits, the token whose CDF interval holds
    uniform[b] in [0, 1). Tokens with zero probability are never chosen."""
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = uniform.to(cdf.device, cdf.dtype).view(-1, 1) * cdf[:, -1:]  # (B, 1)
    idx = torch.searchsorted(cdf, target, right=True)  # (B, 1)
    return idx.clamp_(max=logits.size(-1) - 1).view(-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams] | SamplingBatch,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row of processed (B, V) logits; returns (B,) long.

    Greedy rows (temperature 0) take the argmax; the others draw one uniform number from their
    own generator (None = torch's global one) and sample by inverse CDF.
    """
    B, V = logits.shape
    batch = _as_batch(params, B, V, logits.device)
    argmax = logits.argmax(dim=-1)  # (B,)
    if batch.all_greedy:
        return argmax
    uniform = torch.empty(B, dtype=torch.float64)
    for b, g in enumerate(generators):
        uniform[b] = torch.rand((), generator=g, dtype=torch.float64)
    drawn = sample_from_uniform(logits, uniform)
    return torch.where(batch.greedy, argmax, drawn)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under raw (B, V) logits: of `tokens` (B,), and the top_n alternatives.

    Returns (chosen (B,), top values (B, top_n), top ids (B, top_n)).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens.view(-1, 1)).view(-1)  # (B,)
    if top_n == 0:
        return chosen, logp[:, :0], tokens.view(-1, 1)[:, :0]
    values, ids = logp.topk(top_n, dim=-1)  # (B, top_n) each
    return chosen, values, ids


def choose_tokens(
    logits: torch.Tensor,
    batch: SamplingBatch,
    history: TokenHistory | None,
    generators: Sequence[torch.Generator | None],
    top_logprobs: Sequence[int | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One decoding decision for B rows of raw (B, V) logits: process, sample, log-probs.

    top_logprobs[b]: None = no log-probabilities for row b, n = chosen plus n alternatives.
    """
    tokens = sample(process_logits(logits, batch, history), batch, generators)  # (B,)
    if history is not None:
        history.append(tokens)
    chosen_ids: list[int] = tokens.tolist()
    wanted = [n for n in top_logprobs if n is not None]
    if not wanted:
        return chosen_ids, [None] * len(chosen_ids)
    chosen, values, ids = (t.cpu() for t in token_logprobs(logits, tokens, max(wanted)))
    out: list[TokenLogprob | None] = []
    for b, n in enumerate(top_logprobs):
        if n is None:
            out.append(None)
            continue
        top = tuple(zip(ids[b, :n].tolist(), values[b, :n].tolist(), strict=True))
        out.append(TokenLogprob(chosen_ids[b], float(chosen[b]), top))
    return chosen_ids, out
