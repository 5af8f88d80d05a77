"""A run whose `model.path` is a Hugging Face checkpoint directory (no `import-hf` first): the
same base, tokenizer and chat template as the directory's imported package, so LoRA and full
fine-tuning give the same losses; the adapter records the checkpoint's source fingerprint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.integration.test_hf_checkpoints import build_checkpoint

from shipyard.compress import import_hf
from shipyard.config import load_config
from shipyard.errors import TrainError
from shipyard.package import load_package
from shipyard.package.hf_checkpoint import checkpoint_fingerprint
from shipyard.package.manifest import read_manifest
from shipyard.serve.adapters import adapter_spec
from shipyard.serve.settings import ServeError
from shipyard.train import StepInfo, build_data_and_model, fit

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint directory, its import-hf package, a chat JSONL file)."""
    root = tmp_path_factory.mktemp("hf-path")
    build_checkpoint("qwen2", root / "hf", seed=0, initializer_range=0.2)
    pkg = import_hf(root / "hf", root / "pkg", name="tiny-qwen")
    chats = root / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a + b}."},
            ]
        }
        for a in range(6)
        for b in range(5)
    ]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root / "hf", pkg, chats


def _config(base: Path, chats: Path, method: str = "lora") -> dict[str, Any]:
    return {
        "name": "hf-path",
        "seed": 0,
        "task": "language-modeling",
        "data": {"source": str(chats), "format": "chat", "block_size": 64},
        "model": {"name": "pretrained", "path": str(base)},
        "finetune": {"method": method, "rank": 2, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "train": {"epochs": None, "max_steps": 3, "batch_size": 4, "log_every": 1},
        "eval": {"every_steps": 1000, "max_batches": 1},
    }


def _fit(config: dict[str, Any], run: Path) -> list[float]:
    losses: list[float] = []

    def record(info: StepInfo) -> None:
        if info.loss is not None:
            losses.append(info.loss)

    fit(load_config(config), run_dir=run, callbacks=[record])
    return losses


def test_lora_on_a_checkpoint_dir_is_lora_on_its_import(
    sources: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    hf, pkg, chats = sources
    from_dir = _fit(_config(hf, chats), tmp_path / "dir")
    from_pkg = _fit(_config(pkg, chats), tmp_path / "pkg")
    assert len(from_dir) == len(from_pkg) == 3
    assert from_dir == pytest.approx(from_pkg, rel=0, abs=1e-6)
    adapter = load_package(tmp_path / "dir" / "package")  # verified, rebuilt from the dir's config
    reference = load_package(tmp_path / "pkg" / "package")
    x = torch.arange(12).reshape(1, 12)
    with torch.inference_mode():
        assert torch.allclose(adapter.model(x), reference.model(x), atol=1e-6)
    assert adapter.tokenizer is not None and adapter.tokenizer.hf is not None
    assert reference.tokenizer is not None and reference.tokenizer.hf is not None
    assert adapter.tokenizer.hf.chat_template == reference.tokenizer.hf.chat_template
    spec = adapter.manifest.lora
    imported, _ = read_manifest(pkg)
    assert spec is not None and spec.base.manifest_sha256 is None
    assert spec.base.source_fingerprint == imported.lineage.model_extra["source_fingerprint"]
    assert adapter.manifest.lineage.parent is None
    pretrained = adapter.manifest.lineage.model_extra["pretrained_from"]
    assert pretrained["source_fingerprint"] == spec.base.source_fingerprint
    # serving: the import-hf package of the same checkpoint is its base; nothing else is
    assert adapter_spec("a", tmp_path / "dir", adapter.manifest, imported, pkg) == spec
    not_imported = imported.model_copy(update={"derivation": None})  # e.g. trained further
    with pytest.raises(ServeError, match=r"is not `shipyard import-hf` of that checkpoint"):
        adapter_spec("a", tmp_path / "dir", adapter.manifest, not_imported, pkg)


def test_full_finetune_from_a_checkpoint_dir(
    sources: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    hf, pkg, chats = sources
    from_dir = _fit(_config(hf, chats, "full"), tmp_path / "dir")
    from_pkg = _fit(_config(pkg, chats, "full"), tmp_path / "pkg")
    assert from_dir == pytest.approx(from_pkg, rel=0, abs=1e-6)
    imported, _ = read_manifest(pkg)  # training wrote to its own copy, not the checkpoint's files
    assert checkpoint_fingerprint(hf) == imported.lineage.model_extra["source_fingerprint"]
    tuned = load_package(tmp_path / "dir" / "package")
    assert tuned.manifest.lora is None and tuned.manifest.architecture.name == "llama"
    assert tuned.tokenizer is not None and tuned.tokenizer.hf is not None
    assert tuned.tokenizer.hf.chat_template is not None


def test_a_dir_that_is_neither_is_one_clear_error(
    sources: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, _, chats = sources
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainError, match=r"neither a shipyard package .* nor a Hugging Face"):
        build_data_and_model(load_config(_config(empty, chats)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(TrainError, match=r"pytorch_model\.bin is a pickled PyTorch checkpoint"):
        build_data_and_model(load_config(_config(pickled, chats)))
    digits = {
        "name": "digits",
        "task": "classification",
        "data": {"source": "builtin:digits"},
        "model": {"name": "pretrained", "path": str(sources[0])},
    }
    with pytest.raises(TrainError, match=r"Hugging Face causal language model .* task"):
        build_data_and_model(load_config(digits))
