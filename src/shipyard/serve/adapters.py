"""LoRA adapters on one served base: `shipyard serve BASE --adapter NAME=PACKAGE` (repeatable).

An adapter package (a LoRA run packaged with `finetune.merge: false`) holds its base's weights,
its adapter tensors and the base's fingerprint (`manifest.lora.base`: the base manifest's SHA-256
and the hash of its weights file; for a run on a Hugging Face checkpoint directory, the
checkpoint's source fingerprint, matched by the `import-hf` package of that checkpoint only).
Here the package is loaded and verified like any other, its
fingerprint must be the served base's (else start-up is refused, naming both), and only its
adapter tensors are kept: the served model is `with_adapter(base model, ...)`, a view that
shares every base tensor. Each adapter is then served under NAME like any model, with its own
generation engine (requests pick it by the OpenAI `model` field, or by the URL's model name).

Memory per adapter: its A and B tensors, a few module objects, and its engine's KV cache (which
grows with the adapter's own running requests). Loading an adapter package briefly holds one
more copy of the base weights (the package's own), freed before the next adapter loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shipyard.models.lora import LoRAConfig, adapter_state_dict, with_adapter
from shipyard.package import LoadedModel, load_package, manifest_sha256
from shipyard.package.files import WEIGHTS
from shipyard.package.manifest import LoRASpec, Manifest, read_manifest
from shipyard.serve.settings import ServeError


def adapter_spec(
    name: str, path: Path, adapter: Manifest, base: Manifest, base_path: Path
) -> LoRASpec:
    """The adapter's LoRA section when `adapter` was trained on exactly the base at `base_path`
    (manifest `base`); ServeError naming both otherwise."""
    what = f"--adapter {name}={path}"
    spec = adapter.lora
    if spec is None:
        raise ServeError(
            f"{what}: the package holds no LoRA adapter (train one with finetune.method: lora "
            "and finetune.merge: false); serve a merged or full model as a package argument"
        )
    if base.lora is not None:
        raise ServeError(
            f"{what}: the served base {base_path} is itself an unmerged adapter package; serve "
            "the base package the adapters were trained on"
        )
    if spec.base.source_fingerprint is not None:
        return _hf_base_spec(what, spec, base, base_path)
    entry = base.files.get(WEIGHTS)
    weights = f"{entry.algorithm}:{entry.digest}" if entry is not None else "none"
    base_sha = manifest_sha256(base_path)
    if spec.base.manifest_sha256 != base_sha or spec.base.weights_hash != weights:
        raise ServeError(
            f"{what}: the adapter was trained on base {spec.base.name} version "
            f"{spec.base.version} (manifest sha256 {str(spec.base.manifest_sha256)[:16]}), "
            "not on the "
            f"served base {base.name} version {base.version} at {base_path} (manifest sha256 "
            f"{base_sha[:16]}); an adapter only runs on its own base"
        )
    return spec


def _hf_base_spec(what: str, spec: LoRASpec, base: Manifest, base_path: Path) -> LoRASpec:
    """An adapter trained on a Hugging Face checkpoint directory runs only on the package
    `shipyard import-hf` made of that same checkpoint (same source fingerprint, not derived
    further): the same reader built the same weights for training and for the import."""
    fingerprint = spec.base.source_fingerprint
    imported = base.derivation is not None and base.derivation.method == "import-hf"
    source = (base.lineage.model_extra or {}).get("source_fingerprint")
    if imported and source == fingerprint:
        return spec
    raise ServeError(
        f"{what}: the adapter was trained on the Hugging Face checkpoint {spec.base.name} "
        f"(source fingerprint {str(fingerprint)[:23]}), and the served base {base.name} version "
        f"{base.version} at {base_path} is not `shipyard import-hf` of that checkpoint; serve "
        "the package `shipyard import-hf CHECKPOINT_DIR -o PACKAGE` makes of it"
    )


def check_adapter(name: str, path: Path, base: Manifest, base_path: Path) -> None:
    """Cheap start-up check (manifests only) of one adapter against the base: see
    `adapter_spec`."""
    if not path.is_dir():
        raise ServeError(f"--adapter {name}={path}: not a package directory")
    manifest, _ = read_manifest(path)
    adapter_spec(name, path, manifest, base, base_path)


def load_adapter(
    name: str, path: Path, base: LoadedModel, *, public_key: Path | None
) -> LoadedModel:
    """Load and verify the adapter package at `path`, check it against `base`, and return it as
    a LoadedModel whose model is `base.model` plus the adapter (base weights shared)."""
    check_adapter(name, path, base.manifest, base.path)  # before reading any weights
    loaded = load_package(path, public_key=public_key)
    spec = adapter_spec(name, path, loaded.manifest, base.manifest, base.path)  # as verified
    tensors = {k: v.to(base.device) for k, v in adapter_state_dict(loaded.model).items()}
    config = LoRAConfig(rank=spec.rank, alpha=spec.alpha, targets=spec.layers)
    model = with_adapter(base.model, config, tensors)
    return dataclasses.replace(loaded, model=model, device=base.device)
