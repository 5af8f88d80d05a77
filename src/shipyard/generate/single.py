"""Generate text for one prompt: prefill the prompt into a KV cache, then decode token by token.

`Engine` does the same for many requests at once; use these for a notebook, a script or the CLI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import GenerationError
from shipyard.generate.cache import BatchKVCache, forward_cached, new_cache
from shipyard.generate.packed import kv_cache_dtype, prepare_decoding
from shipyard.generate.params import SamplingParams
from shipyard.generate.sampling import SamplingBatch, TokenHistory, choose_tokens
from shipyard.generate.sequence import (
    GenerationResult,
    SequenceState,
    TokenEvent,
    new_request_id,
)
from shipyard.generate.traced import (
    TracedStep,
    trace_pays,
    traced_prefill,
    traced_step,
    traced_step_unsupported,
)
from shipyard.models.protocol import (
    DecodingModel,
    LanguageModel,
    context_limit,
    is_language_model,
    language_module,
)


def encode_prompt(
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams,
    block_size: int | None,
    vocab_size: int,
) -> list[int]:
    """Token ids of `prompt`, checked against the vocabulary and the model's context
    (block_size None: no limit, e.g. a recurrent model).

    A text prompt gets the BOS token an imported checkpoint's tokenizer adds. An empty prompt
    becomes [eos_id]: end-of-text separates documents in training corpora, so it is the context
    of "the start of a new document".
    """
    if isinstance(prompt, str):
        ids = tokenizer.encode_prompt(prompt)
    else:
        ids = list(prompt)
        bad = [
            i
            for i in ids
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size
        ]
        if bad:
            raise GenerationError(
                f"prompt token ids must be integers in [0, {vocab_size}), got {bad[0]!r}"
            )
    if not ids:
        ids = [tokenizer.eos_id]
    if block_size is not None and len(ids) + params.max_tokens > block_size:
        raise GenerationError(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context of {block_size} tokens; shorten the prompt or lower max_tokens"
        )
    return ids


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """torch.autocast to `dtype` on `device`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def stream(
    model: DecodingModel,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    request_id: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    weights: str = "auto",
    kv_cache: str = "auto",
) -> Iterator[TokenEvent]:
    """Yield one `TokenEvent` per generated token; the last has finish_reason and the result.

    Puts the model in eval mode and picks its decode kernels (`prepare_decoding`, `weights`)
    and what its KV cache stores (`kv_cache_dtype`, `kv_cache`: auto, fp32 or fp16).
    A GPT or Llama on CPU decodes through a traced step (`shipyard.generate.traced`; traced once
    per model and cache size, when the tokens asked of the model pay for it), else eagerly.
    Raises GenerationError for a prompt that does not fit.
    """
    params = params or SamplingParams()
    module = language_module(model)
    V, device = model.vocab_size, model_device(module)
    ids = encode_prompt(tokenizer, prompt, params, context_limit(model), V)
    state = SequenceState(request_id or new_request_id(), ids, params, tokenizer)
    prepare_decoding(module, weights)
    kv_dtype = kv_cache_dtype(module, kv_cache)
    if is_language_model(model) and not traced_step_unsupported(model, autocast_dtype):
        step = traced_step(model, kv_dtype) if trace_pays(model, params.max_tokens) else None
        if step is not None:
            prefill = traced_prefill(model, kv_dtype)
            return _decode_traced(model, state, device, step, prefill)
    return _decode(model, state, device, autocast_dtype, kv_dtype)


def _sampling(
    state: SequenceState, V: int, device: torch.device
) -> tuple[SamplingBatch, TokenHistory | None]:
    """One sequence's sampling settings, and its token history where penalties need one."""
    params = state.params
    batch = SamplingBatch.from_params([params], V, device)
    if not params.uses_penalties:
        return batch, None
    return batch, TokenHistory.from_ids([state.prompt_ids], [[]], V, device)


def _decode(
    model: DecodingModel,
    state: SequenceState,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    kv_dtype: torch.dtype | None,
) -> Iterator[TokenEvent]:
    params, V = state.params, model.vocab_size
    with torch.inference_mode():
        batch, history = _sampling(state, V, device)
        cache = new_cache(model, kv_dtype)
        x = torch.tensor([state.prompt_ids], dtype=torch.long, device=device)  # (1, P)
    while True:
        # inference_mode only around the work: a generator must not leak it into its caller.
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            logits = forward_cached(model, x, cache, last_only=True)[:, -1].float()  # (1, V)
            tokens, logprobs = choose_tokens(
                logits, batch, history, [state.generator], [params.top_logprobs]
            )
        event = state.add_token(tokens[0], logprobs[0])
        yield event
        if event.finish_reason is not None:
            return
        x = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, 1)


def _decode_traced(
    model: LanguageModel,
    state: SequenceState,
    device: torch.device,
    step: TracedStep,
    prefill: TracedStep | None,
) -> Iterator[TokenEvent]:
    """`_decode` with the prompt prefilled through `prefill` (eagerly without one, or for a
    one-token prompt) and every later token through `step`."""
    params, V = state.params, model.vocab_size
    with torch.inference_mode():
        batch, history = _sampling(state, V, device)
        cache = BatchKVCache(model.n_layer, step.kv_dtype)
        x = torch.tensor([state.prompt_ids], dtype=torch.long, device=device)  # (1, P)
        start = torch.zeros(1, dtype=torch.long, device=device)  # no left padding
        if prefill is not None and x.size(1) > 1:
            logits = prefill(x, cache, start).float()  # (1, V)
        else:
            logits = model(x, kv_cache=cache, last_only=True)[:, -1].float()  # (1, V)
    while True:
        with torch.inference_mode():
            tokens, logprobs = choose_tokens(
                logits, batch, history, [state.generator], [params.top_logprobs]
            )
        event = state.add_token(tokens[0], logprobs[0])
        yield event
        if event.finish_reason is not None:
            return
        with torch.inference_mode():
            x = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, 1)
            logits = step(x, cache, start).float()  # (1, V)


def generate(
    model: DecodingModel,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    request_id: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    weights: str = "auto",
    kv_cache: str = "auto",
) -> GenerationResult:
    """Generate a completion of `prompt` (text or token ids) and return it with usage and timings.

    Puts the model in eval mode and picks its decode kernels (`prepare_decoding`, `weights`) and
    its KV cache's dtype (`kv_cache`, see `stream`). Raises GenerationError for bad parameters
    or a prompt that does not fit the model's context.
    """
    for event in stream(
        model,
        tokenizer,
        prompt,
        params,
        request_id=request_id,
        autocast_dtype=autocast_dtype,
        weights=weights,
        kv_cache=kv_cache,
    ):
        if event.result is not None:
            return event.result
    raise AssertionError("stream ended without a final event")  # pragma: no cover
