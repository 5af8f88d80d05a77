"""Text generation: sampling, single-sequence decoding and a continuous-batching engine.

from shipyard.generate import SamplingParams, generate, Engine

result = generate(model, tokenizer, "Once upon", SamplingParams(max_tokens=32, seed=0))

engine = Engine(model, tokenizer, max_batch_size=16)      # for a server
async with await engine.submit(prompt_ids, params) as events:
    async for event in events:                            # TokenEvent per token
        ...
"""

from __future__ import annotations

from shipyard.errors import EngineOverloaded, GenerationError
from shipyard.generate.cache import BatchKVCache
from shipyard.generate.engine import (
    AsyncRequestStream,
    Engine,
    EngineObserver,
    EngineStats,
    LogitsHook,
    RequestStream,
)
from shipyard.generate.params import SamplingParams
from shipyard.generate.sampling import (
    SamplingBatch,
    TokenHistory,
    choose_tokens,
    process_logits,
    sample,
    sample_from_uniform,
    token_logprobs,
)
from shipyard.generate.sequence import (
    FinishReason,
    GenerationResult,
    IncrementalDetokenizer,
    TokenEvent,
    TokenLogprob,
)
from shipyard.generate.single import encode_prompt, generate, stream

__all__ = [
    "AsyncRequestStream",
    "BatchKVCache",
    "Engine",
    "EngineObserver",
    "EngineOverloaded",
    "EngineStats",
    "FinishReason",
    "GenerationError",
    "GenerationResult",
    "IncrementalDetokenizer",
    "LogitsHook",
    "RequestStream",
    "SamplingBatch",
    "SamplingParams",
    "TokenEvent",
    "TokenHistory",
    "TokenLogprob",
    "choose_tokens",
    "encode_prompt",
    "generate",
    "process_logits",
    "sample",
    "sample_from_uniform",
    "stream",
    "token_logprobs",
]
