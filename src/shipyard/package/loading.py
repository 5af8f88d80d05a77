"""Loading packages: `load_package` → `LoadedModel`, the inference core servers batch over.

Loading never unpickles and never imports code named by the package: the architecture is rebuilt
from its registered name (`shipyard.models.build_model`), weights come from safetensors, and the
preprocessing and tokenizer from JSON. A quantized package names the layers to swap for int8 ones
(`manifest.quantization`); an exported package (`backend: onnxruntime`) holds an ONNX graph that
ONNX Runtime runs behind the same `LoadedModel` interface.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from shipyard.data import DataInfo, Preprocessor, Tokenizer
from shipyard.data.anonymize import Anonymizer
from shipyard.data.tokenization import HFTokenizerConfig
from shipyard.errors import ModelError, PackageError, ShipyardError
from shipyard.models import MODEL_NAMES, ModelConfig, build_model
from shipyard.models.lora import LoRAConfig, apply_lora
from shipyard.models.quantized import LAYER_TYPES, replace_module
from shipyard.package.hf_checkpoint import hf_model_config, is_hf_checkpoint
from shipyard.package.manifest import (
    ONNX_MODEL,
    TOKENIZER,
    TOKENIZER_CONFIG,
    WEIGHTS,
    FileEntry,
    LoRASpec,
    Manifest,
    Quantization,
    Signature,
    TensorSpec,
    check_file,
    hash_bytes,
    mismatch_error,
    read_manifest,
    verify_package,
)
from shipyard.package.onnx_runtime import OnnxRuntimeModule
from shipyard.package.security import decrypt_file, resolve_key
from shipyard.package.weights_reader import read_verified_weights

_MODEL_CONFIG: TypeAdapter[Any] = TypeAdapter(ModelConfig)


class InvalidInputError(PackageError, ValueError):
    """Inputs given to a loaded model do not fit its signature (a client error, e.g. HTTP 400)."""


def conform_input(
    spec: TensorSpec, arr: np.ndarray, *, vocab_size: int | None = None
) -> np.ndarray:
    """`arr` checked against the model's input `spec` (shape[0] is the batch) and returned in its
    shape; InvalidInputError names the input and what it needs. The one input check for the Python
    API and every serving protocol.

    A flat (N, k) feature array is accepted for an input of shape (N, ...) with k elements; token
    ids must be integers in 0..vocab_size-1; numbers must be finite.
    """
    where = f"input {spec.name!r}"
    shape = tuple(arr.shape)
    if arr.ndim == 0 or shape[0] == 0:
        raise InvalidInputError(f"{where}: the batch is empty (shape {list(shape)})")
    if not _shape_fits(spec.shape, shape):
        flat = math.prod(spec.shape[1:])
        if len(shape) == 2 and -1 not in spec.shape[1:] and shape[1] == flat:
            arr = arr.reshape(shape[0], *spec.shape[1:])
        else:
            raise InvalidInputError(
                f"{where}: shape {list(shape)} does not match the model's {spec.shape} "
                "(-1 is any size)"
            )
    if spec.datatype == "INT64":  # token ids
        if arr.dtype.kind not in "iu":
            raise InvalidInputError(f"{where} must be integer token ids, got dtype {arr.dtype}")
        if vocab_size is not None and (arr.min() < 0 or arr.max() >= vocab_size):
            raise InvalidInputError(f"{where}: token ids must be in 0..{vocab_size - 1}")
        return arr
    if arr.dtype.kind not in "fiub":
        raise InvalidInputError(f"{where} must be numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: contains NaN or infinity")
    return arr


def _shape_fits(spec: list[int], shape: tuple[int, ...]) -> bool:
    return len(spec) == len(shape) and all(d in (-1, n) for d, n in zip(spec, shape, strict=True))


@dataclass
class LoadedModel:
    """A verified package in memory: the model (eval mode) and what it needs to predict."""

    manifest: Manifest
    model: nn.Module
    preprocessor: Preprocessor | None
    tokenizer: Tokenizer | None
    path: Path
    device: torch.device
    anonymizer: Anonymizer | None = None

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def signature(self) -> Signature:
        return self.manifest.signature

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch dimension; -1 is dynamic)."""
        return tuple(self.signature.inputs[0].shape[1:])

    def predict_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs keyed by signature output name for a batch of raw inputs (N, *input_shape).

        Feature inputs are float32 (flat (N, n_features) is accepted for any input shape with as
        many elements) and go through the package's preprocessing; token inputs are int64 ids.
        classification: "probabilities" (N, C) float32 and "label" (N,) object array of names;
        regression: "values" (N, k) float32 in target units; language modeling: "logits" (N, T, V).
        """
        batch = self._to_tensor(x)
        with torch.inference_mode():
            out = self.model(batch)
        task = self.manifest.task
        if task == "classification":
            probs = torch.softmax(out.float(), dim=-1).cpu().numpy()
            names = np.asarray(self.labels or [str(i) for i in range(probs.shape[1])], dtype=object)
            return {"probabilities": probs, "label": names[probs.argmax(axis=1)]}
        if task == "regression":
            values = out.float().cpu().numpy()
            if self.preprocessor is not None:
                values = self.preprocessor.inverse_transform_target(values)
            return {"values": values}
        return {"logits": out.float().cpu().numpy()}

    def predict(self, instances: Any) -> list[dict[str, Any]]:
        """JSON-friendly predictions for a list of instances (nested lists of numbers; strings
        for token models, tokenized with the package's tokenizer; records, i.e. dicts of
        column -> value, anonymised as the training rows were)."""
        if not isinstance(instances, list | tuple | np.ndarray) or len(instances) == 0:
            raise InvalidInputError("instances must be a non-empty list")
        if isinstance(instances[0], dict):
            x: Any = self.records_to_array(instances)
        elif isinstance(instances[0], str):
            x = self.encode_texts(instances)
        else:
            x = instances
        try:
            arr = np.asarray(x, dtype=np.int64 if self._takes_tokens else np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"instances are not a rectangular array of numbers ({exc})"
            ) from None
        return self.format_predictions(self.predict_arrays(arr))

    def format_predictions(self, out: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """`predict_arrays` outputs as `predict` answers them: one JSON object per row (the
        server's :predict route answers in this format too)."""
        task = self.manifest.task
        if task == "classification":
            names = self.labels or [str(i) for i in range(out["probabilities"].shape[1])]
            return [
                {
                    "label": str(label),
                    "probabilities": dict(zip(names, map(float, row), strict=True)),
                }
                for label, row in zip(out["label"], out["probabilities"], strict=True)
            ]
        if task == "regression":
            values = out["values"]
            if values.shape[1] == 1:
                return [{"value": float(v[0])} for v in values]
            return [{"values": [float(v) for v in row]} for row in values]
        last = out["logits"][:, -1, :]
        result = []
        for row in last:
            token = int(row.argmax())
            item: dict[str, Any] = {"next_token_id": token}
            if self.tokenizer is not None:
                item["next_token"] = self.tokenizer.decode([token])
            result.append(item)
        return result

    # ------------------------------------------------------------------ input handling

    @property
    def input_columns(self) -> list[str] | None:
        """The record columns the model reads: its text column, or its feature columns."""
        text_column = (self.manifest.config.get("data") or {}).get("text_column")
        if text_column is not None and self.task != "language-modeling":
            return [str(text_column)]
        names = self.manifest.data.get("feature_names")
        return [str(n) for n in names] if names else None

    def records_to_array(self, records: Any) -> np.ndarray:
        """Raw model inputs for records (dicts of column -> value, like the training CSV/JSONL
        rows), after the package's anonymisation: token ids for a text column, else features.
        """
        columns = self.input_columns
        if columns is None:
            raise InvalidInputError(
                "this model's inputs have no column names (e.g. images); send arrays of numbers"
            )
        if not all(isinstance(r, dict) for r in records):
            raise InvalidInputError("instances mix records (objects) and other values")
        anonymizer = self.anonymizer or Anonymizer([], {})
        try:
            rows = [anonymizer.apply_record(r, columns) for r in records]
        except ShipyardError as exc:
            raise InvalidInputError(str(exc)) from None
        if self._takes_tokens:
            return self.encode_texts([str(row[columns[0]]) for row in rows])
        out = np.empty((len(rows), len(columns)), dtype=np.float32)
        for i, row in enumerate(rows):
            for j, name in enumerate(columns):
                value = row[name]
                try:
                    if isinstance(value, bool):
                        raise ValueError
                    out[i, j] = float(value)
                except (TypeError, ValueError):
                    raise InvalidInputError(
                        f"record {i}: column {name!r} must be a number, got {value!r}"
                    ) from None
        return out

    @property
    def _takes_tokens(self) -> bool:
        return self.signature.inputs[0].datatype == "INT64"

    def _to_tensor(self, x: Any) -> torch.Tensor:
        arr = conform_input(
            self.signature.inputs[0], np.asarray(x), vocab_size=self.manifest.data.get("vocab_size")
        )
        if self._takes_tokens:
            return torch.from_numpy(arr.astype(np.int64, copy=False)).to(self.device)
        arr = np.asarray(arr, dtype=np.float32)
        if self.preprocessor is not None:
            arr = self.preprocessor.transform(arr)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    def encode_texts(self, texts: Any) -> np.ndarray:
        """Token ids (N, T) for texts, tokenized as `predict` does; InvalidInputError for a
        model that takes numbers."""
        if self.tokenizer is None or not self._takes_tokens:
            raise InvalidInputError("this model takes numbers, not text")
        if self.task == "language-modeling":
            ids = [self.tokenizer.encode_array(t) for t in texts]
            if len({len(i) for i in ids}) != 1 or len(ids[0]) == 0:
                raise InvalidInputError("texts for a language model must encode to equal lengths")
            arch = self.manifest.architecture.config
            block = int(
                getattr(self.model, "max_context", 0)  # a LanguageModel; else an ONNX export
                or arch.get("block_size")
                or arch.get("max_position_embeddings")
                or len(ids[0])
            )
            return np.stack(ids)[:, -block:]
        block_size = self.input_shape[0]
        out = np.full((len(texts), block_size), self.tokenizer.pad_id, dtype=np.int64)
        for i, text in enumerate(texts):
            row = self.tokenizer.encode_array(text)[:block_size]
            out[i, : len(row)] = row
        return out


def load_package(
    path: str | os.PathLike[str],
    *,
    public_key: Any = None,
    key: Any = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Verify a package (every byte of every file against the manifest's BLAKE3 or SHA-256; the
    signature when `public_key` is given), rebuild its model and return it ready to predict.

    public_key: Ed25519 public key (PEM path/bytes); required signature when given.
    key: decryption key for an encrypted package (bytes, hex/base64 text or a key-file path);
        default $SHIPYARD_PACKAGE_KEY.
    """
    root = Path(path)
    manifest = verify_package(root, public_key=public_key, skip=frozenset({WEIGHTS, ONNX_MODEL}))
    encryption = manifest.encryption
    raw_key = resolve_key(key) if encryption is not None else None
    if encryption is not None and raw_key is None:
        raise PackageError(
            f"{root}: package is encrypted; set SHIPYARD_PACKAGE_KEY or pass --key-file"
        )
    info = _data_info(manifest, root)
    if manifest.backend == "onnxruntime":
        model = _load_onnx(root, manifest, raw_key)
    else:
        model = _load_torch(root, manifest, info, raw_key)
    tokenizer = None
    if TOKENIZER in manifest.files:
        if encryption is not None and TOKENIZER in encryption.files:
            text = decrypt_file(root, TOKENIZER, encryption, raw_key).decode("utf-8")
        else:
            text = (root / TOKENIZER).read_text(encoding="utf-8")
        try:
            tokenizer = Tokenizer.from_json(text, _hf_tokenizer_config(root, manifest))
        except ShipyardError as exc:
            raise PackageError(f"{root / TOKENIZER}: {exc}") from None
    preprocessor = None
    if manifest.preprocessing is not None:
        try:
            preprocessor = Preprocessor.from_dict(manifest.preprocessing)
        except (ShipyardError, KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{root}/manifest.json: bad preprocessing section ({exc})") from None
    dev = torch.device(device)
    model = model.to(dev).eval()
    loaded = LoadedModel(
        manifest=manifest,
        model=model,
        preprocessor=preprocessor,
        tokenizer=tokenizer,
        path=root,
        device=dev,
        anonymizer=_anonymizer(manifest, root),
    )
    if loaded.anonymizer is not None:
        # a salt the model's inputs need must be present and right before any request comes
        for column in loaded.input_columns or []:
            if column in loaded.anonymizer.text_columns and any(
                r.column == column and r.method == "hash" for r in loaded.anonymizer.rules
            ):
                try:
                    loaded.anonymizer.apply_value(column, "", "salt check")
                except ShipyardError as exc:
                    raise PackageError(f"{root}: {exc}") from None
    return loaded


def _anonymizer(manifest: Manifest, root: Path) -> Anonymizer | None:
    described = manifest.data.get("anonymize")
    if not described:
        return None
    try:
        return Anonymizer.from_description(described)
    except (ValidationError, TypeError, ValueError) as exc:
        raise PackageError(f"{root}/manifest.json: bad data.anonymize section ({exc})") from None


def _hf_tokenizer_config(root: Path, manifest: Manifest) -> HFTokenizerConfig | None:
    """An imported Hugging Face tokenizer's config (tokenizer_config.json), if any."""
    if TOKENIZER_CONFIG not in manifest.files:
        return None
    try:
        data = json.loads((root / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return HFTokenizerConfig.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError, ShipyardError) as exc:
        raise PackageError(f"{root / TOKENIZER_CONFIG}: cannot read ({exc})") from None


def _load_torch(root: Path, manifest: Manifest, info: DataInfo, raw_key: bytes | None) -> nn.Module:
    """Rebuild the architecture by name (int8 layers swapped in where the manifest says) and
    load its safetensors weights, hashing them while reading.

    BLAKE3 weights (new packages) are read once, straight into the model's tensors, and hashed
    as they arrive (`read_verified_weights`); SHA-256 weights (older packages) are hashed per
    chunk on other threads while safetensors loads them.
    """
    encryption = manifest.encryption
    encrypted_weights = encryption is not None and WEIGHTS in encryption.files
    entry = manifest.files[WEIGHTS]
    read_once = not encrypted_weights and entry.algorithm == "blake3" and sys.byteorder == "little"
    # verify SHA-256 weights on other threads (hashlib drops the GIL) while we build and read
    verifier = None
    if not encrypted_weights and not read_once:
        verifier = _Verifier(root, WEIGHTS, entry)
    model = build_empty_model(manifest.architecture.config, info, manifest.architecture.name)
    if manifest.quantization is not None:
        swap_quantized_layers(model, manifest.quantization, where=f"{root}/manifest.json")
    if manifest.lora is not None:
        swap_lora_layers(model, manifest.lora, where=f"{root}/manifest.json")
    if read_once:
        targets = model.state_dict(keep_vars=True)
        tensors = read_verified_weights(root / WEIGHTS, entry, targets)
    elif encryption is not None and encrypted_weights:
        check_file(root, WEIGHTS, manifest.files[WEIGHTS])
        data = decrypt_file(root, WEIGHTS, encryption, raw_key)
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as exc:  # safetensors raises several types for a bad header
            raise PackageError(f"{root / WEIGHTS}: cannot read weights ({exc})") from None
        del data
    else:
        assert verifier is not None
        tensors = _load_and_hash(root, manifest, verifier)
    _assign_state(model, tensors, root / WEIGHTS)
    return model


def _load_onnx(root: Path, manifest: Manifest, raw_key: bytes | None) -> nn.Module:
    """Read model.onnx into memory, check its hash, and give it to ONNX Runtime from there (so
    what runs is exactly what was hashed)."""
    encryption = manifest.encryption
    entry = manifest.files[ONNX_MODEL]
    if encryption is not None and ONNX_MODEL in encryption.files:
        check_file(root, ONNX_MODEL, entry)
        data = decrypt_file(root, ONNX_MODEL, encryption, raw_key)
    else:
        file = root / ONNX_MODEL
        data = file.read_bytes()
        if len(data) != entry.size or hash_bytes(data, entry.algorithm) != entry.digest:
            raise mismatch_error(file, entry.algorithm)
    return OnnxRuntimeModule(data, manifest.signature, where=str(root / ONNX_MODEL))


def swap_quantized_layers(model: nn.Module, spec: Quantization, *, where: str) -> None:
    """Swap the Linear layers `spec` lists for empty int8 layers (for loading a package)."""
    kind = LAYER_TYPES[spec.scheme]
    for name in spec.layers:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise PackageError(
                f"{where}: quantization lists {name!r}, not a layer of the model"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise PackageError(
                f"{where}: quantization lists {name!r}, a {type(linear).__name__}, not a Linear"
            )
        replace_module(
            model, name, kind(linear.in_features, linear.out_features, linear.bias is not None)
        )


def swap_lora_layers(model: nn.Module, spec: LoRASpec, *, where: str) -> None:
    """Put empty LoRA layers where `spec` lists them (for loading an unmerged adapter package)."""
    try:
        apply_lora(model, LoRAConfig(rank=spec.rank, alpha=spec.alpha, targets=spec.layers))
    except (ModelError, ValueError) as exc:
        raise PackageError(f"{where}: lora does not fit the model ({exc})") from None


def pretrained_architecture(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(architecture name, config dict) of the package or Hugging Face checkpoint directory a
    `model: {name: pretrained}` points at."""
    if is_hf_checkpoint(path):
        config = hf_model_config(Path(path))
        return config.name, config.model_dump(mode="json")
    manifest, _ = read_manifest(path)
    if manifest.lora is not None:
        raise PackageError(
            f"{path}: holds an unmerged LoRA adapter; start from its base package, or merge it "
            "first (finetune.merge: true)"
        )
    return manifest.architecture.name, manifest.architecture.config


def build_empty_model(config: Any, info: DataInfo, name: str | None = None) -> nn.Module:
    """Build a model to load weights into, skipping random initialisation where that is safe.

    config: a model config object or its dict (validated by registered name; no code is imported).
    The model is built on the meta device and given uninitialised CPU storage (shared parameters
    stay shared); a model with non-persistent buffers, which no weights file restores, is built
    normally instead.
    """
    if getattr(config, "name", None) == "pretrained":
        name, config = pretrained_architecture(config.path)
    if isinstance(config, dict):
        if name is not None and config.get("name") != name:
            raise PackageError(
                f"manifest.json: architecture.name {name!r} does not match its config's name "
                f"{config.get('name')!r}"
            )
        if config.get("name") not in MODEL_NAMES:
            raise PackageError(
                f"manifest.json: unknown architecture {config.get('name')!r}; this shipyard "
                f"knows {', '.join(MODEL_NAMES)} (a newer shipyard may be needed)"
            )
        try:
            config = _MODEL_CONFIG.validate_python(config)
        except ValidationError as exc:
            raise PackageError(
                f"manifest.json: bad architecture config ({exc.errors()[0]['msg']})"
            ) from None
    shape, outputs, vocab = tuple(info.input_shape), info.num_outputs, info.vocab_size
    try:
        with torch.device("meta"):
            model = build_model(config, input_shape=shape, num_outputs=outputs, vocab_size=vocab)
        persistent = set(model.state_dict())
        if all(n in persistent for n, _ in model.named_buffers()):
            return _materialize(model)
        return build_model(config, input_shape=shape, num_outputs=outputs, vocab_size=vocab)
    except ShipyardError as exc:
        raise PackageError(f"manifest.json: cannot build the model ({exc})") from None


def _materialize(model: nn.Module) -> nn.Module:
    """Give a meta-device model empty CPU tensors, keeping shared (tied) tensors shared."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is None:
                    continue
                if id(value) not in memo:
                    new = torch.empty_like(value, device="cpu")
                    if isinstance(value, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=value.requires_grad)
                    memo[id(value)] = new
                store[key] = memo[id(value)]  # type: ignore[assignment]
    return model


def _assign_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy loaded tensors into `model`'s own (freshly allocated, aligned) storage, strictly.

    A copy, not `assign=True`: BLAS results can depend on memory alignment, and predictions must
    be bitwise identical to the in-process model's. A state-dict name may be absent only when it
    shares its tensor with a present one (tied weights are stored once in safetensors).
    """
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, value in state.items():
        groups.setdefault(id(value), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in tensors for n in names)]
    unexpected = sorted(set(tensors) - set(state))
    bad = [k for k in tensors if k in state and tensors[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise PackageError(
            f"{where}: weights do not fit the model (missing: {sorted(missing)[:5]}, "
            f"unexpected: {unexpected[:5]}, wrong shape: {bad[:5]})"
        )
    model.load_state_dict(tensors, strict=False)


def _data_info(manifest: Manifest, root: Path) -> DataInfo:
    try:
        return DataInfo.from_dict(manifest.data)
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{root}/manifest.json: bad data section ({exc})") from None


class _Verifier:
    """Checks a package file against its manifest entry on a background thread (on every core
    for a chunk-hashed file) while the caller reads it; `result()` waits and raises any error."""

    def __init__(self, root: Path, name: str, entry: FileEntry) -> None:
        self._error: PackageError | None = None
        self._args = (root, name, entry)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            check_file(*self._args)
        except PackageError as exc:
            self._error = exc
        except OSError as exc:
            self._error = PackageError(f"{self._args[0] / self._args[1]}: cannot read ({exc})")

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _load_and_hash(root: Path, manifest: Manifest, verifier: _Verifier) -> dict[str, torch.Tensor]:
    """Read the weights while `verifier` checks the same file; return them only if it passes,
    so verification costs little extra wall time on a machine with spare cores."""
    file = root / WEIGHTS
    error: Exception | None = None
    tensors: dict[str, torch.Tensor] = {}
    try:
        tensors = load_safetensors_file(str(file))
    except Exception as exc:  # safetensors raises several types for a bad header
        error = exc
    verifier.result()
    if error is not None:
        raise PackageError(f"{file}: cannot read weights ({error})") from None
    return tensors


__all__ = ["InvalidInputError", "LoadedModel", "build_empty_model", "load_package"]
