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
transformers ignores it). Nothing here imports transformers. The checkpoint readers are
`shipyard.package.hf_checkpoint`'s (a run's `model.path` may be a checkpoint directory too).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shipyard.compress.errors import ExportError
from shipyard.compress.source import Parent
from shipyard.config import RunConfig, validate_config
from shipyard.data import DataInfo, Tokenizer
from shipyard.errors import ShipyardError
from shipyard.models import GPT, GPTConfig
from shipyard.models.gpt import hf_gpt2_config_kwargs, to_hf_gpt2_state_dict
from shipyard.models.llama import Llama, hf_config_from
from shipyard.package import hf_checkpoint, write_package
from shipyard.package.hf_checkpoint import (
    HF_CHAT_TEMPLATE,
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_INDEX,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    HF_WEIGHTS,
    MODEL_TYPES,
    HFCheckpointError,
    source_fingerprint,
)

SHIPYARD_INFO = "shipyard.json"
MAX_SHARD_SIZE = 5 << 30  # bytes per safetensors file on export (transformers' classic default)
PARITY_LENGTHS = (1, 7, 16)  # prompt lengths the export parity check runs


# ------------------------------------------------------------------------------------ reading
# The readers live in shipyard.package.hf_checkpoint (a run's model.path reads checkpoints too);
# here their errors are export errors, as they always were.


@contextmanager
def _as_export_error() -> Iterator[None]:
    try:
        yield
    except HFCheckpointError as exc:
        raise ExportError(str(exc)) from None


def _read_json(file: Path, *, required: bool = True) -> dict[str, Any]:
    with _as_export_error():
        return hf_checkpoint.read_json(file, required=required)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (see `hf_checkpoint.weight_files`)."""
    with _as_export_error():
        return hf_checkpoint.weight_files(path)


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, memory-mapped (no copy until written to)."""
    with _as_export_error():
        return hf_checkpoint.read_tensors(files)


def read_hf_dir(path: Path, base: GPTConfig | None = None) -> tuple[GPT | Llama, dict[str, Any]]:
    """The model of a Hugging Face directory and its config.json (see
    `hf_checkpoint.read_hf_dir`)."""
    with _as_export_error():
        return hf_checkpoint.read_hf_dir(path, base)


def _read_tokenizer(
    src: Path, generation: dict[str, Any], hf: dict[str, Any], *, shipyard_made: bool
) -> Tokenizer | None:
    with _as_export_error():
        return hf_checkpoint.read_tokenizer(src, generation, hf, shipyard_made=shipyard_made)


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
