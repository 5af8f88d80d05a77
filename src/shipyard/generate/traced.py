"""A captured decode step: the model's own forward for one new token per sequence, traced
once, over the batch's KV cache written in place. The CPU fast path of single-stream
generation and of the batching engine's decode step.

At a few hundred tokens per second a decode token has ~1-3 ms, and the eager step spends much
of it in Python: ~15 module calls and ~30 tensor ops per layer, each with its dispatcher
overhead. `torch.jit.trace` records the ops of one step once; `torch.jit.freeze` turns the
weights into constants. The step then runs in TorchScript's interpreter with no per-op Python
(`benchmarks/generate_throughput.py` measures eager against traced, fp32 and int8 weights).

The step takes a `BatchKVCache`'s whole `storage`, (n_layer, B, n_kv, capacity, hs) tensors
(seen as a `StaticKVCache`), writes every row's new key/value at the batch's next slot
(`index_copy_`; rows are left-padded to end together) and attends every slot through a mask of
each row's start..position. The trace records the sizes it reads rather than fixing them, so one
trace serves any batch size and capacity; it is kept per model and rebuilt when the model's
weights or kernels change. The traced step computes what the eager step computes (the same
kernels: shipyard's native ones where they loaded, else int8 GEMM and `F.linear`, oneDNN's
opaque weights being untraceable), up to float32 rounding (where SDPA runs it also sums the
masked spare slots: an eighth, at least 16, more than the cached ones, see `BatchKVCache`).
The engine traces once, at start: weights changed in place while it runs are not seen by its
step (start a new engine); `generate` re-checks and retraces.

A second trace, the prefill step (`traced_prefill`), runs prompts (and prompt chunks) of two or
more tokens the same way, with a causal mask over the new slots and the LM head on the last
position only. Both are made on TorchScript's legacy executor (see `_warm_up`). A step is traced
for one KV cache dtype (float32, or float16: `kv_cache_dtype`): a model keeps one per dtype.

Tracing takes ~0.3 s for a 6-layer model and under a second for a 250M one, more than a short
request saves, so `stream`/`generate` trace a model only once it has been asked for
`TRACE_AFTER_TOKENS` tokens (a long request traces at once; a script of short ones from its
third or so); the engine traces when it starts; call `traced_step` to trace up front.
`traced_step_unsupported` says when the eager step runs instead (a model or option the trace
cannot capture exactly); $SHIPYARD_DISABLE_KERNELS=traced-step forces it.
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from shipyard.errors import ModelError
from shipyard.generate.cache import BatchKVCache, cache_values
from shipyard.models.gpt import GPT
from shipyard.models.llama import Llama
from shipyard.models.protocol import KVCache, LanguageModel
from shipyard.models.quantized import Int8Linear, kernel_disabled

TRACED_KERNEL = "traced-step"
"""The name $SHIPYARD_DISABLE_KERNELS takes to turn the traced decode step off."""

TRACE_AFTER_TOKENS = 256
"""Tokens a model must have been asked for (all requests) before decoding traces it."""
log = logging.getLogger("shipyard.generate")
_TRACE_SLOTS = 8  # cache slots of the example the step is traced with (any size runs)


class StaticKVCache(KVCache):
    """A fixed-size cache for a batch of left-padded rows, written in place: what the traced
    step sees of a `BatchKVCache`'s `storage`.

    keys/values: (n_layer, B, n_kv, capacity, hs); position: (T,) slots of the new tokens (every
    row ends at the same slot; T = 1 for a decode step, the chunk's length for a prefill);
    start: (B,) each row's first real slot (its left padding). Every layer attends all
    `capacity` slots, masked to start..the query's own slot of each row.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, start: torch.Tensor
    ) -> None:
        super().__init__(keys.size(0))
        self._k, self._v, self.position, self.start = keys, values, position, start

    @property
    def seq_len(self) -> int:
        """Slots every layer attends (the capacity)."""
        return self._k.size(3)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, n_kv, T, hs) keys/values at `position`; return all slots."""
        keys, values = self._k[layer], self._v[layer]  # (B, n_kv, capacity, hs)
        keys.index_copy_(2, self.position, cache_values(k, keys.dtype))
        values.index_copy_(2, self.position, cache_values(v, values.dtype))
        return keys, values

    def attention_mask(
        self,
        T: int,
        past: int,
        key_mask: torch.Tensor | None,
        window: int | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """Slots start..each query's own slot per row (within `window`), (B, 1, T, capacity)."""
        slots = torch.arange(self.seq_len, device=device)[None, None, :]  # (1, 1, capacity)
        query = self.position[None, :, None]  # (1, T, 1)
        allowed = (slots <= query) & (slots >= self.start[:, None, None])  # (B, T, capacity)
        if window is not None:
            allowed = allowed & (slots > query - window)
        return allowed[:, None], False


class _Step(nn.Module):
    """model(T tokens per row at slots `position`) -> the last one's next-token logits (B, V),
    over a `StaticKVCache`; row b's position ids are position - start[b] (its token counts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        idx: torch.Tensor,
        position: torch.Tensor,
        start: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        cache = StaticKVCache(keys, values, position, start)
        positions = position[None, :] - start[:, None]  # (B, T)
        return self.model(idx, kv_cache=cache, positions=positions, last_only=True)[:, -1]


def traced_step_unsupported(model: LanguageModel, autocast_dtype: torch.dtype | None) -> str:
    """Why the traced step cannot run `model` exactly ("" when it can)."""
    if kernel_disabled(TRACED_KERNEL):
        return f"disabled by $SHIPYARD_DISABLE_KERNELS={TRACED_KERNEL}"
    if not isinstance(model, GPT | Llama):
        return f"no traced step for {type(model).__name__}"
    if autocast_dtype is not None:
        return "autocast"
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return "the traced step runs float32 weights on CPU"
    if isinstance(model, Llama) and model.config.rope.rope_type == "dynamic":
        return "dynamic RoPE rescales by length at run time"
    return ""


@dataclass
class TracedStep:
    """A frozen step for one model: any batch size and cache capacity (the trace records the
    sizes it reads, so one trace serves every shape). A decode step takes one token per row;
    a prefill step (`traced_prefill`) two or more."""

    step: torch.jit.ScriptModule
    trace_s: float  # seconds tracing and freezing took
    signature: tuple[object, ...]
    kv_shape: tuple[int, int]  # (key/value heads, head size): what an empty cache allocates
    kv_dtype: torch.dtype  # what the cache stores (the trace casts new keys/values to it)

    def __call__(
        self, tokens: torch.Tensor, cache: BatchKVCache, start: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, V) after `tokens` (B, T) at the end of `cache` (empty: allocated here),
        whose rows begin at slots `start` (B,); writes their keys/values into the cache and
        counts the slots."""
        B, T = tokens.shape
        position = cache.seq_len
        if cache.batch_size == 0:
            dtype = cache.dtype or self.kv_dtype
            cache.allocate(B, *self.kv_shape, T, dtype=dtype, device=tokens.device)
        cache.reserve(position + T)
        keys, values = cache.storage
        if keys.dtype != self.kv_dtype:  # the trace casts new keys to the dtype it was made for
            raise ModelError(
                f"this step was traced for a {self.kv_dtype} KV cache, not {keys.dtype}"
            )
        pos = torch.arange(position, position + T, dtype=torch.long, device=keys.device)
        logits = self.step(tokens, pos, start, keys, values)
        cache.advance(T)
        return logits


def _warm_up(frozen: torch.jit.ScriptModule, example: tuple[torch.Tensor, ...]) -> None:
    """Make the frozen step's executor now, on the example: the legacy one (no profiling).

    TorchScript's default (profiling) executor profiles the first call, optimizes for the
    sizes it saw and re-specializes when they change, falling back to a slower graph after a
    few changes; a decode step's sizes change all the time (rows join and leave, the cache
    grows), and on the benchmark GPT that cost ~0.2 s up front and then 2-7 ms per request.
    The executor is chosen when a graph first runs, so the switch is flipped for that call only.
    """
    previous = torch._C._jit_set_profiling_executor(False)
    try:
        frozen(*example)
    finally:
        torch._C._jit_set_profiling_executor(previous)


def _kv_shape(model: LanguageModel) -> tuple[int]:
    if isinstance(model, Llama):
        return (model.config.kv_heads,)
    assert isinstance(model, GPT)
    return (model.config.n_head,)


def _head_size(model: LanguageModel) -> int:
    if isinstance(model, Llama):
        return model.config.head_size
    assert isinstance(model, GPT)
    return model.config.n_embd // model.config.n_head


def _signature(module: nn.Module) -> tuple[object, ...]:
    """What a frozen step bakes in: every tensor's storage and version, every int8 kernel."""
    parts: list[object] = []
    for t in [*module.parameters(), *module.buffers()]:
        parts.append((t.data_ptr(), -1 if t.is_inference() else t._version))
    parts.extend(m.kernel for m in module.modules() if isinstance(m, Int8Linear))
    return tuple(parts)


_Kind = tuple[int, torch.dtype]  # (tokens per row in the example: 1 decode, 2 prefill; KV dtype)
# per model: its steps by kind, and the weights signature each kind failed to trace on (not
# retried until the weights or kernels change)
_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[_Kind, TracedStep]] = weakref.WeakKeyDictionary()
_FAILED: weakref.WeakKeyDictionary[nn.Module, dict[_Kind, tuple[object, ...]]] = (
    weakref.WeakKeyDictionary()
)


def traced_step(model: LanguageModel, kv_dtype: torch.dtype | None = None) -> TracedStep | None:
    """The frozen decode step of `model` over a KV cache of `kv_dtype` (None: float32): traced
    on first use, then reused until the model's weights or int8 kernels change. None (logged
    once) where tracing fails, for any reason; a failed model is not traced again until its
    weights or kernels change. Call outside inference_mode.
    """
    return _traced(model, 1, kv_dtype or torch.float32)


def traced_prefill(model: LanguageModel, kv_dtype: torch.dtype | None = None) -> TracedStep | None:
    """The frozen prefill step of `model` (two or more tokens per row: a prompt, or a chunk
    of one), as `traced_step`. It runs the same ops as the model's eager forward, without
    the ~0.2 ms of Python per layer: most of a short prompt's time to first token on CPU."""
    return _traced(model, 2, kv_dtype or torch.float32)


def _traced(model: LanguageModel, tokens: int, kv_dtype: torch.dtype) -> TracedStep | None:
    assert isinstance(model, nn.Module)
    kind = (tokens, kv_dtype)
    signature = _signature(model)
    failed = _FAILED.setdefault(model, {})
    if failed.get(kind) == signature:
        return None
    traces = _STEPS.setdefault(model, {})
    cached = traces.get(kind)
    if cached is not None and cached.signature == signature:
        return cached
    start = time.perf_counter()
    device = next(model.parameters()).device
    kv_shape = (*_kv_shape(model), _head_size(model))
    shape = (model.n_layer, 1, kv_shape[0], _TRACE_SLOTS, kv_shape[1])
    example = (
        torch.zeros(1, tokens, dtype=torch.long, device=device),
        torch.arange(tokens, dtype=torch.long, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
        torch.zeros(shape, dtype=kv_dtype, device=device),
        torch.zeros(shape, dtype=kv_dtype, device=device),
    )
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the forward's argument checks (int(positions.max()) ...) run once, at trace time
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch.jit is deprecated (not removed) in PyTorch 2.x; it is the capture that needs
            # no compiler and takes seconds, where torch.compile took minutes and ran slower here
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(_Step(model).eval(), example, check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
            _warm_up(frozen, example)
    except Exception as e:  # an optimisation: whatever fails decodes eagerly
        # a PyTorch without TorchScript, an op the tracer refuses, a model check at trace time
        what = "decode" if tokens == 1 else "prefill"
        log.warning("%s step: tracing failed (%s: %s); eager", what, type(e).__name__, e)
        failed[kind] = signature
        return None
    elapsed = time.perf_counter() - start
    traces[kind] = cached = TracedStep(frozen, elapsed, signature, kv_shape, kv_dtype)
    log.info(
        "%s step: traced %s in %.2f s (off: $SHIPYARD_DISABLE_KERNELS=%s)",
        "decode" if tokens == 1 else "prefill",
        type(model).__name__,
        cached.trace_s,
        TRACED_KERNEL,
    )
    return cached


_ASKED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def trace_pays(model: LanguageModel, max_tokens: int) -> bool:
    """Count a request of `max_tokens`; True when `model` has a traced step already or its
    requests so far (this one included) asked for at least `TRACE_AFTER_TOKENS` tokens."""
    assert isinstance(model, nn.Module)
    if has_traced_step(model):
        return True
    _ASKED[model] = asked = _ASKED.get(model, 0) + max_tokens
    return asked >= TRACE_AFTER_TOKENS


def has_traced_step(model: LanguageModel) -> bool:
    """Whether `model` has a traced step (False: it never decoded through one)."""
    assert isinstance(model, nn.Module)
    return any(tokens == 1 for tokens, _ in _STEPS.get(model, {}))
