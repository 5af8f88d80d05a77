"""Model zoo: configs, build_model, shapes, GPT causality, KV cache, GPT-2 parity, encoder masks."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from shipyard.errors import ModelError
from shipyard.models import (
    CAUSAL_MODELS,
    FAMILIES,
    LANGUAGE_MODELS,
    MLP,
    MODEL_NAMES,
    TOKEN_MODELS,
    CNNConfig,
    EncoderConfig,
    GPTConfig,
    MLPConfig,
    ModelConfig,
    ModelFamily,
    build_model,
    count_parameters,
)
from shipyard.models.gpt import (
    GPT,
    Block,
    KVCache,
    from_hf_gpt2_state_dict,
    hf_gpt2_config_kwargs,
    to_hf_gpt2_state_dict,
)

MODEL_CONFIG: TypeAdapter[MLPConfig | CNNConfig | GPTConfig | EncoderConfig] = TypeAdapter(
    ModelConfig
)

# litgpt-style tiny GPT: hand-sized, fast, and still exercises multi-head attention.
TINY_GPT = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=16)
TINY_VOCAB = 50


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_gpt(**overrides: object) -> GPT:
    return GPT(TINY_GPT.model_copy(update=overrides), TINY_VOCAB).eval()


# --- registry and configs -------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(MODEL_NAMES) == {"mlp", "cnn", "gpt", "encoder", "llama", "rnn"}
    assert set(CAUSAL_MODELS) == {"gpt", "llama"}
    assert set(TOKEN_MODELS) == {"gpt", "encoder", "llama", "rnn"}
    assert set(LANGUAGE_MODELS) == {"gpt", "llama", "rnn"}


def test_language_models_come_from_the_registry() -> None:
    # rnn says so at registration; a causal LM trains as a language model without saying it
    assert FAMILIES["rnn"].trains_as_lm and not FAMILIES["rnn"].causal_lm
    assert FAMILIES["gpt"].trains_as_lm and not FAMILIES["encoder"].trains_as_lm
    family = ModelFamily("toy", MLPConfig, build_model, causal_lm=True)
    assert family.trains_as_lm


def test_config_dispatches_on_name() -> None:
    cfg = MODEL_CONFIG.validate_python({"name": "cnn", "channels": [4]})
    assert isinstance(cfg, CNNConfig)
    assert cfg.channels == [4]


def test_unknown_key_rejected() -> None:
    with pytest.raises(ValidationError, match="hiden_sizes"):
        MODEL_CONFIG.validate_python({"name": "mlp", "hiden_sizes": [3]})


def test_unknown_model_name_rejected() -> None:
    with pytest.raises(ValidationError):
        MODEL_CONFIG.validate_python({"name": "resnet"})


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "mlp", "hidden_sizes": [0]},
        {"name": "mlp", "dropout": 1.0},
        {"name": "cnn", "channels": []},
        {"name": "gpt", "n_layer": 0},
    ],
)
def test_out_of_range_values_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MODEL_CONFIG.validate_python(bad)


@pytest.mark.parametrize("name", ["gpt", "encoder"])
def test_heads_must_divide_width(name: str) -> None:
    with pytest.raises(ValidationError, match=r"n_embd=10.*n_head=4"):
        MODEL_CONFIG.validate_python({"name": name, "n_embd": 10, "n_head": 4})


# --- build_model: shapes and missing arguments ---------------------------------------------


def test_mlp_forward_shape_and_flattening() -> None:
    model = build_model(
        MLPConfig(hidden_sizes=[5], norm="layer"), input_shape=(2, 3), num_outputs=4
    )
    assert model(torch.randn(7, 2, 3)).shape == (7, 4)


def test_mlp_parameter_count_by_hand() -> None:
    model = build_model(MLPConfig(hidden_sizes=[3]), input_shape=(4,), num_outputs=2)
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2  # 23


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = build_model(MLPConfig(hidden_sizes=[]), input_shape=(4,), num_outputs=1)
    assert count_parameters(model) == 4 + 1


def test_count_trainable_only() -> None:
    model = MLP(MLPConfig(hidden_sizes=[3]), in_features=4, out_features=2)
    for p in model.body.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 * 2 + 2


@pytest.mark.parametrize(
    ("input_shape", "batch_shape"),
    [((64,), (5, 64)), ((8, 8), (5, 8, 8)), ((3, 28, 28), (5, 3, 28, 28)), ((1, 5, 7), (5, 35))],
)
def test_cnn_forward_shapes(input_shape: tuple[int, ...], batch_shape: tuple[int, ...]) -> None:
    cfg = CNNConfig(channels=[4, 8], hidden_size=16, batch_norm=True, dropout=0.1)
    model = build_model(cfg, input_shape=input_shape, num_outputs=10)
    assert model(torch.randn(*batch_shape)).shape == (5, 10)


def test_cnn_rejects_non_square_flat_input() -> None:
    with pytest.raises(ModelError, match="perfect square"):
        build_model(CNNConfig(), input_shape=(10,), num_outputs=2)


def test_gpt_forward_shape() -> None:
    model = build_model(TINY_GPT, vocab_size=TINY_VOCAB)
    assert model(torch.randint(0, TINY_VOCAB, (3, 16))).shape == (3, 16, TINY_VOCAB)


def test_encoder_forward_shape() -> None:
    cfg = EncoderConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, pooling="cls")
    model = build_model(cfg, vocab_size=20, num_outputs=3)
    assert model(torch.randint(1, 20, (4, 9))).shape == (4, 3)


@pytest.mark.parametrize(
    ("config", "kwargs", "missing"),
    [
        (MLPConfig(), {"input_shape": (4,)}, "num_outputs"),
        (MLPConfig(), {"num_outputs": 2}, "input_shape"),
        (CNNConfig(), {"num_outputs": 2}, "input_shape"),
        (GPTConfig(), {}, "vocab_size"),
        (EncoderConfig(), {"vocab_size": 10}, "num_outputs"),
    ],
)
def test_missing_build_argument_is_named(
    config: MLPConfig | CNNConfig | GPTConfig | EncoderConfig,
    kwargs: dict[str, object],
    missing: str,
) -> None:
    with pytest.raises(ModelError, match=missing):
        build_model(config, **kwargs)  # type: ignore[arg-type]


def test_vocab_from_config_and_conflicts() -> None:
    model = build_model(TINY_GPT.model_copy(update={"vocab_size": 30}))
    assert isinstance(model, GPT)
    assert model.vocab_size == 30
    with pytest.raises(ModelError, match=r"vocab_size=30.*vocab_size=40"):
        build_model(TINY_GPT.model_copy(update={"vocab_size": 30}), vocab_size=40)


def test_unknown_config_object_rejected() -> None:
    with pytest.raises(ModelError, match="known models"):
        build_model(object())


# --- GPT ------------------------------------------------------------------------------------


def test_gpt_is_causal() -> None:
    model = tiny_gpt()
    idx = torch.randint(0, TINY_VOCAB, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % TINY_VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_gpt_kv_cache_prefill_then_decode_matches_full_forward() -> None:
    model = tiny_gpt()
    idx = torch.randint(0, TINY_VOCAB, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache()
        steps = [model(idx[:, :5], kv_cache=cache)]  # prefill 5 tokens
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(5, 9)]  # one at a time
        steps.append(model(idx[:, 9:], kv_cache=cache))  # a multi-token chunk after a cache
    assert cache.seq_len == 12
    assert isinstance(cache.keys[0], torch.Tensor)
    assert cache.keys[0].shape == (2, 2, 12, 4)  # (B, nh, T_cached, hs)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_gpt_left_padded_batch_with_positions_and_mask() -> None:
    """A left-padded row decoded in a batch gives the same logits as that row alone."""
    model = tiny_gpt()
    short, long = torch.randint(1, TINY_VOCAB, (1, 4)), torch.randint(1, TINY_VOCAB, (1, 7))
    pad = 3
    idx = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])  # (2, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :pad] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # pads at 0, real tokens from 0
    nxt = torch.randint(1, TINY_VOCAB, (2, 1))
    with torch.no_grad():
        cache = KVCache(TINY_GPT.n_layer)
        out = model(idx, kv_cache=cache, positions=positions, attention_mask=mask)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)  # (2, 8)
        step = model(nxt, kv_cache=cache, positions=positions[:, -1:] + 1, attention_mask=mask2)
        ref_short = model(torch.cat([short, nxt[:1]], 1))
        ref_long = model(torch.cat([long, nxt[1:]], 1))
    assert (out[0, pad:] - ref_short[0, :4]).abs().max().item() < 1e-5
    assert (step[0, 0] - ref_short[0, 4]).abs().max().item() < 1e-5
    assert (out[1] - ref_long[0, :7]).abs().max().item() < 1e-5
    assert (step[1, 0] - ref_long[0, 7]).abs().max().item() < 1e-5
    assert torch.isfinite(out).all()


def test_gpt_too_long_raises() -> None:
    model = tiny_gpt()
    with pytest.raises(ModelError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_kv_cache()
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ModelError, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_gpt_weight_tying_and_counts() -> None:
    tied, untied = tiny_gpt(), tiny_gpt(tie_weights=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    embed = TINY_VOCAB * 8
    assert untied.num_parameters() - tied.num_parameters() == embed
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 16 * 8
    n = tied.num_parameters(exclude_embeddings=True)
    assert tied.flops_per_token() == 6 * n + 12 * 2 * 2 * 4 * 16


def test_gpt_init_scales_residual_projections() -> None:
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128), vocab_size=100)
    block = model.transformer.h[0]
    assert isinstance(block, Block)
    std = block.mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)


# --- GPT-2 parity with Hugging Face transformers --------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}, {"bias": False}])
def test_matches_hf_gpt2(overrides: dict[str, object]) -> None:
    transformers = pytest.importorskip("transformers")
    config = TINY_GPT.model_copy(update=overrides)
    ours = GPT(config, TINY_VOCAB).eval()
    with torch.no_grad():  # non-zero LayerNorm affine params so they are checked too
        for name, p in ours.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**hf_gpt2_config_kwargs(config, TINY_VOCAB))
    ).eval()
    hf.load_state_dict(to_hf_gpt2_state_dict(ours), strict=True)
    idx = torch.randint(0, TINY_VOCAB, (2, 16))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5


def test_loads_hf_gpt2_weights() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**hf_gpt2_config_kwargs(TINY_GPT, TINY_VOCAB))
    ).eval()
    ours = from_hf_gpt2_state_dict(hf.state_dict(), TINY_GPT).eval()
    assert ours.vocab_size == TINY_VOCAB
    idx = torch.randint(0, TINY_VOCAB, (2, 16))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5


def test_hf_roundtrip_without_transformers() -> None:
    """to_hf -> from_hf gives back the same weights, with or without the old buffers."""
    ours = tiny_gpt()
    sd = to_hf_gpt2_state_dict(ours)
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # legacy causal-mask buffer
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    back = from_hf_gpt2_state_dict(sd, TINY_GPT)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_from_hf_rejects_mismatched_config() -> None:
    sd = to_hf_gpt2_state_dict(tiny_gpt())
    with pytest.raises(ModelError, match="do not fit"):
        from_hf_gpt2_state_dict(sd, TINY_GPT.model_copy(update={"n_layer": 3}))


# --- encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_padding_does_not_change_output(pooling: Literal["mean", "cls"]) -> None:
    cfg = EncoderConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, pooling=pooling)
    model = build_model(cfg, vocab_size=20, num_outputs=3).eval()
    tokens = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]])  # pad id 0; an all-pad row
    with torch.no_grad():
        a, b = model(tokens), model(padded)
    assert (a[0] - b[0]).abs().max().item() < 1e-5
    assert torch.isfinite(b).all()


def test_encoder_is_bidirectional() -> None:
    cfg = EncoderConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, pooling="cls")
    model = build_model(cfg, vocab_size=20, num_outputs=3).eval()
    with torch.no_grad():
        a = model(torch.tensor([[5, 6, 7]]))
        b = model(torch.tensor([[5, 6, 8]]))
    assert not torch.allclose(a, b)  # the first token's state sees the last token
