"""LoRA layers against the formula, freezing, merging, targets, and the config's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shipyard.config import load_config
from shipyard.errors import ConfigError, ModelError, TrainError
from shipyard.models import GPT, GPTConfig
from shipyard.models.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    merge_lora,
    with_adapter,
)
from shipyard.package import load_package
from shipyard.train import fit


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 4)


def test_fresh_adapter_changes_nothing_and_trained_one_follows_the_formula() -> None:
    base = _linear()
    x = torch.randn(3, 6)
    want = base(x)
    layer = LoRALinear.from_linear(base, LoRAConfig(rank=2, alpha=4.0, targets=["x"]))
    assert torch.equal(layer(x), want)  # B starts at zero
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(4, 2))
    by_hand = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * (4.0 / 2)
    torch.testing.assert_close(layer(x), by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.merged()(x), by_hand, rtol=0, atol=1e-5)
    # the base weight is shared, frozen, and keeps nn.Linear's parameter names
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}


def test_apply_lora_freezes_the_base_and_trains_only_adapters() -> None:
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8), vocab_size=32)
    names = apply_lora(model, LoRAConfig(rank=2, targets=["c_attn"]))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    # HF names of the base survive: the state dict only gains the adapters
    keys = set(model.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in keys
    assert set(adapter_state_dict(model)) == {
        f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")
    }


def test_merge_gives_the_same_function_with_plain_linears() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), vocab_size=32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["c_attn", "c_fc"]))
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        want = model(idx)
        merged = merge_lora(model)
        got = model(idx)
    assert merged == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_with_adapter_shares_the_base_and_computes_the_adapted_model() -> None:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)
    base = GPT(config, vocab_size=32).eval()
    tuned = GPT(config, vocab_size=32).eval()
    tuned.load_state_dict(base.state_dict())
    lora = LoRAConfig(rank=2, alpha=8.0, targets=["c_attn", "c_fc"])
    apply_lora(tuned, lora)
    with torch.no_grad():
        for p in adapter_state_dict(tuned).values():
            p.add_(torch.randn_like(p) * 0.2)
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        plain, want = base(idx), tuned(idx)
        views = [with_adapter(base, lora, adapter_state_dict(tuned)) for _ in range(2)]
        assert torch.equal(views[0](idx), want) and torch.equal(views[1](idx), want)
        assert torch.equal(base(idx), plain)  # the base itself is unchanged
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    # every base tensor is the base's own object; only A and B are new
    base_params = {id(p) for p in base.parameters()}
    new = [n for n, p in views[0].named_parameters() if id(p) not in base_params]
    assert sorted(new) == sorted(adapter_state_dict(tuned))
    assert views[0].transformer.wte is base.transformer.wte
    assert views[0].transformer.h[0].attn.c_proj is base.transformer.h[0].attn.c_proj
    with pytest.raises(ModelError, match=r"missing \['transformer.h.0.attn.c_attn.lora_A'"):
        partial = dict(adapter_state_dict(tuned))
        del partial["transformer.h.0.attn.c_attn.lora_A"]
        with_adapter(base, lora, partial)


def test_bad_targets_are_clear_errors() -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), vocab_size=32)
    with pytest.raises(ModelError, match=r"'q_proj' matches no Linear.*c_attn"):
        apply_lora(model, LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ModelError, match="tied embeddings"):
        apply_lora(model, LoRAConfig(targets=["lm_head"]))  # tied to the token embedding
    with pytest.raises(ValueError, match="not a module name"):
        LoRAConfig(targets=["c_attn; rm -rf"])


def test_pretrained_model_brings_its_own_tokenizer() -> None:
    config = {
        "name": "ft",
        "task": "language-modeling",
        "data": {"source": "builtin:python-stdlib", "tokenizer": {"kind": "byte"}},
        "model": {"name": "pretrained", "path": "somewhere"},
    }
    with pytest.raises(ConfigError, match=r"own tokenizer: remove data\.tokenizer"):
        load_config(config)
    del config["data"]["tokenizer"]  # type: ignore[attr-defined]
    ok = load_config(config, ["finetune.rank=4", "finetune.targets=[c_attn]"])
    assert ok.finetune is not None and ok.finetune.scale == 16.0 / 4
    with pytest.raises(ConfigError, match=r"finetune\.method"):
        load_config(config, ["finetune.method=qlora"])


def _from(package: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "ft",
        "task": "regression",
        "data": {"source": "builtin:synthetic-regression", "n_samples": 200, "n_features": 4},
        "model": {"name": "pretrained", "path": str(package)},
        "train": {"epochs": None, "max_steps": 2, "batch_size": 16},
        **extra,
    }


def test_a_run_starts_from_the_package_weights(package_src: Path, tmp_path: Path) -> None:
    config = load_config(_from(package_src, optim={"name": "sgd", "lr": 1e-12}))
    result = fit(config, run_dir=tmp_path / "run", progress=False)
    tuned = load_package(result.run_dir / "package")
    base = load_package(package_src)
    assert tuned.manifest.architecture == base.manifest.architecture  # not "pretrained"
    assert tuned.manifest.lineage.parent is not None
    assert tuned.manifest.lineage.parent.name == base.manifest.name
    for (name, a), (_, b) in zip(
        tuned.model.state_dict().items(), base.model.state_dict().items(), strict=True
    ):
        # lr 1e-12: the weights are still the base's (not a fresh initialisation)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)


def test_a_pretrained_model_of_another_task_is_refused(package_src: Path, tmp_path: Path) -> None:
    config = load_config(
        {**_from(package_src), "task": "classification", "data": {"source": "builtin:digits"}}
    )
    with pytest.raises(TrainError, match="is a regression model but the run's task is classif"):
        fit(config, run_dir=tmp_path / "run", progress=False)
    with pytest.raises(TrainError, match="LoRA target 'nope' matches no Linear"):
        fit(
            load_config(_from(package_src, finetune={"targets": ["nope"]})),
            run_dir=tmp_path / "run2",
            progress=False,
        )
