"""Starting from a trained model: `model: {name: pretrained, path: PACKAGE | HF_DIR}` and
`finetune:`.

The base (a shipyard package, or a Hugging Face checkpoint directory read as `import-hf`
reads it) brings its architecture, weights, tokenizer and chat template; `finetune.method:
lora` then freezes it and swaps adapters onto the target layers (`shipyard.models.lora`). The run's
checkpoints hold base and adapters, so resume is exact like any run; the package holds them
unmerged with the base's fingerprint (`manifest.lora`), or merged (`finetune.merge: true`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from shipyard.config import PretrainedConfig, RunConfig
from shipyard.config_base import LM_TASK
from shipyard.data import Tokenizer
from shipyard.errors import ModelError, TrainError
from shipyard.models.lora import apply_lora, lora_layers
from shipyard.package import LoadedModel, load_package, manifest_sha256
from shipyard.package.files import MANIFEST, WEIGHTS
from shipyard.package.hf_checkpoint import (
    HF_CONFIG,
    HFCheckpointError,
    checkpoint_fingerprint,
    is_hf_checkpoint,
    load_hf_checkpoint,
)
from shipyard.package.manifest import BaseRef, LoRASpec, read_manifest


@dataclass
class Base:
    """A pretrained model to fine-tune: a package (loaded and verified) or a Hugging Face
    checkpoint directory (read, and fingerprinted as `shipyard import-hf` does)."""

    path: Path
    model: nn.Module
    tokenizer: Tokenizer | None  # None for models that take features
    loaded: LoadedModel | None = None  # the package; None for a checkpoint directory
    source_fingerprint: str | None = None  # a checkpoint directory's

    def block_size(self, wanted: int | None) -> int | None:
        """Tokens per example for this base (see `pretrained_block_size`)."""
        if self.loaded is not None:
            return pretrained_block_size(self.loaded, wanted)
        return _fit_context(getattr(self.model, "max_context", None), wanted)


def pretrained_block_size(loaded: LoadedModel, wanted: int | None) -> int | None:
    """Tokens per example of a run on a pretrained model: `wanted` (data.block_size), at most the
    model's context length, which is the default. None for models that take features."""
    context = getattr(loaded.model, "max_context", None)
    if context is None:
        size = loaded.manifest.architecture.config.get("block_size")
        context = int(size) if size is not None else None
    return _fit_context(context, wanted)


def _fit_context(context: int | None, wanted: int | None) -> int | None:
    if wanted is None or context is None:
        return context
    if wanted > context:
        raise TrainError(
            f"data.block_size {wanted} is longer than the model's context ({context} tokens)"
        )
    return wanted


def load_base(config: RunConfig) -> Base | None:
    """The pretrained model of `config.model` (a package, verified, or a Hugging Face checkpoint
    directory), or None for a model built from scratch; TrainError when it cannot be the start
    of this run."""
    if not isinstance(config.model, PretrainedConfig):
        return None
    path = Path(config.model.path)
    if is_hf_checkpoint(path):
        return _load_checkpoint_base(path, config)
    if not (path / MANIFEST).is_file():
        raise TrainError(
            f"model.path {path} is neither a shipyard package (no {MANIFEST}) nor a Hugging Face "
            f"checkpoint directory (no {HF_CONFIG}); give one of them"
        )
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
    return Base(path=path, model=loaded.model, tokenizer=loaded.tokenizer, loaded=loaded)


def _load_checkpoint_base(path: Path, config: RunConfig) -> Base:
    if config.task != LM_TASK:
        raise TrainError(
            f"model.path {path} is a Hugging Face causal language model but the run's task is "
            f"{config.task}; set task: {LM_TASK}"
        )
    try:
        ckpt = load_hf_checkpoint(path)
    except HFCheckpointError as exc:
        raise TrainError(f"model.path: {exc}") from None
    return Base(
        path=path,
        model=ckpt.model,
        tokenizer=ckpt.tokenizer,
        source_fingerprint=ckpt.fingerprint,
    )


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
    """The fingerprint of the run's base: its package's digests, or a Hugging Face checkpoint
    directory's source fingerprint (the run must start from one of them)."""
    if not isinstance(config.model, PretrainedConfig):
        raise TrainError(
            "LoRA adapters record the base they were trained on: use model: {name: pretrained, "
            "path: PACKAGE}"
        )
    path = Path(config.model.path)
    if is_hf_checkpoint(path):
        try:
            fingerprint = checkpoint_fingerprint(path)
        except HFCheckpointError as exc:
            raise TrainError(f"model.path: {exc}") from None
        name = path.resolve().name or "hf"
        return BaseRef(name=name, version="hf-checkpoint", source_fingerprint=fingerprint)
    manifest, _ = read_manifest(path)
    entry = manifest.files[WEIGHTS]
    return BaseRef(
        name=manifest.name,
        version=manifest.version,
        manifest_sha256=manifest_sha256(path),
        weights_hash=f"{entry.algorithm}:{entry.digest}",
    )
