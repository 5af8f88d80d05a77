"""Reading a Hugging Face checkpoint directory: its model, tokenizer and fingerprint.

Families: gpt2 (shipyard's GPT) and the Llama family (llama, mistral, qwen2, qwen3, phi3; one
`shipyard.models.llama.Llama` with Hugging Face parameter names, so no renaming).

A directory holds `config.json`, `generation_config.json`, the weights as `model.safetensors` or
shards listed in `model.safetensors.index.json`, `tokenizer.json` + `tokenizer_config.json`, and
the chat template (`chat_template.jinja`, or inside tokenizer_config.json). Pickled checkpoints
(`pytorch_model.bin`, `*.pt`) are refused, never unpickled. The safetensors files are
memory-mapped and their tensors assigned into a model built on the meta device: no random
initialisation and no second copy. `shipyard import-hf` (compress) and a run whose
`model.path` is such a directory (train) both read checkpoints here, so they build the same
model. Nothing here imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shipyard.data import Tokenizer
from shipyard.errors import ModelError, PackageError, ShipyardError
from shipyard.models import GPT, GPTConfig
from shipyard.models.gpt import LAYER_NORM_EPS, from_hf_gpt2_state_dict
from shipyard.models.llama import MODEL_TYPES as LLAMA_TYPES
from shipyard.models.llama import Llama, LlamaConfig, config_from_hf, llama_from_state_dict
from shipyard.package.files import MANIFEST
from shipyard.package.manifest import sha256_file

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"
MODEL_TYPES: tuple[str, ...] = ("gpt2", *LLAMA_TYPES)
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class HFCheckpointError(PackageError):
    """A Hugging Face checkpoint directory cannot be read (or is not one)."""


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a Hugging Face checkpoint directory (config.json, no shipyard manifest)."""
    p = Path(path)
    return (p / HF_CONFIG).is_file() and not (p / MANIFEST).is_file()


def read_json(file: Path, *, required: bool = True) -> dict[str, Any]:
    """A JSON object file of a checkpoint ({} when missing and not `required`)."""
    if not file.is_file():
        if required:
            raise HFCheckpointError(
                f"{file.parent}: not a Hugging Face model directory (no {file.name})"
            )
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HFCheckpointError(f"{file}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{file}: must hold a JSON object")
    return data


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (shards in index order, or the one file).

    Pickled checkpoints are refused with how to convert them; shard names must stay inside the
    directory."""
    index = path / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index}: has no weight_map; it is not a safetensors index")
        names = sorted(set(weight_map.values()))
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise HFCheckpointError(f"{index}: shard name {name!r} must be a plain file name")
            if not (path / name).is_file():
                raise HFCheckpointError(f"{index}: lists {name}, which is missing from {path}")
            files.append(path / name)
        return files
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS]
    pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickled:
        raise HFCheckpointError(
            f"{path}: {pickled[0]} is a pickled PyTorch checkpoint, which shipyard never loads "
            "(unpickling can run code). Convert it to safetensors in a trusted environment, "
            "e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) with transformers "
            "(it reads .bin files with torch.load(weights_only=True)), then import OUT"
        )
    raise HFCheckpointError(
        f"{path}: no weights ({HF_WEIGHTS} or {HF_INDEX}); save them with "
        "save_pretrained(..., safe_serialization=True)"
    )


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, memory-mapped (no copy until written to)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                    if key in tensors:
                        raise HFCheckpointError(f"{file}: tensor {key!r} is also in another shard")
                    tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise HFCheckpointError(f"{file}: cannot read weights ({exc})") from None
    return tensors


def source_fingerprint(config_file: Path, files: list[Path]) -> tuple[str, dict[str, str]]:
    """A SHA-256 over config.json and every weight file's SHA-256 (in name order), and those."""
    digests = {f.name: sha256_file(f) for f in sorted(files)}
    h = hashlib.sha256()
    h.update(b"config.json\0" + config_file.read_bytes() + b"\0")
    for name, digest in digests.items():
        h.update(f"{name}\0{digest}\0".encode())
    return "sha256:" + h.hexdigest(), digests


def read_llama_dir(path: Path, hf: dict[str, Any]) -> Llama:
    """A Llama-family model from a checkpoint directory, its weights memory-mapped and assigned
    into a meta-device model (no random init, no copy)."""
    try:
        config = config_from_hf(hf)
        model = llama_from_state_dict(config, read_tensors(weight_files(path)))
    except ModelError as exc:
        raise HFCheckpointError(f"{path}: {exc}") from None
    return model.eval()


def _model_type(path: Path, hf: dict[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFCheckpointError(
            f"{path / HF_CONFIG}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(MODEL_TYPES)}"
        )
    return str(model_type)


def read_hf_dir(path: Path, base: GPTConfig | None = None) -> tuple[GPT | Llama, dict[str, Any]]:
    """The model of a Hugging Face directory (gpt2 or a Llama family) and its config.json.

    base: for gpt2, the gpt config the directory was exported from (bias, dropout and
    vocab_size are taken from it); its sizes must agree with config.json.
    """
    hf = read_json(path / HF_CONFIG)
    if _model_type(path, hf) != "gpt2":
        return read_llama_dir(path, hf), hf
    return read_gpt2(path, hf, base), hf


def hf_model_config(path: Path) -> GPTConfig | LlamaConfig:
    """The architecture config `read_hf_dir(path)` builds, from config.json alone (no weights)."""
    hf = read_json(path / HF_CONFIG)
    if _model_type(path, hf) != "gpt2":
        try:
            return config_from_hf(hf)
        except ModelError as exc:
            raise HFCheckpointError(f"{path}: {exc}") from None
    return gpt2_config(path, hf, None)


def gpt2_config(path: Path, hf: dict[str, Any], base: GPTConfig | None) -> GPTConfig:
    """The GPT config of a gpt2 config.json (`base`: the one it was exported from, if known)."""
    config_file = path / HF_CONFIG
    n_embd = int(hf.get("n_embd", 768))
    unsupported = {
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new",)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", LAYER_NORM_EPS), (LAYER_NORM_EPS,)),
        "scale_attn_by_inverse_layer_idx": (
            hf.get("scale_attn_by_inverse_layer_idx", False),
            (False,),
        ),
        "reorder_and_upcast_attn": (hf.get("reorder_and_upcast_attn", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise HFCheckpointError(
                f"{config_file}: {key}={value!r} is not supported (need {allowed})"
            )
    try:
        sizes = {
            "n_layer": int(hf.get("n_layer", 12)),
            "n_head": int(hf.get("n_head", 12)),
            "n_embd": n_embd,
            "block_size": int(hf.get("n_positions", 1024)),
            "tie_weights": bool(hf.get("tie_word_embeddings", True)),
        }
        if base is not None:
            differ = {k: v for k, v in sizes.items() if getattr(base, k) != v}
            if differ:
                raise HFCheckpointError(f"{config_file}: {differ} disagree with shipyard.json")
            return base
        return GPTConfig(**sizes, vocab_size=int(hf["vocab_size"]), dropout=0.0, bias=True)
    except (ValueError, KeyError, ModelError) as exc:
        raise HFCheckpointError(
            f"{path}: does not describe a GPT-2 model shipyard can build ({exc})"
        ) from None


def read_gpt2(path: Path, hf: dict[str, Any], base: GPTConfig | None) -> GPT:
    """shipyard's GPT from a gpt2 checkpoint directory (see `gpt2_config` for `base`)."""
    config = gpt2_config(path, hf, base)
    try:
        state = read_tensors(weight_files(path))
        return from_hf_gpt2_state_dict(state, config, int(hf["vocab_size"]))
    except (ValueError, KeyError, ModelError) as exc:
        raise HFCheckpointError(
            f"{path}: does not describe a GPT-2 model shipyard can build ({exc})"
        ) from None


def read_tokenizer(
    src: Path, generation: dict[str, Any], hf: dict[str, Any], *, shipyard_made: bool
) -> Tokenizer | None:
    """The directory's tokenizer with its special tokens, EOS ids and chat template (None when
    it has no tokenizer.json). shipyard_made: exported from a shipyard GPT (try its own
    tokenizer format first)."""
    if not (src / HF_TOKENIZER).is_file():
        return None
    try:
        if shipyard_made:  # exported from a shipyard GPT: its own tokenizer again, if it was one
            try:
                return Tokenizer.from_json((src / HF_TOKENIZER).read_text(encoding="utf-8"))
            except ShipyardError:
                pass  # the GPT was itself imported: a Hugging Face tokenizer
        return Tokenizer.from_hf_dir(src, generation_config=generation, model_config=hf)
    except ShipyardError as exc:
        raise HFCheckpointError(f"{src / HF_TOKENIZER}: {exc}") from None


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint directory, read: what a run on it starts from."""

    path: Path
    model: GPT | Llama
    tokenizer: Tokenizer | None
    hf_config: dict[str, Any]
    fingerprint: str  # sha256 over config.json and the weight files (as import-hf records it)


def load_hf_checkpoint(path: str | os.PathLike[str]) -> HFCheckpoint:
    """Read a checkpoint directory as `shipyard import-hf` would (its shipyard.json aside): the
    model in eval mode, its tokenizer, and its source fingerprint."""
    src = Path(path)
    model, hf = read_hf_dir(src)
    model.eval()
    generation = read_json(src / HF_GENERATION_CONFIG, required=False)
    tokenizer = read_tokenizer(src, generation, hf, shipyard_made=False)
    if tokenizer is not None and tokenizer.vocab_size > model.vocab_size:
        raise HFCheckpointError(
            f"{src}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.vocab_size}"
        )
    fingerprint, _ = source_fingerprint(src / HF_CONFIG, weight_files(src))
    return HFCheckpoint(
        path=src, model=model, tokenizer=tokenizer, hf_config=hf, fingerprint=fingerprint
    )


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """The source fingerprint of a checkpoint directory (hashes its files; builds no model)."""
    src = Path(path)
    return source_fingerprint(src / HF_CONFIG, weight_files(src))[0]
