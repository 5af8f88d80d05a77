"""Language models in the server: one continuous-batching `Engine` per loaded LM version.

`ModelRepository.add` calls `start_engine` for a language-modeling package whose model is a
`shipyard.models.LanguageModel` (GPT, Llama) or a recurrent one (the rnn with head lm) with a
tokenizer; the OpenAI routes submit to
`ServedModel.engine`. `EngineMetrics` feeds the Prometheus token metrics from the engine thread
(cheap: a counter increment or a histogram observation per token).
"""

from __future__ import annotations

from shipyard.config_base import LM_TASK
from shipyard.data.tokenization import Tokenizer
from shipyard.errors import GenerationError
from shipyard.generate import Engine, EngineObserver, GenerationResult
from shipyard.models.protocol import DecodingModel, is_decoding_model
from shipyard.package import LoadedModel
from shipyard.serve import metrics
from shipyard.serve.settings import ServeSettings


def language_model(loaded: LoadedModel) -> tuple[DecodingModel, Tokenizer]:
    """The model and tokenizer of a language-model package; GenerationError when it has none."""
    name = loaded.manifest.name
    if loaded.task != LM_TASK:
        raise GenerationError(
            f"model {name!r} has task {loaded.task!r}; text generation needs a "
            f"{LM_TASK} package (e.g. one trained from examples/gpt-tiny.yaml)"
        )
    model = loaded.model
    if not is_decoding_model(model) or loaded.tokenizer is None:
        kind = type(loaded.model).__name__
        raise GenerationError(
            f"model {name!r} is a {kind} without a KV cache or recurrent state (e.g. an ONNX "
            "export) or has no tokenizer; generate from the torch package it was exported from"
        )
    return model, loaded.tokenizer


def supports_generation(loaded: LoadedModel) -> bool:
    """True when `language_model(loaded)` would succeed."""
    return (
        loaded.task == LM_TASK and is_decoding_model(loaded.model) and loaded.tokenizer is not None
    )


class EngineMetrics(EngineObserver):
    """Prometheus metrics for one model version's engine; hooks run on the engine thread."""

    def __init__(self, model: str, version: str) -> None:
        self._ttft = metrics.TIME_TO_FIRST_TOKEN.labels(model=model)
        self._itl = metrics.INTER_TOKEN_LATENCY.labels(model=model)
        self._generated = metrics.GENERATED_TOKENS.labels(model=model)
        self._prompt = metrics.PROMPT_TOKENS.labels(model=model)
        self._running = metrics.RUNNING_SEQUENCES.labels(model=model, version=version)
        self._waiting = metrics.WAITING_SEQUENCES.labels(model=model, version=version)
        self.engine: Engine | None = None

    def refresh(self) -> None:
        """Set the running/waiting gauges from the engine (a lock and two gauge sets)."""
        if self.engine is None:
            return
        stats = self.engine.stats()
        self._running.set(stats.running + stats.prefilling)
        self._waiting.set(stats.waiting)

    def on_request_start(self, request_id: str, prompt_tokens: int, queued_s: float) -> None:
        self._prompt.inc(prompt_tokens)
        self.refresh()

    def on_first_token(self, request_id: str, time_to_first_token_s: float) -> None:
        self._generated.inc()
        self._ttft.observe(time_to_first_token_s)

    def on_token(self, request_id: str, inter_token_s: float) -> None:
        self._generated.inc()
        self._itl.observe(inter_token_s)

    def on_finish(self, result: GenerationResult) -> None:
        self.refresh()

    def on_step(self, batch_size: int, step_s: float) -> None:
        self.refresh()  # after the step's finished rows left the batch

    def clear(self) -> None:
        """Zero the gauges (the engine is closed)."""
        self._running.set(0)
        self._waiting.set(0)


def start_engine(loaded: LoadedModel, name: str, version: str, settings: ServeSettings) -> Engine:
    """A started engine over the package's model, sized by --max-running-seqs / --max-queue."""
    model, tokenizer = language_model(loaded)
    observer = EngineMetrics(name, version)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=settings.max_running_seqs,
        max_queue=settings.max_queue,
        observer=observer,
        weights=settings.decode_weights,
        kv_cache=settings.kv_cache,
    )
    observer.engine = engine
    return engine


async def stop_engine(engine: Engine) -> None:
    """Finish the engine's accepted requests, stop its thread and zero its gauges."""
    await engine.aclose(drain=True)
    if isinstance(engine.observer, EngineMetrics):
        engine.observer.clear()
