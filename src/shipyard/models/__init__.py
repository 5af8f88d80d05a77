"""Model zoo: one file per architecture, each config beside its model, and `build_model`.

`build_model` turns a model config (the `model:` section of a run config) plus what only the data
knows (input shape, number of outputs, vocabulary size) into an `nn.Module`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field
from torch import nn

from shipyard.errors import ModelError
from shipyard.models.cnn import CNN, CNNConfig
from shipyard.models.encoder import Encoder, EncoderConfig
from shipyard.models.gpt import GPT, GPTConfig, KVCache
from shipyard.models.mlp import MLP, MLPConfig
from shipyard.models.rnn import RNN, RNNConfig, RNNState

ModelConfig = Annotated[
    MLPConfig | CNNConfig | GPTConfig | EncoderConfig | RNNConfig, Field(discriminator="name")
]

CAUSAL_MODELS = frozenset({"gpt"})  # next-token language models only
LANGUAGE_MODELS = frozenset({"gpt", "rnn"})  # can be trained as next-token language models
TOKEN_MODELS = frozenset({"gpt", "encoder", "rnn"})  # take token ids, need a tokenizer

ModelBuilder = Callable[..., nn.Module]
"""Called as builder(config, input_shape=..., num_outputs=..., vocab_size=...)."""

_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a builder for model configs whose `name` is `name`."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ModelError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorate


def _require_shape(name: str, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is None:
        raise ModelError(
            f"model {name!r} needs input_shape (the shape of one example, from the data) to size "
            "its first layer; pass build_model(..., input_shape=...)"
        )
    shape = tuple(input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ModelError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    return shape


def _require_outputs(name: str, num_outputs: int | None) -> int:
    if num_outputs is None:
        raise ModelError(
            f"model {name!r} needs num_outputs (classes, or regression targets, from the data) "
            "to size its head; pass build_model(..., num_outputs=...)"
        )
    if num_outputs <= 0:
        raise ModelError(f"num_outputs must be positive, got {num_outputs}")
    return num_outputs


def _require_vocab(name: str, config_vocab: int | None, vocab_size: int | None) -> int:
    if config_vocab is not None and vocab_size is not None and config_vocab != vocab_size:
        raise ModelError(
            f"model {name!r}: config vocab_size={config_vocab} but the tokenizer has "
            f"vocab_size={vocab_size}; remove model.vocab_size to take it from the tokenizer"
        )
    vocab = vocab_size if vocab_size is not None else config_vocab
    if vocab is None:
        raise ModelError(
            f"model {name!r} needs vocab_size to size its embeddings: set model.vocab_size or "
            "pass build_model(..., vocab_size=...) (normally the tokenizer's vocabulary size)"
        )
    return vocab


@register_model("mlp")
def _build_mlp(
    config: MLPConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    in_features = math.prod(_require_shape("mlp", input_shape))
    return MLP(config, in_features, _require_outputs("mlp", num_outputs))


@register_model("cnn")
def _build_cnn(
    config: CNNConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    return CNN(config, _require_shape("cnn", input_shape), _require_outputs("cnn", num_outputs))


@register_model("gpt")
def _build_gpt(
    config: GPTConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    # A language model's outputs are its vocabulary, so num_outputs is not used.
    return GPT(config, _require_vocab("gpt", config.vocab_size, vocab_size))


@register_model("encoder")
def _build_encoder(
    config: EncoderConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    vocab = _require_vocab("encoder", config.vocab_size, vocab_size)
    return Encoder(config, vocab, _require_outputs("encoder", num_outputs))


@register_model("rnn")
def _build_rnn(
    config: RNNConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    vocab = _require_vocab("rnn", config.vocab_size, vocab_size)
    if config.head == "lm":  # a language model's outputs are its vocabulary
        return RNN(config, vocab, None)
    return RNN(config, vocab, _require_outputs("rnn", num_outputs))


MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    config: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """Build the model a config describes.

    input_shape: shape of one example (mlp, cnn). num_outputs: classes or regression targets
    (mlp, cnn, encoder). vocab_size: tokenizer vocabulary (gpt, encoder), unless in the config.
    """
    name = getattr(config, "name", None)
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](
        config, input_shape=input_shape, num_outputs=num_outputs, vocab_size=vocab_size
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in `model` (shared ones once); only trainable ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CAUSAL_MODELS",
    "CNN",
    "GPT",
    "LANGUAGE_MODELS",
    "MLP",
    "MODEL_NAMES",
    "RNN",
    "TOKEN_MODELS",
    "CNNConfig",
    "Encoder",
    "EncoderConfig",
    "GPTConfig",
    "KVCache",
    "MLPConfig",
    "ModelBuilder",
    "ModelConfig",
    "RNNConfig",
    "RNNState",
    "build_model",
    "count_parameters",
    "register_model",
]
