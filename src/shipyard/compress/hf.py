"""Hugging Face GPT-2 interop: a GPT package as a `transformers`-loadable directory, and back.

The directory holds `config.json` (a `GPT2Config`), `model.safetensors` (HF names and Conv1D
layout; no pickle), `tokenizer.json` + `tokenizer_config.json` (the package's own `tokenizers`
tokenizer, byte-level or BPE) and `shipyard.json` (the package's run config and data description,
which `import_hf` restores; transformers ignores it). Nothing here imports transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shipyard.compress.errors import ExportError
from shipyard.compress.source import Parent, split_tensors
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
from shipyard.package import manifest_sha256, write_package
from shipyard.package.manifest import sha256_file

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
SHIPYARD_INFO = "shipyard.json"


def export_hf(parent: Parent, target: Path, *, tolerance: float) -> tuple[Path, dict[str, Any]]:
    """Write `parent` (a gpt package) as a Hugging Face GPT-2 directory; check that the files
    rebuild the same model (logits within `tolerance` on test rows)."""
    model = parent.loaded.model
    if not isinstance(model, GPT):
        raise ExportError(
            f"--format hf exports gpt language models (GPT-2 layout), not "
            f"{parent.loaded.manifest.architecture.name!r}; use --format onnx"
        )
    if target.exists() and any(target.iterdir()) and not (target / SHIPYARD_INFO).is_file():
        raise ExportError(f"{target}: exists and is not empty; choose another output")
    target.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **hf_gpt2_config_kwargs(cfg, model.vocab_size),
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    tok = parent.loaded.tokenizer
    if tok is not None:
        hf_config["eos_token_id"] = hf_config["bos_token_id"] = tok.eos_id
        hf_config["pad_token_id"] = tok.pad_id
    state = to_hf_gpt2_state_dict(model)
    if cfg.tie_weights:
        state.pop("lm_head.weight")  # transformers re-ties it to transformer.wte.weight
    save_file(state, str(target / HF_WEIGHTS), metadata={"format": "pt"})
    (target / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    if tok is not None:
        (target / HF_TOKENIZER).write_text(tok.to_json(), encoding="utf-8")
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.block_size,
            "eos_token": tok.decode([tok.eos_id], skip_special_tokens=False) or None,
            "pad_token": tok.decode([tok.pad_id], skip_special_tokens=False) or None,
        }
        (target / HF_TOKENIZER_CONFIG).write_text(
            json.dumps(tok_config, indent=2) + "\n", encoding="utf-8"
        )
    m = parent.loaded.manifest
    info = {
        "name": m.name,
        "version": m.version,
        "config": m.config,
        "data": m.data,
        "parent": parent.ref.model_dump(),
    }
    (target / SHIPYARD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # parity: rebuild from the written files alone, compare logits on test rows
    rebuilt, _ = read_hf_dir(target)
    x, _ = split_tensors(parent.data, "test", limit=64)
    with torch.inference_mode():
        want, got = model(x), rebuilt(x)
    diff = float((want - got).abs().max())
    report = {"rows": len(x), "max_abs_diff": diff, "tolerance": tolerance}
    if not diff <= tolerance:
        shutil.rmtree(target, ignore_errors=True)
        raise ExportError(
            f"parity check failed: logits differ by {diff:.3g} (tolerance {tolerance:g})"
        )
    return target, report


def read_hf_dir(path: Path, base: GPTConfig | None = None) -> tuple[GPT, dict[str, Any]]:
    """A GPT rebuilt from a Hugging Face GPT-2 directory (safetensors only), and its config.json.

    base: the gpt config the directory was exported from (bias, dropout and vocab_size are taken
    from it); its sizes must agree with config.json.
    """
    config_file, weights = path / HF_CONFIG, path / HF_WEIGHTS
    if not config_file.is_file():
        raise ExportError(f"{path}: not a Hugging Face model directory (no {HF_CONFIG})")
    if not weights.is_file():
        bins = [p.name for p in path.glob("*.bin")]
        extra = f" ({bins[0]} is a pickle file and is never loaded)" if bins else ""
        raise ExportError(f"{path}: no {HF_WEIGHTS}{extra}; convert the weights to safetensors")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{config_file}: cannot read ({exc})") from None
    if hf.get("model_type") != "gpt2":
        raise ExportError(
            f"{config_file}: model_type {hf.get('model_type')!r}; only gpt2 can be imported"
        )
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
        state = load_file(str(weights))
        return from_hf_gpt2_state_dict(state, config, int(hf["vocab_size"])), hf
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{weights}: cannot read weights ({exc})") from None
    except (ValueError, KeyError, ModelError) as exc:
        raise ExportError(
            f"{path}: does not describe a GPT-2 model shipyard can build ({exc})"
        ) from None


def import_hf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
) -> Path:
    """Bring a Hugging Face GPT-2 directory (safetensors weights, tokenizer.json) back as a
    shipyard package; return its path. A directory written by `export(..., format="hf")` gets its
    original run config and data description back, and its parent recorded in the lineage."""
    src = Path(path)
    info_file = src / SHIPYARD_INFO
    saved: dict[str, Any] = {}
    base: RunConfig | None = None
    if info_file.is_file():
        try:
            saved = json.loads(info_file.read_text(encoding="utf-8"))
            base = validate_config(saved["config"], where=str(info_file))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ShipyardError) as exc:
            raise ExportError(f"{info_file}: cannot read ({exc})") from None
    base_gpt: GPTConfig | None = None
    if base is not None:
        if not isinstance(base.model, GPTConfig):
            raise ExportError(f"{info_file}: the saved config is not a gpt model")
        base_gpt = base.model
    model, hf = read_hf_dir(src, base_gpt)
    model.eval()
    tokenizer = None
    if (src / HF_TOKENIZER).is_file():
        try:
            tokenizer = Tokenizer.from_json((src / HF_TOKENIZER).read_text(encoding="utf-8"))
        except ShipyardError as exc:
            raise ExportError(f"{src / HF_TOKENIZER}: {exc}") from None
    config = base if base is not None else _run_config(model, tokenizer, src)
    info = _data_info(saved, model, src)
    if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
        raise ExportError(
            f"{src}: tokenizer has {tokenizer.vocab_size} tokens but the model {model.vocab_size}"
        )
    lineage = {
        "imported_from": str(src.resolve()),
        "hf_weights_sha256": sha256_file(src / HF_WEIGHTS),
    }
    parent = saved.get("parent")
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
        parent=parent,
    )


def _run_config(model: GPT, tokenizer: Tokenizer | None, src: Path) -> RunConfig:
    """A run config for a model trained elsewhere: the architecture, and the directory as data."""
    gpt = model.config.model_dump(mode="json")
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in src.resolve().name) or "hf"
    tok = (
        {"kind": "byte"}
        if tokenizer is None or tokenizer.vocab_size <= 260
        else {
            "kind": "bpe",
            "vocab_size": tokenizer.vocab_size,
        }
    )
    raw = {
        "name": name.lstrip("._-") or "hf",
        "task": "language-modeling",
        "data": {"source": str(src.resolve()), "format": "text", "tokenizer": tok},
        "model": gpt,
    }
    return validate_config(raw, where=str(src / HF_CONFIG))


def _data_info(saved: dict[str, Any], model: GPT, src: Path) -> DataInfo:
    if "data" in saved:
        return DataInfo.from_dict(saved["data"])
    return DataInfo(
        task="language-modeling",
        input_shape=(model.config.block_size,),
        num_outputs=model.vocab_size,
        class_names=None,
        feature_names=None,
        vocab_size=model.vocab_size,
        split_sizes={},
        fingerprint="hf:" + sha256_file(src / HF_WEIGHTS),
    )


__all__ = ["export_hf", "import_hf", "manifest_sha256", "read_hf_dir"]
