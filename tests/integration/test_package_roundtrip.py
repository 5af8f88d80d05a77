"""Train → package → load in a fresh Python process: predictions are bitwise identical to the
in-process model (CPU fp32) for a classifier, a regressor and a language model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from tests.conftest import ROOT

from shipyard.config import load_config
from shipyard.package import verify_package
from shipyard.train import best_checkpoint, build_data_and_model, fit
from shipyard.train.checkpoint import load_weights

pytestmark = pytest.mark.integration

RUNS: dict[str, dict[str, Any]] = {
    "digits": {
        "task": "classification",
        "data": {"source": "builtin:digits", "preprocessing": "standardize"},
        "model": {"name": "mlp", "hidden_sizes": [32]},
        "train": {"epochs": None, "max_steps": 8, "batch_size": 64},
        "eval": {"every_steps": 4},
    },
    "regressor": {
        "task": "regression",
        "data": {
            "source": "builtin:synthetic-regression",
            "n_samples": 300,
            "n_features": 5,
            "target_scaling": "standardize",
        },
        "model": {"name": "mlp", "hidden_sizes": [16]},
        "train": {"epochs": None, "max_steps": 8, "batch_size": 32, "loss": "mse"},
    },
    "gpt": {
        "task": "language-modeling",
        "data": {
            "source": "builtin:python-stdlib",
            "max_chars": 50000,
            "tokenizer": {"kind": "byte"},
        },
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {"epochs": None, "max_steps": 5, "batch_size": 8},
        "eval": {"max_batches": 2},
    },
}

CHILD = """
import numpy as np, torch
from shipyard.package import load_package
torch.set_num_threads({threads})
for name in {names!r}:
    loaded = load_package("{root}/" + name + "/package")
    out = loaded.predict_arrays(np.load("{root}/" + name + "-x.npy", allow_pickle=False))
    for key, value in out.items():
        if value.dtype == object:
            value = value.astype(str)
        np.save("{root}/" + name + "-out-" + key + ".npy", value, allow_pickle=False)
"""


def reference(name: str, run_dir: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The in-process model: data + model rebuilt from the config, the best checkpoint's weights,
    and the run's own fitted preprocessing."""
    config = load_config(run_dir / "config.yaml")
    data, model = build_data_and_model(config)
    load_weights(best_checkpoint(run_dir), model)
    model.eval()
    pre = data.preprocessor
    with torch.inference_mode():
        if config.task == "language-modeling":
            return {"logits": model(torch.from_numpy(x)).numpy()}
        feats = pre.transform(x.astype(np.float32)) if pre is not None else x
        out = model(torch.from_numpy(feats))
    if config.task == "classification":
        probs = torch.softmax(out, dim=-1).numpy()
        names = np.asarray(data.info.class_names)
        return {"probabilities": probs, "label": names[probs.argmax(1)]}
    values = out.numpy()
    return {"values": pre.inverse_transform_target(values) if pre is not None else values}


def inputs(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name == "digits":
        return load_digits().images[:40].reshape(40, 1, 8, 8).astype(np.float32)  # raw pixels
    if name == "regressor":
        return rng.normal(0, 2, (25, 5)).astype(np.float32)
    return rng.integers(0, 258, (4, 32)).astype(np.int64)


def test_packaged_predictions_are_bitwise_identical_in_a_fresh_process(tmp_path: Path) -> None:
    for name, raw in RUNS.items():
        fit(load_config({"name": name, **raw}), run_dir=tmp_path / name)
        manifest = verify_package(tmp_path / name / "package")
        assert manifest.task == raw["task"]
        np.save(tmp_path / f"{name}-x.npy", inputs(name), allow_pickle=False)
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            CHILD.format(threads=torch.get_num_threads(), names=list(RUNS), root=tmp_path)
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for name in RUNS:
        expected = reference(name, tmp_path / name, inputs(name))
        for key, want in expected.items():
            got = np.load(tmp_path / f"{name}-out-{key}.npy", allow_pickle=False)
            assert got.shape == want.shape, (name, key)
            assert np.array_equal(got, want.astype(got.dtype)), (name, key)
            if got.dtype.kind == "f":
                assert torch.equal(torch.from_numpy(got), torch.from_numpy(want))
