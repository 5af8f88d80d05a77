"""Model zoo: one file per architecture, each config beside its model, and one registry.

A family is its file plus one `register_family` line below: its config class (discriminated by
`name`), its builder, and what the rest of shipyard needs to know about it (a causal language
model? does it take token ids?). `build_model` turns a model config (the `model:` section of a
run config) plus what only the data knows (input shape, number of outputs, vocabulary size) into
an `nn.Module`. Language models satisfy `LanguageModel` (see `protocol.py`), which is all the
generation engine and the server rely on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, Union

from pydantic import Field
from torch import nn

from shipyard.errors import ModelError
from shipyard.models.cnn import CNN, CNNConfig
from shipyard.models.encoder import Encoder, EncoderConfig
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.llama import (
    Llama,
    LlamaConfig,
    build_llama,
    config_from_hf,
    hf_config_from,
    llama_from_state_dict,
)
from shipyard.models.mlp import MLP, MLPConfig
from shipyard.models.protocol import (
    DecodingModel,
    KVCache,
    LanguageModel,
    RecurrentLanguageModel,
    RecurrentState,
    is_decoding_model,
    is_language_model,
    is_recurrent_language_model,
    language_module,
)
from shipyard.models.rnn import RNN, RNNConfig, RNNState

ModelBuilder = Callable[..., nn.Module]
"""Called as builder(config, input_shape=..., num_outputs=..., vocab_size=...)."""


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: its config class, its builder and how the rest of shipyard treats it.

    causal_lm: a next-token language model (task language-modeling; satisfies LanguageModel).
    takes_tokens: its input is token ids, so the data needs a tokenizer.
    trains_as_lm: can be trained on task language-modeling; implied by causal_lm (rnn sets it:
        with head "lm" it decodes with its recurrent state instead of a KV cache).
    """

    name: str
    config: type[Any]
    build: ModelBuilder
    causal_lm: bool = False
    takes_tokens: bool = False
    trains_as_lm: bool = False

    def __post_init__(self) -> None:
        if self.causal_lm:  # a causal LM always trains as one
            object.__setattr__(self, "trains_as_lm", True)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add an architecture to the registry (its config's `name` must be `family.name`)."""
    if family.name in FAMILIES:
        raise ModelError(f"model {family.name!r} is already registered")
    declared = family.config.model_fields.get("name")
    if declared is None or declared.default != family.name:
        raise ModelError(
            f"model {family.name!r}: {family.config.__name__}.name must default to {family.name!r}"
        )
    FAMILIES[family.name] = family
    return family


def register_model(
    name: str,
    *,
    causal_lm: bool = False,
    takes_tokens: bool = False,
    trains_as_lm: bool = False,
    config: type[Any],
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator form of `register_family` for a builder defined here."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        register_family(ModelFamily(name, config, builder, causal_lm, takes_tokens, trains_as_lm))
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


@register_model("mlp", config=MLPConfig)
def _build_mlp(
    config: MLPConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    in_features = math.prod(_require_shape("mlp", input_shape))
    return MLP(config, in_features, _require_outputs("mlp", num_outputs))


@register_model("cnn", config=CNNConfig)
def _build_cnn(
    config: CNNConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    return CNN(config, _require_shape("cnn", input_shape), _require_outputs("cnn", num_outputs))


@register_model("gpt", config=GPTConfig, causal_lm=True, takes_tokens=True)
def _build_gpt(
    config: GPTConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    # A language model's outputs are its vocabulary, so num_outputs is not used.
    return GPT(config, _require_vocab("gpt", config.vocab_size, vocab_size))


@register_model("encoder", config=EncoderConfig, takes_tokens=True)
def _build_encoder(
    config: EncoderConfig,
    *,
    input_shape: tuple[int, ...] | None,
    num_outputs: int | None,
    vocab_size: int | None,
) -> nn.Module:
    vocab = _require_vocab("encoder", config.vocab_size, vocab_size)
    return Encoder(config, vocab, _require_outputs("encoder", num_outputs))


@register_model("rnn", config=RNNConfig, takes_tokens=True, trains_as_lm=True)
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


register_family(ModelFamily("llama", LlamaConfig, build_llama, causal_lm=True, takes_tokens=True))

MODEL_NAMES: tuple[str, ...] = tuple(FAMILIES)
CAUSAL_MODELS = frozenset(f.name for f in FAMILIES.values() if f.causal_lm)  # next-token LMs
TOKEN_MODELS = frozenset(f.name for f in FAMILIES.values() if f.takes_tokens)  # need a tokenizer
LANGUAGE_MODELS = frozenset(f.name for f in FAMILIES.values() if f.trains_as_lm)  # LM-trainable

if TYPE_CHECKING:
    # The union below is built from the registry, which mypy cannot follow.
    ArchitectureConfig: TypeAlias = Any
    ModelConfig: TypeAlias = Any
else:
    ArchitectureConfig = Union[tuple(f.config for f in FAMILIES.values())]  # noqa: UP007
    ModelConfig = Annotated[ArchitectureConfig, Field(discriminator="name")]


def build_model(
    config: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """Build the model a config describes.

    input_shape: shape of one example (mlp, cnn). num_outputs: classes or regression targets
    (mlp, cnn, encoder). vocab_size: tokenizer vocabulary (gpt, llama, encoder), unless in the
    config.
    """
    name = getattr(config, "name", None)
    if name not in FAMILIES:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name].build(
        config, input_shape=input_shape, num_outputs=num_outputs, vocab_size=vocab_size
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in `model` (shared ones once); only trainable ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CAUSAL_MODELS",
    "CNN",
    "FAMILIES",
    "GPT",
    "LANGUAGE_MODELS",
    "MLP",
    "MODEL_NAMES",
    "RNN",
    "TOKEN_MODELS",
    "ArchitectureConfig",
    "CNNConfig",
    "DecodingModel",
    "Encoder",
    "EncoderConfig",
    "GPTConfig",
    "KVCache",
    "LanguageModel",
    "Llama",
    "LlamaConfig",
    "MLPConfig",
    "ModelBuilder",
    "ModelConfig",
    "ModelFamily",
    "RNNConfig",
    "RNNState",
    "RecurrentLanguageModel",
    "RecurrentState",
    "build_model",
    "config_from_hf",
    "count_parameters",
    "hf_config_from",
    "is_decoding_model",
    "is_language_model",
    "is_recurrent_language_model",
    "language_module",
    "llama_from_state_dict",
    "register_family",
    "register_model",
]
