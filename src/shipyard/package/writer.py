"""Writing packages: `write_package` from objects in memory (a run directory is packaged by
`shipyard.train.package_run`, which owns the run directory's layout)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from shipyard import __version__
from shipyard.config import RunConfig, config_sha256
from shipyard.data import DataInfo, Preprocessor, Tokenizer
from shipyard.errors import PackageError
from shipyard.models import TOKEN_MODELS
from shipyard.package.loading import pretrained_architecture
from shipyard.package.manifest import (
    DEFAULT_HASH,
    MANIFEST,
    ONNX_MODEL,
    TOKENIZER,
    TOKENIZER_CONFIG,
    WEIGHTS,
    Architecture,
    Derivation,
    HashAlgorithm,
    Lineage,
    LoRASpec,
    Manifest,
    ParentRef,
    Quantization,
    Signature,
    TensorSpec,
    hash_file,
    manifest_sha256,
    staged_package,
    verify_package,
)


def build_signature(task: str, info: DataInfo, architecture: str) -> Signature:
    """The input/output tensors a server exposes for a model of `task` trained on `info`."""
    if task == "language-modeling":
        vocab = info.vocab_size if info.vocab_size is not None else info.num_outputs
        return Signature(
            inputs=[TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1])],
            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, -1, vocab])],
        )
    if architecture in TOKEN_MODELS:
        inputs = [TensorSpec(name="input_ids", datatype="INT64", shape=[-1, *info.input_shape])]
    else:
        inputs = [TensorSpec(name="input", datatype="FP32", shape=[-1, *info.input_shape])]
    if task == "classification":
        outputs = [
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, info.num_outputs]),
            TensorSpec(name="label", datatype="BYTES", shape=[-1]),
        ]
    else:
        outputs = [TensorSpec(name="values", datatype="FP32", shape=[-1, info.num_outputs])]
    return Signature(inputs=inputs, outputs=outputs)


def write_package(
    out_dir: str | os.PathLike[str],
    *,
    model: nn.Module | None,
    config: RunConfig,
    data_info: DataInfo,
    preprocessor: Preprocessor | None,
    tokenizer: Tokenizer | None,
    metrics: Mapping[str, Mapping[str, Any]],
    name: str | None = None,
    version: str | None = None,
    lineage_extra: Mapping[str, Any] | None = None,
    derivation: Derivation | Mapping[str, Any] | None = None,
    parent: ParentRef | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    quantization: Quantization | Mapping[str, Any] | None = None,
    lora: LoRASpec | Mapping[str, Any] | None = None,
    onnx_model: bytes | None = None,
    hash_algorithm: HashAlgorithm = DEFAULT_HASH,
) -> Path:
    """Write a package directory for `model` and return its path.

    The directory is written beside `out_dir` under a temporary name, verified, then renamed into
    place; an existing package at `out_dir` is replaced, any other non-empty directory refused.
    metrics: {"val": {...}, "test": {...}}; non-numeric entries (confusion matrices) are dropped.
    name: default `config.name`. version: default the run directory's name from
    `lineage_extra["run_dir"]`, else a UTC timestamp.
    lineage_extra: more lineage keys, e.g. {"run_dir": ..., "checkpoint_step": 120}.
    derivation: {"method": ..., "params": {...}} for a package derived from `parent`.
    parent: the parent package's directory, or {"name", "version", "manifest_sha256"}.
    quantization: which of `model`'s layers are int8 modules (`shipyard.compress`), so loading
        can swap them in before reading the tensors.
    onnx_model: an ONNX graph (bytes) to store as model.onnx instead of `model`'s weights; the
        package's backend is then "onnxruntime" (`model` must be None).
    hash_algorithm: "blake3" (default; fast verification on every core) or "sha256" (the
        format-1 manifest that shipyard versions before BLAKE3 can read).
    """
    if (model is None) == (onnx_model is None):
        raise PackageError("write_package needs exactly one of model or onnx_model")
    if onnx_model is not None and quantization is not None:
        raise PackageError("quantization describes torch layers; it cannot go with onnx_model")
    out = Path(out_dir)
    extra = dict(lineage_extra or {})
    if version is None:
        run_dir = extra.get("run_dir")
        version = Path(run_dir).name if run_dir else datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    arch: str = config.model.name
    arch_config = config.model.model_dump(mode="json")
    if arch == "pretrained":  # a fine-tuned model has its base's architecture
        arch, arch_config = pretrained_architecture(arch_config["path"])
    lineage = Lineage(
        config_sha256=config_sha256(config),
        data_fingerprint=data_info.fingerprint,
        git_commit=_git_commit(),
        parent=_parent_ref(parent),
        shipyard_version=__version__,
        torch_version=torch.__version__,
        **extra,
    )
    labels = list(data_info.class_names) if data_info.class_names is not None else None
    with staged_package(out, replace=True) as tmp:
        if onnx_model is not None:
            (tmp / ONNX_MODEL).write_bytes(onnx_model)
            files = {ONNX_MODEL: hash_file(tmp / ONNX_MODEL, algorithm=hash_algorithm)}
        else:
            assert model is not None
            save_model(model, str(tmp / WEIGHTS))
            files = {WEIGHTS: hash_file(tmp / WEIGHTS, algorithm=hash_algorithm)}
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer.to_json(), encoding="utf-8")
            files[TOKENIZER] = hash_file(tmp / TOKENIZER, algorithm=hash_algorithm)
            tok_config = tokenizer.config_json()
            if tok_config is not None:
                (tmp / TOKENIZER_CONFIG).write_text(tok_config, encoding="utf-8")
                files[TOKENIZER_CONFIG] = hash_file(
                    tmp / TOKENIZER_CONFIG, algorithm=hash_algorithm
                )
        manifest = Manifest(
            name=name or config.name,
            version=version,
            task=config.task,
            created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            architecture=Architecture(name=arch, config=arch_config),
            signature=build_signature(config.task, data_info, arch),
            data=data_info.to_dict(),
            preprocessing=preprocessor.to_dict() if preprocessor is not None else None,
            labels=labels,
            metrics=_scalar_metrics(metrics),
            lineage=lineage,
            config=config.model_dump(mode="json"),
            derivation=Derivation.model_validate(derivation) if derivation is not None else None,
            backend="onnxruntime" if onnx_model is not None else "torch",
            lora=LoRASpec.model_validate(lora) if lora is not None else None,
            quantization=(
                Quantization.model_validate(quantization) if quantization is not None else None
            ),
            files=files,
        )
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        for file in tmp.iterdir():
            _fsync(file)
    return out


def _scalar_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        split: {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for split, values in metrics.items()
    }


def _parent_ref(
    parent: ParentRef | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> ParentRef | None:
    if parent is None or isinstance(parent, ParentRef):
        return parent
    if isinstance(parent, Mapping):
        return ParentRef.model_validate(parent)
    manifest = verify_package(parent)
    return ParentRef(
        name=manifest.name, version=manifest.version, manifest_sha256=manifest_sha256(parent)
    )


def _git_commit() -> str | None:
    """HEAD of the git repository in the working directory, if any; never fails."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) in (40, 64) else None


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())
