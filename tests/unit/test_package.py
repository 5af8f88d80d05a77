"""Package format: write → verify → load on tiny hand-checkable models, and every refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shipyard.config import RunConfig, load_config
from shipyard.data import DataInfo, Preprocessor, Tokenizer
from shipyard.errors import PackageError
from shipyard.models import MODEL_NAMES, TOKEN_MODELS, build_model
from shipyard.package import (
    Manifest,
    TensorSpec,
    conform_input,
    load_package,
    manifest_sha256,
    read_manifest,
    verify_package,
    write_package,
)
from shipyard.package.loading import InvalidInputError, build_empty_model


def tiny_config(task: str = "regression", **model: Any) -> RunConfig:
    source = "builtin:digits" if task == "classification" else "builtin:synthetic-regression"
    return load_config(
        {
            "name": "tiny",
            "task": task,
            "data": {"source": source},
            "model": {"name": "mlp", "hidden_sizes": [], **model},
        }
    )


def tiny_info(task: str = "regression", *, features: int = 1, outputs: int = 1) -> DataInfo:
    names = [f"c{i}" for i in range(outputs)] if task == "classification" else None
    return DataInfo(
        task=task,
        input_shape=(features,),
        num_outputs=outputs,
        class_names=names,
        feature_names=None,
        vocab_size=None,
        split_sizes={"train": 10},
        fingerprint="f" * 64,
    )


def linear_package(path: Path, **kwargs: Any) -> Path:
    """y = 2x + 1 as a one-layer MLP regression package, no preprocessing (LitServe's fixture)."""
    config = tiny_config("regression")
    info = tiny_info("regression")
    model = build_model(config.model, input_shape=(1,), num_outputs=1)
    with torch.no_grad():
        model.head.weight.fill_(2.0)  # type: ignore[union-attr]
        model.head.bias.fill_(1.0)  # type: ignore[union-attr]
    return write_package(
        path,
        model=model,
        config=config,
        data_info=info,
        preprocessor=None,
        tokenizer=None,
        metrics={"val": {"mse": 0.5, "confusion": [[1]]}},
        **kwargs,
    )


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return linear_package(tmp_path / "pkg", version="v1")


def rewrite_manifest(path: Path, change: Any) -> None:
    data = json.loads((path / "manifest.json").read_text())
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------
# writing and loading


def test_linear_package_predicts_2x_plus_1(pkg: Path) -> None:
    loaded = load_package(pkg)
    assert loaded.predict([[4.0], [0.0]]) == [{"value": 9.0}, {"value": 1.0}]
    out = loaded.predict_arrays(np.array([[4.0]], dtype=np.float32))
    assert out["values"].dtype == np.float32 and out["values"].tolist() == [[9.0]]
    assert loaded.task == "regression" and not loaded.model.training


def test_manifest_contents(pkg: Path) -> None:
    manifest = verify_package(pkg)
    assert manifest.format_version == 2  # BLAKE3 file hashes
    assert (manifest.name, manifest.version, manifest.task) == ("tiny", "v1", "regression")
    assert manifest.architecture.name == "mlp"
    assert manifest.metrics == {"val": {"mse": 0.5}}  # non-scalars dropped
    assert manifest.signature.outputs[0].model_dump() == {
        "name": "values",
        "datatype": "FP32",
        "shape": [-1, 1],
    }
    assert manifest.lineage.torch_version == torch.__version__
    assert manifest.created.endswith("Z")
    assert sorted(manifest.files) == ["model.safetensors"]
    entry = manifest.files["model.safetensors"]
    assert entry.size == (pkg / "model.safetensors").stat().st_size
    assert manifest_sha256(pkg) == manifest_sha256(pkg / "manifest.json")
    assert len(manifest_sha256(pkg)) == 64


def test_default_version_comes_from_run_dir(tmp_path: Path) -> None:
    path = linear_package(tmp_path / "p", lineage_extra={"run_dir": "/runs/x/20260101-000000"})
    manifest = verify_package(path)
    assert manifest.version == "20260101-000000"
    assert manifest.lineage.run_dir == "/runs/x/20260101-000000"


def test_parent_and_derivation_recorded(tmp_path: Path, pkg: Path) -> None:
    child = linear_package(
        tmp_path / "child", parent=pkg, derivation={"method": "prune", "params": {"amount": 0.5}}
    )
    manifest = verify_package(child)
    assert manifest.lineage.parent is not None
    assert manifest.lineage.parent.manifest_sha256 == manifest_sha256(pkg)
    assert manifest.derivation is not None and manifest.derivation.params == {"amount": 0.5}


def test_rewrite_replaces_a_package_but_not_other_directories(tmp_path: Path, pkg: Path) -> None:
    linear_package(pkg, version="v2")
    assert verify_package(pkg).version == "v2"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(PackageError, match="not empty"):
        linear_package(other)
    assert (other / "mine.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_classification_outputs_and_preprocessing(tmp_path: Path) -> None:
    config = tiny_config("classification", hidden_sizes=[5])
    info = tiny_info("classification", features=4, outputs=3)
    rng = np.random.default_rng(0)
    pre = Preprocessor("standardize", "none", info.class_names).fit(rng.normal(5, 3, (50, 4)))
    model = build_model(config.model, input_shape=(4,), num_outputs=3).eval()
    path = write_package(
        tmp_path / "cls",
        model=model,
        config=config,
        data_info=info,
        preprocessor=pre,
        tokenizer=None,
        metrics={},
    )
    loaded = load_package(path)
    x = rng.normal(5, 3, (6, 4)).astype(np.float32)
    out = loaded.predict_arrays(x)
    with torch.inference_mode():
        ref = torch.softmax(model(torch.from_numpy(pre.transform(x))), dim=-1).numpy()
    assert np.array_equal(out["probabilities"], ref)  # bitwise, same code path
    assert out["label"].tolist() == [info.class_names[i] for i in ref.argmax(1)]  # type: ignore[index]
    rows = loaded.predict(x.tolist())
    assert set(rows[0]) == {"label", "probabilities"}
    assert list(rows[0]["probabilities"]) == ["c0", "c1", "c2"]
    with pytest.raises(InvalidInputError, match="shape"):
        loaded.predict_arrays(np.zeros((2, 5), np.float32))
    with pytest.raises(InvalidInputError, match="numbers"):
        loaded.predict(["text"])


# One small case per architecture: its config extras, task and data. A new architecture in the
# model registry fails the test below until it gets a case here.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mlp": {"model": {}, "task": "regression", "data": {"source": "builtin:digits"}},
    "cnn": {
        "model": {"channels": [2], "hidden_size": 4},
        "task": "classification",
        "data": {"source": "builtin:digits"},
    },
    "gpt": {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 6},
        "task": "language-modeling",
        "data": {"source": "builtin:python-stdlib", "tokenizer": {"kind": "byte"}},
    },
    "llama": {
        "model": {
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 6,
        },
        "task": "language-modeling",
        "data": {"source": "builtin:python-stdlib", "tokenizer": {"kind": "byte"}},
    },
    "rnn": {
        # LSTM weights live in a list nn.LSTM keeps: a meta-device rebuild must refresh it
        "model": {
            "n_layer": 2,
            "n_embd": 4,
            "hidden_size": 6,
            "block_size": 6,
            "bidirectional": True,
        },
        "task": "classification",
        "data": {
            "source": "x.csv",
            "text_column": "t",
            "target": "y",
            "tokenizer": {"kind": "byte"},
        },
    },
    "encoder": {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 6},
        "task": "classification",
        "data": {
            "source": "x.csv",
            "text_column": "t",
            "target": "y",
            "tokenizer": {"kind": "byte"},
        },
    },
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_architecture_round_trips_exactly(tmp_path: Path, name: str) -> None:
    """Meta-device rebuild + safetensors load gives the same outputs (tied GPT weights too)."""
    if name not in ARCHITECTURES:
        pytest.fail(f"architecture {name!r} is registered but has no case in ARCHITECTURES")
    torch.manual_seed(0)
    case = ARCHITECTURES[name]
    model_cfg: dict[str, Any] = {"name": name, **case["model"]}
    task, data = case["task"], case["data"]
    config = load_config({"name": "t", "task": task, "data": data, "model": model_cfg})
    tokenizer = Tokenizer.byte() if name in TOKEN_MODELS else None
    vocab = tokenizer.vocab_size if tokenizer else None
    shape = (6,) if tokenizer else (1, 8, 8)
    info = DataInfo(task, shape, 3, ["a", "b", "c"], None, vocab, {"train": 1}, "0" * 64)
    if task != "classification":
        info.class_names = None
    model = build_model(config.model, input_shape=shape, num_outputs=3, vocab_size=vocab).eval()
    path = write_package(
        tmp_path / name,
        model=model,
        config=config,
        data_info=info,
        preprocessor=None,
        tokenizer=tokenizer,
        metrics={},
    )
    loaded = load_package(path)
    x = torch.randint(0, 200, (2, 6)) if tokenizer else torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))
    if name == "gpt":
        assert loaded.model.transformer.wte.weight is loaded.model.lm_head.weight  # type: ignore[union-attr]
        assert loaded.predict(["def f"])[0]["next_token_id"] >= 0
        assert loaded.predict_arrays(x.numpy())["logits"].shape == (2, 6, vocab)
    if name in ("encoder", "rnn"):
        assert loaded.predict(["hello"])[0]["label"] in {"a", "b", "c"}


def test_build_empty_model_refuses_unknown_architecture() -> None:
    with pytest.raises(PackageError, match=r"unknown architecture 'evil\.module:Thing'"):
        build_empty_model({"name": "evil.module:Thing"}, tiny_info())


# ------------------------------------------------------------------------------------------
# refusals


def test_flipped_byte_names_the_file(pkg: Path) -> None:
    weights = pkg / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model\.safetensors: BLAKE3 hash does not match"):
        verify_package(pkg)
    with pytest.raises(PackageError, match=r"model\.safetensors: BLAKE3 hash does not match"):
        load_package(pkg)


def test_truncated_file_is_a_size_mismatch(pkg: Path) -> None:
    weights = pkg / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(PackageError, match=r"model\.safetensors: size"):
        load_package(pkg)


def test_missing_file(pkg: Path) -> None:
    (pkg / "model.safetensors").unlink()
    with pytest.raises(PackageError, match=r"model\.safetensors: missing"):
        verify_package(pkg)


def test_extra_file(pkg: Path) -> None:
    (pkg / "evil.py").write_text("import os")
    with pytest.raises(PackageError, match=r"evil\.py: unexpected file"):
        verify_package(pkg)


def test_extra_directory(pkg: Path) -> None:
    (pkg / "sub").mkdir()
    with pytest.raises(PackageError, match="unexpected directory"):
        verify_package(pkg)


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "a/b", "..", ".hidden"])
def test_traversal_names_in_manifest(pkg: Path, name: str) -> None:
    def change(d: dict[str, Any]) -> None:
        d["files"][name] = d["files"]["model.safetensors"]

    rewrite_manifest(pkg, change)
    with pytest.raises(PackageError, match="is not allowed"):
        verify_package(pkg)


def test_symlinked_file_is_refused(pkg: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.safetensors"
    os.replace(pkg / "model.safetensors", real)
    (pkg / "model.safetensors").symlink_to(real)
    with pytest.raises(PackageError, match="symlinks are not allowed"):
        verify_package(pkg)


def test_symlinked_package_dir_is_refused(pkg: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(pkg, target_is_directory=True)
    with pytest.raises(PackageError, match="is a symlink"):
        verify_package(link)


def test_future_format_version_asks_for_an_upgrade(pkg: Path) -> None:
    rewrite_manifest(pkg, lambda d: d.update(format_version=3, new_field=1))
    with pytest.raises(PackageError, match=r"newer shipyard \(format 3\); upgrade shipyard"):
        verify_package(pkg)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format_version": "1"}', "format_version missing"),
    ],
)
def test_malformed_manifest(pkg: Path, text: str, match: str) -> None:
    (pkg / "manifest.json").write_text(text)
    with pytest.raises(PackageError, match=match):
        verify_package(pkg)


def test_manifest_with_a_wrong_field_names_it(pkg: Path) -> None:
    rewrite_manifest(pkg, lambda d: d.update(task="clustering"))
    with pytest.raises(PackageError, match="malformed manifest: task"):
        verify_package(pkg)


def test_unknown_architecture_is_refused_by_name(pkg: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["architecture"] = {"name": "os.system", "config": {"name": "os.system"}}

    rewrite_manifest(pkg, change)
    with pytest.raises(PackageError, match=r"unknown architecture 'os\.system'"):
        load_package(pkg)


def test_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no such directory"):
        verify_package(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(PackageError, match=r"no manifest\.json"):
        verify_package(tmp_path / "empty")


def test_read_manifest_returns_exact_bytes(pkg: Path) -> None:
    manifest, raw = read_manifest(pkg)
    assert isinstance(manifest, Manifest)
    assert raw == (pkg / "manifest.json").read_bytes()
    assert Manifest.model_validate_json(raw).to_json().encode() == raw


# ------------------------------------------------------------------------------------------
# chunk hashes: large files are verified on every core


def test_small_files_keep_two_field_entries(pkg: Path, tmp_path: Path) -> None:
    entry = json.loads((pkg / "manifest.json").read_text())["files"]["model.safetensors"]
    assert set(entry) == {"blake3", "size"}
    old = linear_package(tmp_path / "old", version="v1", hash_algorithm="sha256")
    entry = json.loads((old / "manifest.json").read_text())["files"]["model.safetensors"]
    assert set(entry) == {"sha256", "size"}


def test_hash_file_chunks_cover_every_byte(tmp_path: Path) -> None:
    import hashlib

    from shipyard.package.manifest import check_file, hash_file

    data = os.urandom(10_000)
    (tmp_path / "blob").write_bytes(data)
    entry = hash_file(tmp_path / "blob", algorithm="sha256", chunk_size=4096)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.chunks == [hashlib.sha256(data[i : i + 4096]).hexdigest() for i in (0, 4096, 8192)]
    check_file(tmp_path, "blob", entry)
    flipped = bytearray(data)
    flipped[9000] ^= 1  # in the last chunk
    (tmp_path / "blob").write_bytes(bytes(flipped))
    with pytest.raises(PackageError, match="blob: SHA-256 hash does not match"):
        check_file(tmp_path, "blob", entry)


def test_chunk_list_must_fit_the_size() -> None:
    from pydantic import ValidationError

    from shipyard.package.manifest import FileEntry

    with pytest.raises(ValidationError, match="expected 3"):
        FileEntry(sha256="0" * 64, size=10_000, chunk_size=4096, chunks=["0" * 64] * 2)
    with pytest.raises(ValidationError, match="go together"):
        FileEntry(sha256="0" * 64, size=10, chunk_size=4096)


def test_chunked_package_loads_refuses_tampering_and_survives_encryption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shipyard.package import decrypt_package, encrypt_package, generate_package_key
    from shipyard.package import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "HASH_CHUNK", 64)  # the tiny weights file spans chunks
    path = linear_package(tmp_path / "chunked", version="v1", hash_algorithm="sha256")
    entry = verify_package(path).files["model.safetensors"]
    assert entry.chunk_size == 64 and entry.chunks is not None and len(entry.chunks) > 1
    assert load_package(path).predict([[4.0]]) == [{"value": 9.0}]

    key = generate_package_key()
    enc = encrypt_package(path, tmp_path / "enc", key=key)
    back = decrypt_package(enc, tmp_path / "back", key=key)
    assert (back / "manifest.json").read_bytes() == (path / "manifest.json").read_bytes()

    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model\.safetensors: SHA-256 hash does not match"):
        load_package(path)


def test_conform_input_is_the_one_input_check() -> None:
    feats = TensorSpec(name="x", datatype="FP32", shape=[-1, 1, 2, 2])
    flat = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert conform_input(feats, flat).shape == (2, 1, 2, 2)  # flat rows fit the image shape
    for bad, message in [
        (np.zeros((0, 4), np.float32), "the batch is empty"),
        (np.float32(1.0), "the batch is empty"),
        (np.zeros((2, 3), np.float32), r"shape \[2, 3\] does not match"),
        (np.array([["a", "b", "c", "d"]]), "must be numbers"),
        (np.array([[0.0, np.nan, 0.0, 0.0]], np.float32), "NaN or infinity"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            conform_input(feats, bad)
    tokens = TensorSpec(name="ids", datatype="INT64", shape=[-1, -1])
    ids = np.array([[1, 2, 3]])
    assert conform_input(tokens, ids, vocab_size=4) is ids
    with pytest.raises(InvalidInputError, match=r"in 0\.\.3"):
        conform_input(tokens, np.array([[1, 4]]), vocab_size=4)
    with pytest.raises(InvalidInputError, match="integer token ids"):
        conform_input(tokens, np.array([[1.0, 2.0]]), vocab_size=4)
    with pytest.raises(InvalidInputError, match="does not match"):
        conform_input(tokens, np.array([1, 2]), vocab_size=4)  # no batch dimension
