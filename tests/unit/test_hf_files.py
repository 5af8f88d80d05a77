"""Reading Hugging Face checkpoint folders: which weight files, refusals, fingerprints, shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shipyard.cli.compress_cmd import _size_bytes
from shipyard.compress.errors import ExportError
from shipyard.compress.hf import (
    HF_INDEX,
    _save_weights,
    read_tensors,
    source_fingerprint,
    weight_files,
)
from shipyard.errors import ConfigError


def _state() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b.weight": torch.ones(5, dtype=torch.bfloat16),
        "c.bias": torch.zeros(7),
    }


def test_single_file_and_shards_read_the_same_tensors(tmp_path: Path) -> None:
    state = _state()
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    _save_weights(state, one, max_shard_size=1 << 20)
    _save_weights(state, many, max_shard_size=40)  # 48 | 10 + 28 bytes: two shards
    assert [f.name for f in weight_files(one)] == ["model.safetensors"]
    shards = weight_files(many)
    assert [f.name for f in shards] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert json.loads((many / HF_INDEX).read_text())["weight_map"] == {
        "a.weight": shards[0].name,
        "b.weight": shards[1].name,
        "c.bias": shards[1].name,
    }
    index = json.loads((many / HF_INDEX).read_text())
    assert index["metadata"]["total_size"] == 48 + 10 + 28
    for got in (read_tensors(weight_files(one)), read_tensors(shards)):
        assert set(got) == set(state)
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items())


def test_fingerprint_covers_config_and_every_weight_byte(tmp_path: Path) -> None:
    _save_weights(_state(), tmp_path, max_shard_size=40)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    files = weight_files(tmp_path)
    first, digests = source_fingerprint(tmp_path / "config.json", files)
    assert first.startswith("sha256:") and len(digests) == 2
    (tmp_path / "config.json").write_text('{"model_type": "llama" }')
    assert source_fingerprint(tmp_path / "config.json", files)[0] != first
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"c.bias": torch.ones(7)}, str(files[-1]))
    assert source_fingerprint(tmp_path / "config.json", files)[0] != first


def test_bad_folders_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no weights .*safe_serialization=True"):
        weight_files(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")  # never opened
    with pytest.raises(ExportError, match=r"model\.pt is a pickled PyTorch checkpoint"):
        weight_files(tmp_path)
    (tmp_path / HF_INDEX).write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ExportError, match=r"lists gone\.safetensors, which is missing"):
        weight_files(tmp_path)
    (tmp_path / HF_INDEX).write_text(json.dumps({"weight_map": {"x": "/etc/passwd"}}))
    with pytest.raises(ExportError, match="must be a plain file name"):
        weight_files(tmp_path)
    (tmp_path / HF_INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ExportError, match="has no weight_map"):
        weight_files(tmp_path)
    (tmp_path / HF_INDEX).unlink()
    (tmp_path / "model.pt").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="cannot read weights"):
        read_tensors(weight_files(tmp_path))


def test_shard_sizes_parse() -> None:
    assert _size_bytes("5GB") == 5 * 10**9
    assert _size_bytes("500mb") == 500 * 10**6
    assert _size_bytes("2GiB") == 2 * 2**30
    assert _size_bytes("123") == 123
    for bad in ("big", "0", "-1GB", "GB"):
        with pytest.raises(ConfigError, match="is not a size"):
            _size_bytes(bad)
