"""Shared helpers for the language-model serving tests: one tiny trained GPT package per session,
and one tiny character-level LSTM (`rnn_lm_package`).

The model is a 2-layer byte-level GPT trained for a few seconds on Python standard library source:
enough to produce varied, plausible-looking text, small enough to generate hundreds of tokens a
second on one CPU core. The LSTM is trained the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LM_CONFIG: dict[str, Any] = {
    "name": "tiny-lm",
    "seed": 0,
    "task": "language-modeling",
    "data": {
        "source": "builtin:python-stdlib",
        "max_chars": 100_000,
        "splits": {"train": 0.9, "val": 0.05, "test": 0.05},
        "tokenizer": {"kind": "byte"},
        "sampling": "random",
    },
    "model": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "optim": {"name": "adamw", "lr": 0.003},
    "train": {"epochs": None, "max_steps": 150, "batch_size": 16, "log_every": 1000},
    "eval": {"every_steps": 1000, "max_batches": 1},
}

RNN_LM_CONFIG: dict[str, Any] = {
    **LM_CONFIG,
    "name": "tiny-rnn",
    "model": {"name": "rnn", "cell": "lstm", "n_layer": 1, "n_embd": 32, "hidden_size": 128,
              "block_size": 64},
    "optim": {"name": "adam", "lr": 0.005},
    "train": {"epochs": None, "max_steps": 250, "batch_size": 16, "log_every": 1000},
}  # fmt: skip

_cache: dict[str, Any] = {}


def lm_package(base: Path, config: dict[str, Any] | None = None) -> Path:
    """Train the tiny GPT (or `config`) and package the run, once per session (cached under
    `base`)."""
    config = config or LM_CONFIG
    out = base / f"serve-{config['name']}-run" / "package"
    if (out / "manifest.json").is_file():
        return out
    import torch

    from shipyard.config import load_config
    from shipyard.train import fit, package_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest (no thread wake-ups)
    try:
        result = fit(load_config(config), run_dir=out.parent, progress=False)
    finally:
        torch.set_num_threads(threads)
    if not (out / "manifest.json").is_file():
        package_run(result.run_dir)
    return out


def loaded_lm(base: Path) -> Any:
    """The tiny GPT package loaded once per session (a LoadedModel with .model and .tokenizer)."""
    if "lm" not in _cache:
        from shipyard.package import load_package

        _cache["lm"] = load_package(lm_package(base))
    return _cache["lm"]


def rnn_lm_package(base: Path) -> Path:
    """Train the tiny character-level LSTM and package the run, once per session."""
    return lm_package(base, RNN_LM_CONFIG)


def loaded_rnn_lm(base: Path) -> Any:
    """The tiny LSTM package loaded once per session."""
    if "rnn" not in _cache:
        from shipyard.package import load_package

        _cache["rnn"] = load_package(rnn_lm_package(base))
    return _cache["rnn"]
