"""Starting from a trained model: `model: {name: pretrained, path: PACKAGE}` and `finetune:`.

The base package brings its architecture, weights and tokenizer; `finetune.method: lora` then
freezes it and swaps adapters onto the target layers (`shipyard.models.lora`). The run's
checkpoints hold base and adapters, so resume is exact like any run; the package holds them
unmerged with the base's fingerprint (`manifest.lora`), or merged (`finetune.merge: true`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from shipyard.config import PretrainedConfig, RunConfig
from shipyard.data import Tokenizer
from shipyard.errors import ModelError, TrainError
from shipyard.models.lora import apply_lora, lora_layers
from shipyard.package import LoadedModel, load_package, manifest_sha256
from shipyard.package.files import WEIGHTS
from shipyard.package.manifest import BaseRef, LoRASpec, read_manifest


@dataclass
class Base:
    """A pretrained package, loaded and verified, to fine-tune."""

    path: Path
    loaded: LoadedModel

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The base's tokenizer (None for models that take features)."""
        return self.loaded.tokenizer

    def block_size(self, wanted: int | None) -> int | None:
        """Tokens per example for this base (see `pretrained_block_size`)."""
        return pretrained_block_size(self.loaded, wanted)


def pretrained_block_size(loaded: LoadedModel, wanted: int | None) -> int | None:
    """Tokens per example of a run on a pretrained model: `wanted` (data.block_size), at most the
    model's context length, which is the default. None for models that take features."""
    context = getattr(loaded.model, "max_context", None)
    if context is None:
        size = loaded.manifest.architecture.config.get("block_size")
        context = int(size) if size is not None else None
    if wanted is None or context is None:
        return context
    if wanted > context:
        raise TrainError(
            f"data.block_size {wanted} is longer than the model's context ({context} tokens)"
        )
    return wanted


def load_base(config: RunConfig) -> Base | None:
    """The pretrained package of `config.model` (verified), or None for a model built from
    scratch; TrainError when it cannot be the start of this run."""
    if not isinstance(config.model, PretrainedConfig):
        return None
    path = Path(config.model.path)
    loaded = load_package(path)
    if loaded.task != config.task:
        raise TrainError(
            f"model.path {path} is a {loaded.task} model but the run's task is {config.task}; "
            f"set task: {loaded.task}"
        )
    if loaded.manifest.lora is not None:
        raise TrainError(
            f"model.path {path} holds an unmerged LoRA adapter; start from its base package, or "
            "package the adapter run merged (finetune.merge: true)"
        )
    if loaded.manifest.backend != "torch" or loaded.manifest.quantization is not None:
        raise TrainError(
            f"model.path {path} is a compressed/exported package ({loaded.manifest.backend}); "
            "fine-tune the fp32 package it came from"
        )
    return Base(path=path, loaded=loaded)


def prepare_for_finetune(model: nn.Module, config: RunConfig) -> list[str]:
    """Swap LoRA adapters onto `model` when `finetune.method` is lora; return their paths."""
    ft = config.finetune
    if ft is None or ft.method != "lora":
        return []
    try:
        return apply_lora(model, ft)
    except ModelError as exc:
        raise TrainError(f"finetune: {exc}") from None


def lora_spec(model: nn.Module, config: RunConfig) -> LoRASpec | None:
    """What the package must record to rebuild `model`'s unmerged adapters (None: no adapters)."""
    layers = lora_layers(model)
    if not layers or config.finetune is None:
        return None
    return LoRASpec(
        rank=config.finetune.rank,
        alpha=config.finetune.alpha,
        layers=list(layers),
        base=base_ref(config),
    )


def base_ref(config: RunConfig) -> BaseRef:
    """The fingerprint of the run's base package (the run must start from one)."""
    if not isinstance(config.model, PretrainedConfig):
        raise TrainError(
            "LoRA adapters record the base they were trained on: use model: {name: pretrained, "
            "path: PACKAGE}"
        )
    path = Path(config.model.path)
    manifest, _ = read_manifest(path)
    entry = manifest.files[WEIGHTS]
    return BaseRef(
        name=manifest.name,
        version=manifest.version,
        manifest_sha256=manifest_sha256(path),
        weights_hash=f"{entry.algorithm}:{entry.digest}",
    )
