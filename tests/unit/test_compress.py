"""Compression building blocks on tiny hand-checkable models: int8 layers, pruning, the
distillation loss, the manifest fields, and the trainer hooks fine-tuning and distillation use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from shipyard.compress import (
    BenchParams,
    CompressError,
    DynamicInt8Linear,
    Int8Linear,
    quantize,
    quantize_linears,
)
from shipyard.compress.measure import markdown_table
from shipyard.compress.pipeline import student_config
from shipyard.compress.pruning import prune_structured, prune_unstructured
from shipyard.config import load_config
from shipyard.errors import PackageError, TrainError
from shipyard.models import GPT, MLP, GPTConfig, MLPConfig, build_model
from shipyard.models.cnn import CNNConfig
from shipyard.models.encoder import EncoderConfig
from shipyard.models.llama import Llama, LlamaConfig
from shipyard.models.quantized import quantize_weight_int8
from shipyard.package import load_package
from shipyard.package.loading import swap_quantized_layers
from shipyard.package.manifest import Quantization, parse_manifest
from shipyard.train import fit
from shipyard.train.distill import DistillParams, distillation_loss, soft_target_loss


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_int8_weights_by_hand() -> None:
    q, scale = quantize_weight_int8(torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0]]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, -64, 0], [0, 0, 0]]  # -0.635 / 0.01 = -63.5 rounds to -64
    assert scale.tolist() == pytest.approx([0.01, 1.0])  # an all-zero row gets scale 1


def test_int8_linear_matches_the_float_layer_within_half_a_step() -> None:
    torch.manual_seed(0)
    fp = nn.Linear(16, 8)
    q = Int8Linear.from_linear(fp)
    x = torch.randn(4, 3, 16)
    step = fp.weight.abs().amax(dim=1) / 127  # (8,)
    assert (q.dequantized_weight() - fp.weight).abs().le(step[:, None] / 2 + 1e-7).all()
    assert torch.allclose(q(x), fp(x), atol=0.02)
    assert set(q.state_dict()) == {"weight_int8", "weight_scale", "bias"}


def test_dynamic_int8_linear_reloads_bitwise() -> None:
    torch.manual_seed(0)
    fp = nn.Linear(32, 10)
    q = DynamicInt8Linear.from_linear(fp)
    x = torch.randn(5, 32)
    assert torch.allclose(q(x), fp(x), atol=0.05)
    state = q.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # no packed objects
    fresh = DynamicInt8Linear(32, 10)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), q(x))


def test_quantize_linears_leaves_the_tied_lm_head() -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4), 11)
    names = quantize_linears(model, "weight-int8")
    assert names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert isinstance(model.lm_head, nn.Linear)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 11)
    with pytest.raises(CompressError, match="unknown quantization scheme"):
        quantize_linears(model, "int4")


def test_swap_quantized_layers_checks_the_manifest() -> None:
    model = MLP(MLPConfig(hidden_sizes=[4]), 3, 2)
    swap_quantized_layers(
        model, Quantization(scheme="dynamic-int8", layers=["body.0", "head"]), where="m"
    )
    assert isinstance(model.head, DynamicInt8Linear)
    with pytest.raises(PackageError, match="not a layer of the model"):
        swap_quantized_layers(model, Quantization(scheme="weight-int8", layers=["nope"]), where="m")
    with pytest.raises(PackageError, match="a ReLU, not a Linear"):
        swap_quantized_layers(
            model, Quantization(scheme="weight-int8", layers=["body.1"]), where="m"
        )


def test_global_magnitude_pruning() -> None:
    model = MLP(MLPConfig(hidden_sizes=[2]), 2, 1)
    with torch.no_grad():
        model.body[0].weight.copy_(torch.tensor([[1.0, -0.1], [0.5, 3.0]]))
        model.head.weight.copy_(torch.tensor([[0.2, -2.0]]))
    masks = prune_unstructured(model, 0.5)  # 6 weights: the 3 smallest |w| go, over both layers
    assert model.body[0].weight.tolist() == [[1.0, 0.0], [0.0, 3.0]]
    assert model.head.weight.tolist() == [[0.0, -2.0]]
    assert masks["head.weight"].tolist() == [[0.0, 1.0]]
    assert isinstance(model.body[0].weight, nn.Parameter)  # permanent: no weight_orig left
    assert not hasattr(model.body[0], "weight_orig")


def test_structured_pruning_drops_dead_neurons_without_changing_outputs() -> None:
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden_sizes=[4, 2]), 3, 2).eval()
    with torch.no_grad():  # hidden units 1 and 3 of the first layer do nothing
        model.body[0].weight[[1, 3]] = 0.0
        model.body[0].bias[[1, 3]] = 0.0
    x = torch.randn(5, 3)
    small, config, changes = prune_structured(model, model.config, 0.5, (3,), 2)
    assert config.hidden_sizes == [2, 1]
    assert changes["hidden_sizes"] == [[4, 2], [2, 1]]
    assert isinstance(small, MLP) and small.body[0].weight.shape == (2, 3)
    # the first layer lost exactly its dead units, and kept the live ones in order
    assert torch.allclose(small.body[0](x), model.body[0](x)[:, [0, 2]])
    assert torch.equal(small.body[2].weight, model.body[2].weight[:, [0, 2]][small_rows(model)])


def small_rows(model: MLP) -> list[int]:
    """The second hidden layer's unit that structured pruning keeps (the larger score)."""
    w_in, w_out = model.body[2].weight[:, [0, 2]], model.head.weight
    scores = w_in.norm(dim=1) * w_out.norm(dim=0)
    return [int(scores.argmax())]


def test_structured_pruning_of_a_cnn_shrinks_channels() -> None:
    config = CNNConfig(channels=[4, 6], hidden_size=8)
    model = build_model(config, input_shape=(1, 8, 8), num_outputs=3).eval()
    small, new, _ = prune_structured(model, config, 0.5, (1, 8, 8), 3)
    assert new.channels == [2, 3] and new.hidden_size == 4
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(CompressError, match="structured pruning supports mlp, cnn, gpt and llama"):
        enc = EncoderConfig(n_layer=1, n_head=1, n_embd=4, block_size=4)
        prune_structured(build_model(enc, vocab_size=5, num_outputs=2), enc, 0.5, (4,), 2)


def test_structured_pruning_of_a_gpt_drops_dead_mlp_neurons_exactly() -> None:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8)
    model = build_model(config, vocab_size=11).eval()
    with torch.no_grad():  # half of every block's 32 MLP neurons do nothing
        for block in model.transformer.h:  # type: ignore[union-attr]
            block.mlp.c_proj.weight[:, ::2] = 0.0
    idx = torch.randint(0, 11, (3, 8))
    small, new, changes = prune_structured(model, config, 0.5, (8,), 11)
    assert new.mlp_hidden == 16 and changes == {"mlp_hidden": [32, 16]}
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (16, 8)  # type: ignore[union-attr]
    torch.testing.assert_close(small(idx), model(idx), rtol=0, atol=1e-6)
    # the narrower GPT is still GPT-2: the HF config carries the new width
    from shipyard.models.gpt import hf_gpt2_config_kwargs

    assert hf_gpt2_config_kwargs(new, 11)["n_inner"] == 16


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # phi3: fused gate_up_proj
def test_structured_pruning_of_a_llama_drops_dead_units_exactly(model_type: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        model_type=model_type,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=model_type == "llama",
    )
    model = Llama(config, vocab_size=11).eval()
    with torch.no_grad():  # half of every layer's 24 SwiGLU units feed nothing forward
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 1::2] = 0.0
    idx = torch.randint(0, 11, (3, 8))
    small, new, changes = prune_structured(model, config, 0.5, (8,), 11)
    assert isinstance(small, Llama) and new.intermediate_size == 12
    assert changes == {"intermediate_size": [24, 12]}
    assert small.model.layers[0].mlp.down_proj.weight.shape == (16, 12)
    torch.testing.assert_close(small(idx), model(idx), rtol=0, atol=1e-6)
    # what pruning leaves whole is taken over, not copied (an LLM's weights are not doubled)
    kept = small.model.embed_tokens.weight
    assert kept.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if config.tie_word_embeddings:
        assert small.lm_head.weight is kept


def test_soft_target_loss_against_the_formula() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    q = torch.softmax(student / t, -1)
    want = float((p * (p.log() - q.log())).sum()) * t * t
    got = soft_target_loss(student, teacher, "classification", t)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(soft_target_loss(teacher, teacher, "classification", t)) == pytest.approx(0.0)
    hard = torch.tensor(3.0)
    mixed = distillation_loss(student, teacher, hard, "classification", DistillParams(0.25, t))
    assert float(mixed) == pytest.approx(0.25 * want + 0.75 * 3.0, rel=1e-6)
    assert float(soft_target_loss(student, teacher, "regression", t)) == pytest.approx(
        (1 + 4 + 1) / 3
    )
    with pytest.raises(TrainError, match="alpha"):
        DistillParams(alpha=1.5)


def test_manifest_backend_and_quantization_fields() -> None:
    base = {
        "format_version": 1,
        "name": "m",
        "version": "1",
        "task": "regression",
        "created": "2026-01-01T00:00:00Z",
        "architecture": {"name": "mlp", "config": {"name": "mlp"}},
        "signature": {"inputs": [], "outputs": []},
        "data": {},
        "lineage": {
            "config_sha256": "x",
            "data_fingerprint": "y",
            "shipyard_version": "0",
            "torch_version": "0",
        },
        "config": {},
        "files": {"model.safetensors": {"sha256": "0" * 64, "size": 1}},
    }
    plain = parse_manifest(json.dumps(base).encode())
    text = plain.to_json()
    assert '"backend"' not in text and '"quantization"' not in text  # plain manifests unchanged
    onnx = {**base, "backend": "onnxruntime"}
    with pytest.raises(PackageError, match=r"must list model.onnx \(backend 'onnxruntime'\)"):
        parse_manifest(json.dumps(onnx).encode())
    onnx["files"] = {"model.onnx": {"sha256": "0" * 64, "size": 1}}
    assert '"backend": "onnxruntime"' in parse_manifest(json.dumps(onnx).encode()).to_json()
    q = {**base, "quantization": {"scheme": "weight-int8", "layers": ["head"]}}
    assert parse_manifest(json.dumps(q).encode()).quantization.layers == ["head"]  # type: ignore[union-attr]
    with pytest.raises(PackageError, match="quantization describes torch layers"):
        parse_manifest(json.dumps({**onnx, "quantization": q["quantization"]}).encode())


def test_student_config_lays_the_student_over_the_parent() -> None:
    parent = load_config(
        {
            "name": "digits",
            "task": "classification",
            "data": {"source": "builtin:digits"},
            "model": {"name": "mlp", "hidden_sizes": [64]},
            "train": {"max_steps": 10, "epochs": None},
        }
    )
    student = student_config(parent, {"model": {"name": "mlp", "hidden_sizes": [8]}})
    assert student.name == "digits-student"
    assert student.model.hidden_sizes == [8]  # type: ignore[union-attr]
    assert student.data == parent.data and student.train == parent.train
    same = student_config(parent, {"model": {"name": "mlp"}, "data": {"source": "builtin:digits"}})
    assert same.data == parent.data
    with pytest.raises(CompressError, match="seed differs from the teacher"):
        student_config(parent, {"model": {"name": "mlp"}, "seed": 3})
    with pytest.raises(CompressError, match="needs at least a model"):
        student_config(parent, {"train": {}})


def test_a_package_of_a_run_on_a_pretrained_model_can_be_compressed(
    package_src: Path, tmp_path: Path
) -> None:
    # the run's config names model "pretrained": compress rebuilds its data from the package
    # (block size, tokenizer), as training did, to measure quality on the same held-out split
    config = load_config(
        {
            "name": "ft",
            "task": "regression",
            "data": {"source": "builtin:synthetic-regression", "n_samples": 200, "n_features": 4},
            "model": {"name": "pretrained", "path": str(package_src)},
            "train": {"epochs": None, "max_steps": 2, "batch_size": 16},
        }
    )
    package = fit(config, run_dir=tmp_path / "run", progress=False).run_dir / "package"
    assert load_package(package).manifest.config["model"]["name"] == "pretrained"
    bench = BenchParams(latency_calls=1, throughput_calls=1, batch_size=2, warmup=1, rounds=1)
    result = quantize(package, tmp_path / "int8", "int8", bench=bench)
    parent, child = result.report["parent"]["quality"], result.report["child"]["quality"]
    assert child and set(child) == set(parent)
    assert load_package(result.package).manifest.quantization is not None


def test_trainer_hooks_keep_masks_and_take_a_teacher(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from shipyard.train import best_checkpoint, fit
    from shipyard.train.checkpoint import load_weights

    config = load_config(
        {
            "name": "hooks",
            "task": "classification",
            "data": {"source": "builtin:digits"},
            "model": {"name": "mlp", "hidden_sizes": [8]},
            "train": {"epochs": None, "max_steps": 5, "batch_size": 32},
        }
    )
    torch.manual_seed(0)
    start = build_model(config.model, input_shape=(1, 8, 8), num_outputs=10)
    masks = prune_unstructured(start, 0.7)
    state = {k: v.clone() for k, v in start.state_dict().items()}
    fit(config, run_dir=tmp_path / "ft", init_weights=state, weight_masks=masks)
    tuned = build_model(config.model, input_shape=(1, 8, 8), num_outputs=10)
    load_weights(best_checkpoint(tmp_path / "ft"), tuned)
    for name, mask in masks.items():
        weight = tuned.get_parameter(name)
        assert bool((weight[mask == 0] == 0).all())
        assert not torch.equal(weight, state[name])  # it did train
    result = fit(config, run_dir=tmp_path / "kd", teacher=tuned, distill=DistillParams(0.5, 2.0))
    assert result.steps == 5 and math.isfinite(result.metrics["val"]["loss"])
    with pytest.raises(TrainError, match="without a teacher"):
        fit(config, run_dir=tmp_path / "x", distill=DistillParams())


def test_markdown_table() -> None:
    assert markdown_table([["a", "b"], ["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |\n"
