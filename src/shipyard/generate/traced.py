"""A captured single-token decode step: the model's own forward, traced once, over a fixed-size
KV cache written in place. The CPU fast path of single-stream generation.

At a few hundred tokens per second a decode token has ~1-3 ms, and the eager step spends much
of it in Python: ~15 module calls and ~30 tensor ops per layer, each with its dispatcher
overhead. `torch.jit.trace` records the ops of one step once; `torch.jit.freeze` turns the
weights into constants. The step then runs in TorchScript's interpreter with no per-op Python
(`benchmarks/generate_throughput.py` measures eager against traced, fp32 and int8 weights).

The trace needs fixed shapes, so the cache is a `StaticKVCache`: (n_layer, 1, n_kv, capacity, hs)
tensors that the step writes at the token's position (`index_copy_`), attending every slot
through a mask of the slots written so far. Capacity is the needed length rounded up to a
bucket (`capacity_for`), so a model is traced once per bucket; steps are kept per model and
rebuilt when its weights or kernels change. The traced step computes what the eager step
computes (same kernels for int8 layers; fp32 layers through `F.linear`), up to float32 rounding.

Tracing takes ~0.5 s for a 6-layer model and a few seconds for a 250M one, more than a short
request saves, so `stream`/`generate` trace a model only once it has been asked for
`TRACE_AFTER_TOKENS` tokens (a long request traces at once; a script of short ones from its
third or so); call `traced_step` at start-up to trace up front. `traced_step_unsupported` says
when the eager step runs instead (a model or option the trace cannot capture exactly);
$SHIPYARD_DISABLE_KERNELS=traced-step forces it.
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from shipyard.models.gpt import GPT
from shipyard.models.llama import Llama
from shipyard.models.protocol import KVCache, LanguageModel
from shipyard.models.quantized import Int8Linear, kernel_disabled

TRACED_KERNEL = "traced-step"
"""The name $SHIPYARD_DISABLE_KERNELS takes to turn the traced decode step off."""

_MIN_BUCKET = 256
TRACE_AFTER_TOKENS = 256
"""Tokens a model must have been asked for (all requests) before decoding traces it."""
log = logging.getLogger("shipyard.generate")


def capacity_for(needed: int, max_context: int) -> int:
    """Cache slots for `needed` tokens: the next power of two from 256, at most max_context."""
    capacity = _MIN_BUCKET
    while capacity < needed:
        capacity *= 2
    return max(needed, min(capacity, max_context))


class StaticKVCache(KVCache):
    """A fixed-size cache for one sequence and one new token per call, written in place.

    keys/values: (n_layer, 1, n_kv, capacity, hs); position: (1,) slot of the new token. Every
    layer attends all `capacity` slots, masked to the ones at or before `position`.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        super().__init__(keys.size(0))
        self._k, self._v, self.position = keys, values, position

    @property
    def seq_len(self) -> int:
        """Slots every layer attends (the capacity)."""
        return self._k.size(3)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (1, n_kv, 1, hs) key/value at `position`; return all slots."""
        keys, values = self._k[layer], self._v[layer]  # (1, n_kv, capacity, hs)
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        return keys, values

    def attention_mask(
        self,
        T: int,
        past: int,
        key_mask: torch.Tensor | None,
        window: int | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """Slots 0..position (within `window` of it), as (1, 1, 1, capacity)."""
        slots = torch.arange(self.seq_len, device=device)  # (capacity,)
        allowed = slots <= self.position
        if window is not None:
            allowed = allowed & (slots > self.position - window)
        return allowed[None, None, None, :], False


class _Step(nn.Module):
    """model(token at position) -> next-token logits (1, V), over a `StaticKVCache`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, idx: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        cache = StaticKVCache(keys, values, position)
        return self.model(idx, kv_cache=cache, positions=position[None])[:, -1]  # (1, V)


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
    """A frozen decode step for one model and cache capacity, with its cache buffers."""

    step: torch.jit.ScriptModule
    capacity: int
    trace_s: float  # seconds tracing and freezing took
    signature: tuple[object, ...]

    def new_cache(self, model: LanguageModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (n_layer, 1, n_kv, capacity, hs) key and value buffers for one sequence."""
        shape = (model.n_layer, 1, *_kv_shape(model), self.capacity, _head_size(model))
        assert isinstance(model, nn.Module)
        device = next(model.parameters()).device
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def __call__(
        self, token: int, position: int, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Logits (1, V) after `token` at `position`; writes its keys/values there."""
        idx = torch.tensor([[token]], dtype=torch.long, device=keys.device)
        pos = torch.tensor([position], dtype=torch.long, device=keys.device)
        return self.step(idx, pos, keys, values)


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


_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[int, TracedStep]] = weakref.WeakKeyDictionary()
# models whose trace failed, with the weights signature it failed on: not retried until it changes
_FAILED: weakref.WeakKeyDictionary[nn.Module, tuple[object, ...]] = weakref.WeakKeyDictionary()


def traced_step(model: LanguageModel, capacity: int) -> TracedStep | None:
    """The frozen step of `model` for `capacity` cache slots: traced on first use, then reused
    until the model's weights or int8 kernels change. None (logged once) where tracing fails;
    a failed model is not traced again until its weights or kernels change.
    Call outside inference_mode.
    """
    assert isinstance(model, nn.Module)
    signature = _signature(model)
    if _FAILED.get(model) == signature:
        return None
    steps = _STEPS.setdefault(model, {})
    cached = steps.get(capacity)
    if cached is not None and cached.signature == signature:
        return cached
    start = time.perf_counter()
    device = next(model.parameters()).device
    shape = (model.n_layer, 1, *_kv_shape(model), capacity, _head_size(model))
    example = (
        torch.zeros(1, 1, dtype=torch.long, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
        torch.zeros(shape, device=device),
        torch.zeros(shape, device=device),
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
    except (RuntimeError, AttributeError) as e:  # a PyTorch without TorchScript, an odd op
        log.warning("decode step: tracing failed (%s); decoding eagerly", e)
        _FAILED[model] = signature
        return None
    steps[capacity] = cached = TracedStep(frozen, capacity, time.perf_counter() - start, signature)
    log.info(
        "decode step: traced %s for %d cache slots in %.2f s (off: $SHIPYARD_DISABLE_KERNELS=%s)",
        type(model).__name__,
        capacity,
        cached.trace_s,
        TRACED_KERNEL,
    )
    return cached


_ASKED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def trace_pays(model: LanguageModel, capacity: int, max_tokens: int) -> bool:
    """Count a request of `max_tokens`; True when `model` has a step for `capacity` already or
    its requests so far (this one included) asked for at least `TRACE_AFTER_TOKENS` tokens."""
    assert isinstance(model, nn.Module)
    if capacity in _STEPS.get(model, {}):
        return True
    _ASKED[model] = asked = _ASKED.get(model, 0) + max_tokens
    return asked >= TRACE_AFTER_TOKENS


def traced_capacities(model: LanguageModel) -> list[int]:
    """Capacities `model` has a traced step for (empty: it never decoded through one)."""
    assert isinstance(model, nn.Module)
    return sorted(_STEPS.get(model, {}))
