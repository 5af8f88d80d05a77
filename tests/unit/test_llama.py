"""The Llama-family model against `transformers` on tiny random configs (built here, no download):
logits, KV-cache decoding, left-padded batches, greedy generation, sliding windows, config.json
round trips, meta-device construction and the one-line errors."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import ModelError
from shipyard.generate import Engine, SamplingParams, generate
from shipyard.generate.cache import BatchKVCache
from shipyard.models import (
    CAUSAL_MODELS,
    TOKEN_MODELS,
    Llama,
    LlamaConfig,
    build_model,
    config_from_hf,
    hf_config_from,
    is_language_model,
)
from shipyard.models.llama import llama_from_state_dict

transformers = pytest.importorskip("transformers")

VOCAB = 100
MAX_POS = 48  # prompts go past it, so the scaled RoPE types (dynamic above all) are exercised
TOK = Tokenizer.byte()  # ids < VOCAB decode to bytes; generation never stops on EOS here
pytestmark = pytest.mark.usefixtures("one_thread")

BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POS,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
# What makes each family itself, in its smallest form.
FAMILY: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {"head_dim": 32},  # explicit head_dim, unlike hidden_size / heads = 16
    "phi3": {"partial_rotary_factor": 0.5},
}
ROPES: dict[str, dict[str, Any]] = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {  # Phi-3 128k / Phi-3.5: one factor per rotated channel pair
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.3, 1.5],
        "long_factor": [1.0, 2.0, 3.0, 4.0],
        "original_max_position_embeddings": 16,
    },
}
# Phi-3 in transformers takes only the default RoPE and longrope; longrope is tested there.
PHI3_ROPES = ("default", "longrope")
CASES = [
    (family, rope, tied)
    for family in FAMILY
    for rope in ROPES
    if ((rope in PHI3_ROPES) if family == "phi3" else (rope != "longrope"))
    for tied in (True, False)
]
# Dynamic NTK and LongRoPE change every position's rotation once the context passes a length,
# but a cached key keeps the rotation it was written with, so decoding equals a full forward
# only up to there (as in transformers' model; its generate() re-prefills LongRoPE there).
SCALE_FREE_LENGTH = {"dynamic": MAX_POS, "longrope": 16}
IDS = [f"{f}-{r}-{'tied' if t else 'untied'}" for f, r, t in CASES]


def hf_kwargs(family: str, rope: str, tied: bool) -> dict[str, Any]:
    """config.json keys of a case; untied cases use the legacy rope_theta/rope_scaling form,
    tied ones transformers-5 rope_parameters, so both readers are covered."""
    kw = {**BASE, **FAMILY[family], "tie_word_embeddings": tied}
    if family == "llama" and not tied:
        kw.update(attention_bias=True, mlp_bias=True)
    if family == "qwen3" and not tied:
        kw.update(attention_bias=True)
    if rope == "longrope":  # Phi-3 reads it from the top level before the RoPE dict
        kw["original_max_position_embeddings"] = ROPES[rope]["original_max_position_embeddings"]
        kw["max_position_embeddings"] = 64  # room for a prompt past 16 and 32 new tokens
    theta = 500.0  # small base: short test prompts still turn the slow channels
    if tied:
        kw["rope_parameters"] = {"rope_type": "default", **ROPES[rope], "rope_theta": theta}
    else:
        kw["rope_theta"] = theta
        kw["rope_scaling"] = dict(ROPES[rope]) or None
    return kw


@functools.cache
def hf_model(family: str, rope: str, tied: bool) -> Any:
    """A random transformers model of the case, with every weight (norms, biases) randomised."""
    config = transformers.AutoConfig.for_model(family, **hf_kwargs(family, rope, tied))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def ours(family: str, rope: str, tied: bool, from_saved: bool = True) -> Llama:
    """Our model of the case, from transformers' saved config (or the kwargs as written)."""
    hf = hf_model(family, rope, tied)
    source = hf.config.to_dict() if from_saved else hf_kwargs(family, rope, tied)
    config = config_from_hf({**source, "model_type": family})
    model = Llama(config).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


@pytest.mark.parametrize(("family", "rope", "tied"), CASES, ids=IDS)
def test_logits_match_transformers(family: str, rope: str, tied: bool) -> None:
    hf = hf_model(family, rope, tied)
    for from_saved in (True, False):
        model = ours(family, rope, tied, from_saved)
        assert model.config.tie_word_embeddings is tied
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
        with torch.no_grad():
            for n in (1, 7, 30, 60):
                idx = torch.cat([prompt(n, 1), prompt(n, 2)])  # (2, n)
                want = hf(idx).logits
                got = model(idx)
                assert got.shape == (2, n, VOCAB)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("family", "rope", "tied"), CASES, ids=IDS)
def test_kv_cache_decoding_equals_full_forward(family: str, rope: str, tied: bool) -> None:
    model = ours(family, rope, tied)
    n = SCALE_FREE_LENGTH.get(rope, 60)
    idx = prompt(n, 3)
    with torch.no_grad():
        full = model(idx)
        for cache in (model.new_kv_cache(), BatchKVCache(model.n_layer)):
            steps = [model(idx[:, :10], kv_cache=cache)]
            steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(10, n)]
            assert cache.seq_len == n
            assert cache.keys[0] is not None and cache.keys[0].shape[1] == 2  # n_kv heads
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("family", "rope", "tied"), CASES, ids=IDS)
def test_left_padded_batch_equals_solo(family: str, rope: str, tied: bool) -> None:
    model = ours(family, rope, tied)
    lengths, steps = [5, 14, 9], 12  # longest row ends past the sliding window of 8
    rows = [prompt(n, 10 + i)[0] for i, n in enumerate(lengths)]
    S = max(lengths)
    idx = torch.zeros(len(rows), S, dtype=torch.long)
    pads = torch.tensor([S - n for n in lengths])
    for i, r in enumerate(rows):
        idx[i, S - len(r) :] = r
    positions = (torch.arange(S)[None, :] - pads[:, None]).clamp(min=0)  # (B, S)
    cache = BatchKVCache(model.n_layer)
    with torch.no_grad():
        mask = torch.arange(S)[None, :] >= pads[:, None]  # (B, S)
        batch_logits = [model(idx, kv_cache=cache, positions=positions, attention_mask=mask)]
        nxt = batch_logits[-1][:, -1].argmax(-1)  # (B,)
        fed = [nxt]
        for t in range(1, steps):
            mask = torch.arange(S + t)[None, :] >= pads[:, None]
            pos = (S + t - 1 - pads)[:, None]
            out = model(nxt[:, None], kv_cache=cache, positions=pos, attention_mask=mask)
            batch_logits.append(out)
            nxt = out[:, -1].argmax(-1)
            fed.append(nxt)
        for i, r in enumerate(rows):
            solo_cache = model.new_kv_cache()  # prefill, then one token at a time
            solo_steps = [model(r[None], kv_cache=solo_cache)[0]]
            for t in range(steps - 1):
                solo_steps.append(model(fed[t][i].view(1, 1), kv_cache=solo_cache)[0])
            solo = torch.cat(solo_steps)  # (n + steps - 1, V)
            got = torch.cat([batch_logits[0][i, S - len(r) :], *(b[i] for b in batch_logits[1:])])
            torch.testing.assert_close(got, solo, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("family", "rope", "tied"), CASES, ids=IDS)
def test_greedy_generation_matches_transformers(family: str, rope: str, tied: bool) -> None:
    hf = hf_model(family, rope, tied)
    # transformers' generate() re-prefills a LongRoPE model when it crosses the original
    # length (16 here); shipyard keeps its cache, so that prompt starts past the switch.
    n = 20 if rope == "longrope" else 6
    idx = prompt(n, 4)
    with torch.no_grad():
        want = hf.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            eos_token_id=None,
            pad_token_id=0,
        )[0, n:].tolist()
    params = SamplingParams(max_tokens=32, temperature=0.0, stop_on_eos=False)
    got = generate(ours(family, rope, tied), TOK, idx[0].tolist(), params)
    assert got.token_ids == want


def test_engine_batches_llama_like_solo_generation() -> None:
    """Continuous batching over a GQA + sliding-window model: each request's tokens equal the
    solo greedy run's, though requests join and leave the batch at different times."""
    model = ours("qwen2", "llama3", False)
    prompts = [prompt(n, 20 + n)[0].tolist() for n in (3, 11, 6, 17)]
    lengths = [20, 9, 14, 5]
    solo = [
        generate(model, TOK, p, SamplingParams(max_tokens=m, temperature=0.0, stop_on_eos=False))
        for p, m in zip(prompts, lengths, strict=True)
    ]
    with Engine(model, TOK, max_batch_size=3, prefill_chunk=4) as engine:
        streams = [
            engine.submit_sync(p, SamplingParams(max_tokens=m, temperature=0.0, stop_on_eos=False))
            for p, m in zip(prompts, lengths, strict=True)
        ]
        results = [s.result() for s in streams]
    assert [r.token_ids for r in results] == [s.token_ids for s in solo]


def test_sliding_window_is_respected() -> None:
    """Mistral, window 8, 2 layers: position p sees tokens > p - 8 directly and > p - 15 through
    the layer below; changing token 3 changes position 10 but not positions >= 18."""
    model = ours("mistral", "default", True)
    assert model.config.sliding_window == 8
    idx = prompt(30, 5)
    changed = idx.clone()
    changed[0, 3] = (idx[0, 3] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert not torch.allclose(a[0, 10], b[0, 10])
    torch.testing.assert_close(a[0, 18:], b[0, 18:], atol=0, rtol=0)
    # Without the window every later position would change.
    full = Llama(model.config.model_copy(update={"sliding_window": None})).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full(idx)[0, 20], full(changed)[0, 20])


def test_longrope_picks_factors_per_row() -> None:
    """A row past original_max_position_embeddings (16) uses the long factors; a short row in
    the same batch keeps the short ones, as it would alone."""
    model = ours("phi3", "longrope", True)
    short, long = prompt(5, 8), prompt(20, 9)
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0, 15:], batch[1] = short[0], long[0]
    positions = torch.stack([(torch.arange(20) - 15).clamp(min=0), torch.arange(20)])
    mask = torch.arange(20)[None, :] >= torch.tensor([[15], [0]])
    with torch.no_grad():
        got = model(batch, positions=positions, attention_mask=mask)
        torch.testing.assert_close(got[0, 15:], model(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], model(long)[0], atol=1e-5, rtol=0)
        cos_long, _ = model._rope(torch.arange(20)[None], torch.float32)  # (1, 1, 20, rot)
        cos_short, _ = model._rope(torch.arange(4)[None], torch.float32)
    assert not torch.allclose(cos_long[0, 0, 3], cos_short[0, 0, 3])  # position 3, two scales


def test_qwen_window_only_on_the_layers_layer_types_name() -> None:
    config = ours("qwen2", "default", True).config
    assert config.layer_types == ["full_attention", "sliding_attention"]
    assert [config.sliding_window_of(i) for i in range(2)] == [None, 8]


@pytest.mark.parametrize("family", list(FAMILY))
def test_hf_config_round_trip_loads_in_transformers(family: str) -> None:
    model = ours(family, "longrope" if family == "phi3" else "yarn", False)
    written = hf_config_from(model.config)
    assert written["architectures"] == [type(hf_model(family, "default", True)).__name__]
    assert config_from_hf(written) == model.config
    config = transformers.AutoConfig.for_model(**written)
    assert config_from_hf(config.to_dict()) == model.config
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf.load_state_dict(model.state_dict(), strict=True)
    idx = prompt(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model(idx), atol=1e-4, rtol=0)


def test_meta_device_build_then_assign() -> None:
    source = ours("llama", "default", True)
    with torch.device("meta"):
        model = Llama(source.config)
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())  # nothing that a weights file would not restore
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    idx = prompt(12, 7)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), source(idx), atol=0, rtol=0)


def test_llama_from_state_dict_assigns_without_copies() -> None:
    source = ours("qwen3", "default", True)
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model = llama_from_state_dict(source.config, state).eval()
    assigned = model.model.layers[1].self_attn.q_norm.weight
    assert assigned.data_ptr() == state["model.layers.1.self_attn.q_norm.weight"].data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    idx = prompt(9, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), source(idx), atol=0, rtol=0)
    bf16 = llama_from_state_dict(source.config, {k: v.bfloat16() for k, v in state.items()})
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16(idx).dtype == torch.bfloat16
    del state["model.norm.weight"]
    state["model.layers.0.mlp.extra"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"missing \['model.norm.weight'\], unexpected"):
        llama_from_state_dict(source.config, state)


def test_bf16_autocast_keeps_the_cache_in_bf16() -> None:
    model = ours("qwen3", "default", False)
    idx = prompt(12, 8)
    cache = model.new_kv_cache()
    with torch.no_grad():
        want = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(idx, kv_cache=cache)
    assert cache.keys[0] is not None and cache.keys[0].dtype == torch.bfloat16  # half the bytes
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_registry_knows_llama() -> None:
    assert "llama" in CAUSAL_MODELS and "llama" in TOKEN_MODELS
    model = build_model(LlamaConfig(num_hidden_layers=1), vocab_size=50)
    assert isinstance(model, Llama) and is_language_model(model)
    assert model.max_context == 128 and model.n_layer == 1 and model.vocab_size == 50
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 50)


def test_builder_refuses_a_config_vocab_that_differs_from_the_tokenizers() -> None:
    with pytest.raises(ModelError) as err:
        build_model(LlamaConfig(num_hidden_layers=1, vocab_size=40), vocab_size=50)
    msg = str(err.value)
    assert "\n" not in msg and "vocab_size=40" in msg and "vocab_size=50" in msg
    assert "remove model.vocab_size" in msg
    assert build_model(LlamaConfig(num_hidden_layers=1, vocab_size=40)).vocab_size == 40


def test_unknown_model_type_is_one_line_error() -> None:
    with pytest.raises(ModelError) as err:
        config_from_hf({"model_type": "gemma2", "hidden_size": 64})
    msg = str(err.value)
    assert "\n" not in msg and "'gemma2'" in msg
    assert "llama, mistral, qwen2, qwen3, phi3" in msg


@pytest.mark.parametrize(
    ("hf", "words"),
    [
        ({"rope_scaling": {"rope_type": "su-per", "factor": 2.0}}, ["'su-per'", "longrope"]),
        ({"rope_scaling": {"rope_type": "longrope"}}, ["short_factor, long_factor"]),
        ({"hidden_act": "gelu"}, ["'gelu'", "silu"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor"]),
        ({"num_key_value_heads": 3}, ["multiple of num_key_value_heads"]),
    ],
)
def test_bad_config_json_is_one_line_error(hf: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ModelError) as err:
        config_from_hf({**BASE, "model_type": "llama", **hf})
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_options_a_family_cannot_express_are_refused() -> None:
    with pytest.raises(ValueError, match="model_type 'qwen2' has qkv_bias=True, o_bias=False"):
        LlamaConfig(model_type="qwen2")
    with pytest.raises(ValueError, match="sliding window"):
        LlamaConfig(sliding_window=4)
    with pytest.raises(ModelError, match="vocab_size"):
        Llama(LlamaConfig())
