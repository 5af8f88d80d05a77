"""Hugging Face interop: checkpoint directories in (`import_hf`) and out (`export_hf`).

Families: gpt2 (shipyard's GPT) and the Llama family (llama, mistral, qwen2, qwen3, phi3; one
`shipyard.models.llama.Llama` with Hugging Face parameter names, so no renaming either way).

A directory holds `config.json`, `generation_config.json`, the weights as `model.safetensors` or
shards listed in `model.safetensors.index.json`, `tokenizer.json` + `tokenizer_config.json`, and
the chat template (`chat_template.jinja`, or inside tokenizer_config.json). Pickled checkpoints
(`pytorch_model.bin`, `*.pt`) are refused, never unpickled. Import memory-maps the safetensors
files and assigns the tensors into a model built on the meta device: no random initialisation and
no second copy, so importing needs about the weights' size in RAM. Export also writes
`shipyard.json` (the package's run config and data description, which `import_hf` restores;
transformers ignores it). Nothing here imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shipyard.compress.errors import ExportError
from shipyard.compress.source import Parent
from shipyard.config import RunConfig, validate_config
from shipyard.data import DataInfo, Tokenizer
from shipyard.errors import ModelError, ShipyardError
from shipyard.models import GPT, GPTConfig
from shipyard.models.gpt import (
    LAYER_NORM_EPS,
    from_hf_gpt2_state_dict,
    hf_gpt2_config_kwargs,
    to_hf_gpt2_state_dict,
)
from shipyard.models.llama import MODEL_TYPES as LLAMA_TYPES
from shipyard.models.llama import Llama, config_from_hf, hf_config_from, llama_from_state_dict
from shipyard.package import write_package
from shipyard.package.manifest import sha256_file

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"
SHIPYARD_INFO = "shipyard.json"
MODEL_TYPES: tuple[str, ...] = ("gpt2", *LLAMA_TYPES)
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
MAX_SHARD_SIZE = 5 << 30  # bytes per safetensors file on export (transformers' classic default)
PARITY_LENGTHS = (1, 7, 16)  # prompt lengths the export parity check runs


# ------------------------------------------------------------------------------------ reading


def _read_json(file: Path, *, required: bool = True) -> dict[str, Any]:
    if not file.is_file():
        if required:
            raise ExportError(f"{file.parent}: not a Hugging Face model directory (no {file.name})")
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{file}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{file}: must hold a JSON object")
    return data


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (shards in index order, or the one file).

    Pickled checkpoints are refused with how to convert them; shard names must stay inside the
    directory."""
    index = path / HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{index}: has no weight_map; it is not a safetensors index")
        names = sorted(set(weight_map.values()))
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise ExportError(f"{index}: shard name {name!r} must be a plain file name")
            if not (path / name).is_file():
                raise ExportError(f"{index}: lists {name}, which is missing from {path}")
            files.append(path / name)
        return files
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS]
    pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickled:
        raise ExportError(
            f"{path}: {pickled[0]} is a pickled PyTorch checkpoint, which shipyard never loads "
            "(unpickling can run code). Convert it to safetensors in a trusted environment, "
            "e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) with transformers "
            "(it reads .bin files with torch.load(weights_only=True)), then import OUT"
        )
    raise ExportError(
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
                        raise ExportError(f"{file}: tensor {key!r} is also in another shard")
                    tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"{file}: cannot read weights ({exc})") from None
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
        raise ExportError(f"{path}: {exc}") from None
    return model.eval()


def read_hf_dir(path: Path, base: GPTConfig | None = None) -> tuple[GPT | Llama, dict[str, Any]]:
    """The model of a Hugging Face directory (gpt2 or a Llama family) and its config.json.

    base: for gpt2, the gpt config the directory was exported from (bias, dropout and
    vocab_size are taken from it); its sizes must agree with config.json.
    """
    hf = _read_json(path / HF_CONFIG)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ExportError(
            f"{path / HF_CONFIG}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(MODEL_TYPES)}"
        )
    if model_type != "gpt2":
        return read_llama_dir(path, hf), hf
    return _read_gpt2(path, hf, base), hf


def _read_gpt2(path: Path, hf: dict[str, Any], base: GPTConfig | None) -> GPT:
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
            raise ExportError(f"{config_file}: {key}={value!r} is not supported (need {allowed})")
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
                raise ExportError(f"{config_file}: {differ} disagree with {SHIPYARD_INFO}")
            config = base
        else:
            config = GPTConfig(**sizes, vocab_size=int(hf["vocab_size"]), dropout=0.0, bias=True)
        state = read_tensors(weight_files(path))
        return from_hf_gpt2_state_dict(state, config, int(hf["vocab_size"]))
    except (ValueError, KeyError, ModelError) as exc:
        raise ExportError(
            f"{path}: does not describe a GPT-2 model shipyard can build ({exc})"
        ) from None


# ------------------------------------------------------------------------------------ import


def import_hf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
) -> Path:
    """Import a Hugging Face checkpoint directory as a shipyard package; return its path.

    The package keeps the checkpoint's tokenizer as it is (plus its special tokens, EOS ids and
    chat template) and records the source's fingerprint (config.json + weights) in its lineage.
    A directory written by `export(..., format="hf")` gets its original name, version and parent
    back (and, for GPT, its run config and data description).
    """
    src = Path(path)
    if not src.is_dir():
        raise ExportError(f"{src}: not a directory; give a Hugging Face model directory")
    info_file = src / SHIPYARD_INFO
    saved: dict[str, Any] = {}
    base: RunConfig | None = None
    if info_file.is_file():
        try:
            saved = json.loads(info_file.read_text(encoding="utf-8"))
            base = validate_config(saved["config"], where=str(info_file))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ShipyardError) as exc:
            raise ExportError(f"{info_file}: cannot read ({exc})") from None
    base_gpt = base.model if base is not None and isinstance(base.model, GPTConfig) else None
    model, hf = read_hf_dir(src, base_gpt)
    model.eval()
    generation = _read_json(src / HF_GENERATION_CONFIG, required=False)
    tokenizer = _read_tokenizer(src, generation, hf, shipyard_made=base_gpt is not None)
    vocab = model.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ExportError(
            f"{src}: tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}"
        )
    if base is not None and (base_gpt is not None or base.model == model.config):
        config = base  # exported by shipyard: the package's own run config again
    else:
        config = _run_config(model, tokenizer, src)
    fingerprint, digests = source_fingerprint(src / HF_CONFIG, weight_files(src))
    info = _data_info(saved, model, fingerprint)
    lineage: dict[str, Any] = {
        "imported_from": str(src.resolve()),
        "source_fingerprint": fingerprint,
        "source_files": digests,
    }
    if HF_WEIGHTS in digests:
        lineage["hf_weights_sha256"] = digests[HF_WEIGHTS]
    return write_package(
        out,
        model=model,
        config=config,
        data_info=info,
        preprocessor=None,
        tokenizer=tokenizer,
        metrics={},
        name=name or saved.get("name") or config.name,
        version=version or (f"{saved['version']}-hf" if "version" in saved else "hf-import"),
        lineage_extra=lineage,
        derivation={"method": "import-hf", "params": {"model_type": hf.get("model_type")}},
        parent=saved.get("parent"),
    )


def _read_tokenizer(
    src: Path, generation: dict[str, Any], hf: dict[str, Any], *, shipyard_made: bool
) -> Tokenizer | None:
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
        raise ExportError(f"{src / HF_TOKENIZER}: {exc}") from None


def _run_config(model: GPT | Llama, tokenizer: Tokenizer | None, src: Path) -> RunConfig:
    """A run config for a model trained elsewhere: the architecture, and the directory as data."""
    arch = model.config
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in src.resolve().name) or "hf"
    tok = (
        {"kind": "byte"}
        if tokenizer is None or tokenizer.vocab_size <= 260
        else {"kind": "bpe", "vocab_size": tokenizer.vocab_size}
    )
    raw = {
        "name": name.lstrip("._-") or "hf",
        "task": "language-modeling",
        "data": {"source": str(src.resolve()), "format": "text", "tokenizer": tok},
        "model": arch.model_dump(mode="json"),
    }
    return validate_config(raw, where=str(src / HF_CONFIG))


def _data_info(saved: dict[str, Any], model: GPT | Llama, fingerprint: str) -> DataInfo:
    if "data" in saved and isinstance(model, GPT):
        return DataInfo.from_dict(saved["data"])
    vocab, block = model.vocab_size, model.max_context
    return DataInfo(
        task="language-modeling",
        input_shape=(block,),
        num_outputs=vocab,
        class_names=None,
        feature_names=None,
        vocab_size=vocab,
        split_sizes={},
        fingerprint="hf:" + fingerprint,
    )


# ------------------------------------------------------------------------------------ export


def export_hf(
    parent: Parent,
    target: Path,
    *,
    tolerance: float,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> tuple[Path, dict[str, Any]]:
    """Write `parent` (a gpt or Llama-family package) as a Hugging Face directory that
    `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load; check that the written files
    rebuild the same model (logits within `tolerance` on prompts of several lengths).

    max_shard_size: bytes per safetensors file; larger models are sharded with an index.
    """
    model = parent.loaded.model
    if not isinstance(model, GPT | Llama):
        raise ExportError(
            f"--format hf exports language models (gpt, llama); "
            f"{parent.loaded.manifest.architecture.name!r} is neither: use --format onnx"
        )
    if max_shard_size <= 0:
        raise ExportError(f"max_shard_size must be positive, got {max_shard_size}")
    if target.exists() and any(target.iterdir()) and not (target / SHIPYARD_INFO).is_file():
        raise ExportError(f"{target}: exists and is not empty; choose another output")
    if target.exists():
        shutil.rmtree(target)  # a previous export: no stale shards
    target.mkdir(parents=True)
    tok = parent.loaded.tokenizer
    try:
        if isinstance(model, GPT):
            hf_config, state = _gpt2_files(model, tok)
        else:
            hf_config, state = _llama_files(model, tok)
        _save_weights(state, target, max_shard_size)
        del state
        _write_json(target / HF_CONFIG, hf_config)
        _write_json(target / HF_GENERATION_CONFIG, _generation_config(hf_config, tok))
        if tok is not None:
            _write_tokenizer(tok, target, model)
        m = parent.loaded.manifest
        info = {
            "name": m.name,
            "version": m.version,
            "config": m.config,
            "data": m.data,
            "parent": parent.ref.model_dump(),
        }
        _write_json(target / SHIPYARD_INFO, info)
        report = _parity(model, target, tolerance)
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target, report


def _gpt2_files(
    model: GPT, tok: Tokenizer | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = model.config
    hf_config: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **hf_gpt2_config_kwargs(cfg, model.vocab_size),
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    if tok is not None:
        bos = tok.bos_id if tok.bos_id is not None else tok.eos_id  # GPT-2: BOS is EOS
        hf_config["bos_token_id"], hf_config["eos_token_id"] = bos, tok.eos_id
        hf_config["pad_token_id"] = tok.pad_id
    state = to_hf_gpt2_state_dict(model)
    if cfg.tie_weights:
        state.pop("lm_head.weight")  # transformers re-ties it to transformer.wte.weight
    return hf_config, state


def _llama_files(
    model: Llama, tok: Tokenizer | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = model.config
    hf_config = hf_config_from(cfg, model.vocab_size)
    if tok is not None:
        hf_config["bos_token_id"] = tok.bos_id
        eos = list(tok.eos_ids)
        hf_config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if tok.hf is not None and "pad_token" in tok.hf.special_tokens:
            hf_config["pad_token_id"] = tok.pad_id
    dtype = getattr(torch, cfg.dtype) if cfg.dtype is not None else None
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # transformers ties it to model.embed_tokens.weight
        t = value.detach()
        state[key] = (t.to(dtype) if dtype is not None else t).contiguous()
    if dtype is None:
        hf_config["dtype"] = hf_config["torch_dtype"] = str(
            next(iter(state.values())).dtype
        ).removeprefix("torch.")
    return hf_config, state


def _save_weights(state: dict[str, torch.Tensor], target: Path, max_shard_size: int) -> None:
    """model.safetensors, or shards of at most `max_shard_size` bytes plus their index."""
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    total = sum(sizes.values())
    meta = {"format": "pt"}
    if total <= max_shard_size:
        save_file(state, str(target / HF_WEIGHTS), metadata=meta)
        return
    shards: list[list[str]] = [[]]
    used = 0
    for key in state:  # keep the model's order: a layer's tensors stay together
        if shards[-1] and used + sizes[key] > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(target / name), metadata=meta)
        weight_map.update(dict.fromkeys(keys, name))
    _write_json(target / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _generation_config(hf_config: dict[str, Any], tok: Tokenizer | None) -> dict[str, Any]:
    if tok is not None and tok.hf is not None and tok.hf.generation_config:
        return dict(tok.hf.generation_config)
    return {
        k: hf_config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if hf_config.get(k) is not None
    }


def _write_tokenizer(tok: Tokenizer, target: Path, model: GPT | Llama) -> None:
    (target / HF_TOKENIZER).write_text(tok.to_json(), encoding="utf-8")
    block = model.max_context
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.hf is None:  # shipyard's own tokenizer: <|endoftext|> is BOS and EOS (as GPT-2)
        eos = tok.decode([tok.eos_id], skip_special_tokens=False)
        pad = tok.decode([tok.pad_id], skip_special_tokens=False)
        config.update(bos_token=eos, eos_token=eos, pad_token=pad, model_max_length=block)
    else:
        config.update(tok.hf.special_tokens)
        for key in ("add_bos_token", "add_eos_token"):
            value = getattr(tok.hf, key)
            if value is not None:
                config[key] = value
        config["model_max_length"] = tok.hf.model_max_length or block
        if tok.hf.chat_template is not None:
            (target / HF_CHAT_TEMPLATE).write_text(tok.hf.chat_template, encoding="utf-8")
    _write_json(target / HF_TOKENIZER_CONFIG, config)


def _parity(model: GPT | Llama, target: Path, tolerance: float) -> dict[str, Any]:
    """Rebuild the model from the written files alone; compare logits on seeded prompts."""
    rebuilt, _ = read_hf_dir(target)
    rebuilt = rebuilt.float()  # a bf16 export holds the package's bf16 values; compare in fp32
    vocab, block = model.vocab_size, model.max_context
    gen = torch.Generator().manual_seed(0)
    diff, rows = 0.0, 0
    with torch.inference_mode():
        for length in PARITY_LENGTHS:
            x = torch.randint(0, vocab, (2, min(length, block)), generator=gen)
            want, got = model(x).float(), rebuilt(x).float()
            diff = max(diff, float((want - got).abs().max()))
            rows += len(x)
    report = {"rows": rows, "max_abs_diff": diff, "tolerance": tolerance}
    if not diff <= tolerance:
        raise ExportError(
            f"parity check failed: logits differ by {diff:.3g} (tolerance {tolerance:g}); "
            "the export was removed"
        )
    return report


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = [
    "MODEL_TYPES",
    "export_hf",
    "import_hf",
    "read_hf_dir",
    "read_tensors",
    "source_fingerprint",
    "weight_files",
]
