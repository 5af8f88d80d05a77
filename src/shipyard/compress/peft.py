"""A LoRA package's adapter in PEFT's format, which `peft.PeftModel.from_pretrained` loads.

    DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, ...
    DIR/adapter_model.safetensors  base_model.model.<path>.lora_A.weight (r, in)
                                   base_model.model.<path>.lora_B.weight (out, r)
    DIR/shipyard_adapter.json      the base's fingerprint (name, version, manifest and weights
                                   hashes): shipyard refuses the adapter on any other base

Module paths are the model's own, which are Hugging Face's (`model.layers.0.self_attn.q_proj`,
GPT-2's `transformer.h.0.attn.c_attn`), so the adapter applies to the exported base unchanged.
GPT-2 keeps its projections as `Conv1D` (weight stored (in, out)), which PEFT handles with
`fan_in_fan_out: true`; A and B have the same shapes either way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shipyard.compress.errors import ExportError
from shipyard.compress.source import Parent
from shipyard.models.lora import adapter_state_dict
from shipyard.package.manifest import LoRASpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SHIPYARD_ADAPTER = "shipyard_adapter.json"
_PREFIX = "base_model.model."
_CONV1D_FAMILIES = {"gpt"}  # exported in GPT-2 layout: Conv1D projections


def peft_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters under PEFT's tensor names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in adapter_state_dict(model).items():
        path, kind = name.rsplit(".", 1)
        out[f"{_PREFIX}{path}.{kind}.weight"] = tensor.contiguous().clone()
    return out


def peft_config(spec: LoRASpec, *, architecture: str, task: str) -> dict[str, Any]:
    """adapter_config.json for `spec` (no dropout at inference; the weights are what count)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if task == "language-modeling" else None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(spec.layers),
        "fan_in_fan_out": architecture in _CONV1D_FAMILIES,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": spec.base.name,
        "revision": None,
    }


def export_peft(parent: Parent, target: Path) -> tuple[Path, dict[str, Any]]:
    """Write `parent`'s LoRA adapter as a PEFT adapter directory; read the tensors back and
    check them against the package's (bitwise). Returns (path, {"tensors", "layers"})."""
    manifest = parent.loaded.manifest
    spec = manifest.lora
    if spec is None:
        raise ExportError(
            f"{parent.path} holds no LoRA adapter (train with finetune.method: lora and "
            "finetune.merge: false); for the whole model use --format hf"
        )
    if target.exists() and any(target.iterdir()) and not (target / SHIPYARD_ADAPTER).is_file():
        raise ExportError(f"{target}: exists and is not empty; choose another output")
    target.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(parent.loaded.model)
    save_file(tensors, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(spec, architecture=manifest.architecture.name, task=manifest.task)
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    info = {"name": manifest.name, "version": manifest.version, "base": spec.base.model_dump()}
    (target / SHIPYARD_ADAPTER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    written = load_file(str(target / ADAPTER_WEIGHTS))
    mismatched = [
        k for k, v in tensors.items() if k not in written or not torch.equal(v, written[k])
    ]
    if mismatched or set(written) != set(tensors):
        shutil.rmtree(target, ignore_errors=True)
        raise ExportError(
            f"parity check failed: adapter tensors differ after writing ({mismatched})"
        )
    return target, {"tensors": len(tensors), "layers": len(spec.layers)}
