"""Llama: the decoder-only LLM family of Llama, Mistral, Qwen2, Qwen3 and Phi-3, in one file.

Token embedding, pre-RMSNorm blocks (grouped-query self-attention with rotary position
embeddings, SwiGLU MLP), a final RMSNorm and a language-model head (tied to the embedding or not).
The families differ only in details, all read from a Hugging Face `config.json` by
`config_from_hf` and written back by `hf_config_from`:

- q/k/v biases (Qwen2), biases everywhere (Llama `attention_bias`, `mlp_bias`);
- per-head RMSNorm of queries and keys before RoPE (Qwen3);
- a sliding attention window, on every layer (Mistral, Phi-3) or per `layer_types` (Qwen);
- fused `qkv_proj` and `gate_up_proj` projections and partial rotary embeddings (Phi-3);
- RoPE scaling: default, linear, llama3, yarn, dynamic (NTK).

Parameter names are Hugging Face's (`model.embed_tokens.weight`,
`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`) and so is the RoPE layout
(`rotate_half`: the first half of each head's channels pairs with the second half), so a
checkpoint's state dict loads as it is, and exports as it is.

Incremental decoding works as in `GPT`: pass a `KVCache`; the cache holds the rotated keys of
`num_key_value_heads` heads. For left-padded batches pass `positions` and `attention_mask`.
The model has no buffers, so building it under `torch.device("meta")` costs nothing; assign the
weights with `load_state_dict(..., assign=True)` and call `tie_weights()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import nn

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.attention import NativeKernels, attention
from shipyard.models.protocol import (
    KVCache,
    check_segments,
    segment_attention_mask,
    segment_runs,
    window_attention_mask,
)

ModelType = Literal["llama", "mistral", "qwen2", "qwen3", "phi3"]
RopeType = Literal["default", "linear", "llama3", "yarn", "dynamic", "longrope"]
LayerType = Literal["full_attention", "sliding_attention"]

MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
ROPE_TYPES: tuple[str, ...] = get_args(RopeType)

# The transformers class each model_type loads as (config.json "architectures").
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


class RopeParameters(StrictModel):
    """Rotary embedding settings, named as in transformers' `rope_parameters`.

    Only the fields of `rope_type` are used: linear and dynamic read `factor`; llama3 reads
    `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`; yarn
    reads `factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`,
    `attention_factor`, `mscale`, `mscale_all_dim`, `truncate`; longrope (Phi-3 128k, Phi-3.5)
    reads `short_factor`, `long_factor` (one per rotated channel pair),
    `original_max_position_embeddings`, `factor`, `attention_factor`.
    """

    rope_type: RopeType = "default"
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    factor: float | None = Field(None, gt=0)
    original_max_position_embeddings: int | None = Field(None, gt=0)
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None

    @model_validator(mode="after")
    def _has_its_fields(self) -> RopeParameters:
        need = {
            "linear": ("factor",),
            "dynamic": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
            "yarn": (),  # factor may come from max_position_embeddings / original
            "longrope": ("short_factor", "long_factor"),
        }.get(self.rope_type, ())
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"rope_type {self.rope_type!r} needs {', '.join(missing)} in rope parameters"
            )
        return self


class LlamaConfig(StrictModel):
    """Config of a Llama-family decoder (Hugging Face field names where there is one)."""

    name: Literal["llama"] = "llama"
    model_type: ModelType = Field(
        "llama", description="the Hugging Face family: llama, mistral, qwen2, qwen3 or phi3"
    )
    vocab_size: int | None = Field(None, gt=0, description="None = taken from the tokenizer")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(352, gt=0, description="SwiGLU MLP width")
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(
        None, gt=0, description="grouped-query attention; None = num_attention_heads"
    )
    head_dim: int | None = Field(None, gt=0, description="None = hidden_size / heads")
    max_position_embeddings: int = Field(
        128, gt=0, description="context length (tokens); training windows use it too"
    )
    rms_norm_eps: float = Field(1e-6, gt=0)
    rope: RopeParameters = Field(default_factory=RopeParameters)
    partial_rotary_factor: float = Field(
        1.0, gt=0, le=1, description="fraction of each head's channels that rotate (phi3)"
    )
    tie_word_embeddings: bool = Field(True, description="lm_head shares the token embedding")
    qkv_bias: bool = Field(False, description="biases on q/k/v projections (qwen2)")
    o_bias: bool = Field(False, description="bias on the attention output projection")
    mlp_bias: bool = Field(False, description="biases in the MLP (llama mlp_bias)")
    sliding_window: int | None = Field(
        None, gt=0, description="attend only to the last this-many tokens (mistral)"
    )
    layer_types: list[LayerType] | None = Field(
        None, description="per layer; None = every layer slides when sliding_window is set"
    )
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    initializer_range: float = Field(0.02, gt=0, description="std of the random init")
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of the checkpoint's weights (informational)"
    )

    @property
    def block_size(self) -> int:
        """Context length; what the trainer and data pipeline call a token window."""
        return self.max_position_embeddings

    @property
    def kv_heads(self) -> int:
        """Key/value heads (num_key_value_heads, or every query head)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Channels per attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ones)."""
        return int(self.head_size * self.partial_rotary_factor)

    @model_validator(mode="after")
    def _consistent(self) -> LlamaConfig:
        h, kv = self.num_attention_heads, self.kv_heads
        if h % kv != 0:
            raise ValueError(
                f"num_attention_heads ({h}) must be a multiple of num_key_value_heads ({kv})"
            )
        if self.head_dim is None and self.hidden_size % h != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({h}), or set head_dim"
            )
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"head_dim x partial_rotary_factor must be an even number >= 2, got "
                f"{self.head_size} x {self.partial_rotary_factor}"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        _check_family_layout(self)
        return self

    def sliding_window_of(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


def _check_family_layout(c: LlamaConfig) -> None:
    """Refuse options the Hugging Face class of `c.model_type` cannot express."""
    t = c.model_type
    allowed_bias = {
        "llama": {(False, False), (True, True)},  # attention_bias: q, k, v and o together
        "qwen3": {(False, False), (True, True)},
        "qwen2": {(True, False)},  # q, k, v always biased, o never
        "mistral": {(False, False)},
        "phi3": {(False, False)},
    }[t]
    if (c.qkv_bias, c.o_bias) not in allowed_bias:
        ok = " or ".join(f"qkv_bias={a}, o_bias={b}" for a, b in sorted(allowed_bias))
        raise ValueError(f"model_type {t!r} has {ok}, got qkv_bias={c.qkv_bias}, o_bias={c.o_bias}")
    if c.mlp_bias and t != "llama":
        raise ValueError(f"mlp_bias is only available for model_type 'llama', not {t!r}")
    if c.partial_rotary_factor != 1.0 and t != "phi3":
        raise ValueError(
            f"partial_rotary_factor is only available for model_type 'phi3', not {t!r}"
        )
    if t == "phi3" and c.rope.rope_type not in ("default", "longrope"):
        raise ValueError(
            f"model_type 'phi3' supports rope_type 'default' or 'longrope', not "
            f"{c.rope.rope_type!r}"
        )
    rp = c.rope
    for name in ("short_factor", "long_factor"):
        factors = getattr(rp, name)
        if factors is not None and len(factors) != c.rotary_dim // 2:
            raise ValueError(
                f"rope {name} has {len(factors)} entries but the rotated channels form "
                f"{c.rotary_dim // 2} pairs"
            )
    if c.sliding_window is not None and t == "llama":
        raise ValueError("model_type 'llama' has no sliding window; use mistral or qwen2")
    if c.layer_types is not None and t not in ("qwen2", "qwen3"):
        raise ValueError(f"layer_types is only available for qwen2/qwen3, not {t!r}")


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim / 2,) fp32 on CPU and the cos/sin scale, as transformers.

    seq_len: 1 + the largest position of the call (of the row, for longrope). Dynamic NTK
    grows the base once it exceeds max_position_embeddings; longrope switches from the short to
    the long factors once it exceeds original_max_position_embeddings.
    """
    rp = config.rope
    base, dim = rp.rope_theta, config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (dim/2,)
    scaling = 1.0
    if rp.rope_type == "dynamic":
        assert rp.factor is not None
        mpe = config.max_position_embeddings
        n = torch.tensor(max(seq_len or mpe, mpe))
        base_t = base * ((rp.factor * n / mpe) - (rp.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base_t**exponents), scaling
    if rp.rope_type == "longrope":
        return _longrope_inv_freq(config, seq_len)
    inv_freq = 1.0 / (base**exponents)
    if rp.rope_type == "linear":
        assert rp.factor is not None
        inv_freq = inv_freq / rp.factor
    elif rp.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(config, inv_freq)
    elif rp.rope_type == "yarn":
        inv_freq, scaling = _yarn_inv_freq(config)
    return inv_freq, scaling


def _llama3_inv_freq(config: LlamaConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's wavelength-dependent scaling: long wavelengths / factor, short ones kept."""
    rp = config.rope
    assert rp.factor and rp.low_freq_factor and rp.high_freq_factor
    factor, low, high = rp.factor, rp.low_freq_factor, rp.high_freq_factor
    old_len = rp.original_max_position_embeddings or config.max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope_inv_freq(config: LlamaConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-channel rescaling factors, short ones within the pretraining context and
    long ones beyond it; cos/sin scaled by sqrt(1 + ln(factor) / ln(original))."""
    rp = config.rope
    assert rp.short_factor is not None and rp.long_factor is not None
    dim = config.rotary_dim
    original = rp.original_max_position_embeddings or config.max_position_embeddings
    factor = rp.factor if rp.factor is not None else config.max_position_embeddings / original
    scaling = rp.attention_factor
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(rp.long_factor if long else rp.short_factor, dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * rp.rope_theta**exponents), float(scaling)


def _yarn_inv_freq(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""
    rp = config.rope
    base, dim = rp.rope_theta, config.rotary_dim
    original = rp.original_max_position_embeddings or config.max_position_embeddings
    factor = rp.factor if rp.factor is not None else config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rp.attention_factor
    if attention_factor is None:
        if rp.mscale and rp.mscale_all_dim:
            attention_factor = mscale(factor, rp.mscale) / mscale(factor, rp.mscale_all_dim)
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = rp.beta_fast or 32, rp.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.truncate is None or rp.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim: RoPE's pairing of channel i with i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) channels of x (B, nh, T, hs) by (B|1, 1, T, rot) angles."""
    rot = cos.size(-1)
    if rot == x.size(-1):
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dim of x."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(NativeKernels, nn.Module):
    """Grouped-query self-attention with RoPE; HF names (q_proj... or phi3's fused qkv_proj)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot this layer writes
        self.n_head, self.n_kv, self.hs = (
            config.num_attention_heads,
            config.kv_heads,
            config.head_size,
        )
        self.dropout = config.attention_dropout
        C, q_out, kv_out = config.hidden_size, self.n_head * self.hs, self.n_kv * self.hs
        self.fused = config.model_type == "phi3"
        if self.fused:
            self.qkv_proj = nn.Linear(C, q_out + 2 * kv_out, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(C, q_out, bias=config.qkv_bias)
            self.k_proj = nn.Linear(C, kv_out, bias=config.qkv_bias)
            self.v_proj = nn.Linear(C, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, C, bias=config.o_bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.hs, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.hs, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """Attend over x (B, T, C) plus cached keys; `attn_mask` (B|1, 1, T, S) True = allowed."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv, self.hs
        if self.fused:
            q, k, v = self.qkv_proj(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, nh, hs)
        k = k.view(B, T, nkv, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE (qwen3)
        # Rotate in the projections' dtype (bf16 under autocast), so the cache holds that too.
        dt = v.dtype
        cos, sin = cos.to(dt), sin.to(dt)
        q = apply_rope(q.transpose(1, 2).to(dt), cos, sin)  # (B, nh, T, hs)
        k = apply_rope(k.transpose(1, 2).to(dt), cos, sin)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, nkv, S, hs)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask, dropout, is_causal, native=self.native_kernels)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh * hs)
        return self.o_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); phi3 fuses gate and up into gate_up_proj."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, H, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.fused = config.model_type == "phi3"
        if self.fused:
            self.gate_up_proj = nn.Linear(C, 2 * H, bias=bias)
        else:
            self.gate_proj = nn.Linear(C, H, bias=bias)
            self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x (B, T, H)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # 2 x (B, T, H)
        return self.down_proj(F.silu(gate) * up)  # (B, T, C)


class DecoderLayer(nn.Module):
    """x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        x = x + self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            attn_mask=attn_mask,
            is_causal=is_causal,
            kv_cache=kv_cache,
        )
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)


class Decoder(nn.Module):
    """The trunk, `model.` in Hugging Face names: embed_tokens, layers, norm."""

    def __init__(self, config: LlamaConfig, vocab_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """A Llama-family causal LM mapping token ids (B, T) to logits (B, T, vocab_size)."""

    def __init__(self, config: LlamaConfig, vocab_size: int | None = None) -> None:
        super().__init__()
        if config.vocab_size is not None and vocab_size not in (None, config.vocab_size):
            raise ModelError(
                f"llama config says vocab_size={config.vocab_size} but the model is built "
                f"with vocab_size={vocab_size}; remove model.vocab_size or make them agree"
            )
        vocab = vocab_size if vocab_size is not None else config.vocab_size
        if vocab is None or vocab <= 0:
            raise ModelError(
                f"llama needs a positive vocab_size (model.vocab_size or the tokenizer's), "
                f"got {vocab}"
            )
        self.config = config
        self.vocab_size = vocab
        self.model = Decoder(config, vocab)
        self.lm_head = nn.Linear(config.hidden_size, vocab, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        self._rope_cache: dict[tuple[torch.device, int], tuple[torch.Tensor, float]] = {}

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head when the config says so (again after
        `load_state_dict(..., assign=True)`, which replaces parameters one by one)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def max_context(self) -> int:
        """Most tokens one sequence may hold (max_position_embeddings)."""
        return self.config.max_position_embeddings

    @property
    def n_layer(self) -> int:
        """Number of decoder layers (KV cache layers)."""
        return self.config.num_hidden_layers

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache sized for this model."""
        return KVCache(self.config.num_hidden_layers)

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B|1, 1, T, rotary_dim) for positions (B|1, T)."""
        rope_type, device = self.config.rope.rope_type, positions.device
        if rope_type == "dynamic" and int(positions.max()) >= self.config.max_position_embeddings:
            inv_freq, scale = rope_inv_freq(self.config, int(positions.max()) + 1)
            inv_freq = inv_freq.to(device)  # rescaled for this length: not worth caching
        elif rope_type == "longrope":
            # Each row picks short or long factors by its own length, so a row decodes the same
            # in a batch as alone (transformers decides once for the whole batch).
            original = self.config.rope.original_max_position_embeddings or self.max_context
            short, scale = self._cached_inv_freq(device, None)
            long, _ = self._cached_inv_freq(device, original + 1)
            is_long = positions.amax(dim=-1) >= original  # (B|1,)
            inv_freq = torch.where(is_long[:, None, None], long, short)  # (B|1, 1, rot/2)
        else:
            inv_freq, scale = self._cached_inv_freq(device, None)
        freqs = positions[..., None].float() * inv_freq  # (B|1, T, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B|1, T, rot)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B|1, 1, T, rot)

    def _cached_inv_freq(
        self, device: torch.device, seq_len: int | None
    ) -> tuple[torch.Tensor, float]:
        key = (device, seq_len or 0)
        if key not in self._rope_cache:
            inv_freq, scale = rope_inv_freq(self.config, seq_len)
            self._rope_cache[key] = (inv_freq.to(device), scale)
        return self._rope_cache[key]

    def forward(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Return next-token logits (B, T, vocab_size) for token ids `idx` (B, T).

        kv_cache: keys/values of earlier tokens; this call appends the new ones to it.
        positions: (B, T) position ids; default T_cached, ..., T_cached + T - 1 for every row.
            Give them for left-padded batches, where a row's first real token is position 0.
            RoPE has no position table, so positions past max_position_embeddings are computed
            (as transformers does); generation keeps a sequence within `max_context`.
        attention_mask: (B, T_cached + T), True/1 for real tokens and False/0 for padding
            slots, which no query attends (a padding query attends only itself).
        segments: (B, T) ids of packed rows (several examples per row): each run of equal ids
            attends only to itself (within the sliding window, if any) and its RoPE positions
            restart at 0, so every example gets the logits it would get alone. Not with
            kv_cache or attention_mask.
        last_only: logits of the last position only, (B, 1, V) (a prefill's next token).
        """
        if idx.dim() != 2:
            raise ModelError(f"llama expects token ids of shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0
        runs = segment_positions = None
        if segments is not None:
            check_segments(segments, idx, kv_cache, attention_mask)
            runs, segment_positions = segment_runs(segments)  # positions < T: in range
        if kv_cache is not None:
            if kv_cache.n_layer != self.n_layer:
                raise ModelError(
                    f"KV cache has {kv_cache.n_layer} layers but the model has "
                    f"{self.n_layer}; create it with model.new_kv_cache()"
                )
            past = kv_cache.seq_len
        if positions is None and segment_positions is not None:
            positions = segment_positions  # (B, T)
        elif positions is None:
            positions = torch.arange(past, past + T, device=idx.device)[None]  # (1, T)
        else:
            if positions.shape != (B, T):
                raise ModelError(
                    f"positions must have the shape of idx {(B, T)}, got {tuple(positions.shape)}"
                )
            if positions.numel() and int(positions.min()) < 0:
                raise ModelError(f"positions must be >= 0, got {int(positions.min())}")
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = self._rope(positions, x.dtype)
        masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        mask_of = window_attention_mask if kv_cache is None else kv_cache.attention_mask
        for i, layer in enumerate(self.model.layers):
            window = self.config.sliding_window_of(i)
            if window not in masks and runs is not None:
                masks[window] = segment_attention_mask(runs, window), False
            elif window not in masks:
                masks[window] = mask_of(T, past, attention_mask, window, idx.device)
            mask, is_causal = masks[window]
            x = layer(x, cos, sin, attn_mask=mask, is_causal=is_causal, kv_cache=kv_cache)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): a prefill needs only the next token's logits
        x = self.model.norm(x)  # (B, T, C)
        return self.lm_head(x)  # (B, T, vocab_size)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (shared ones counted once); without the token embedding table
        (unless tied to the head) if `exclude_embeddings`: the N of 6N FLOPs per token."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context, for MFU (6N plus
        attention's 12 * L * H * Q * T, PaLM appendix B)."""
        c = self.config
        n = self.num_parameters(exclude_embeddings=True)
        attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_size
        return 6 * n + attn * c.max_position_embeddings


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> LlamaConfig. Only dicts: transformers is never imported here.

# transformers' defaults where config.json leaves a key out (they differ between families).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "sliding_window": 4096,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "phi3": {
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}

_ROPE_FIELDS = tuple(f for f in RopeParameters.model_fields if f not in ("rope_type", "rope_theta"))


def _hf_rope(hf: dict[str, Any], model_type: str) -> tuple[RopeParameters, float]:
    """RoPE parameters from transformers-5 `rope_parameters` or legacy `rope_theta` and
    `rope_scaling`; also the partial rotary factor."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ModelError(f"config.json: rope_parameters must be an object, got {params!r}")
    if legacy is not None and not isinstance(legacy, dict):
        raise ModelError(f"config.json: rope_scaling must be an object or null, got {legacy!r}")
    # transformers 5 gives a legacy rope_scaling precedence over rope_parameters.
    rp: dict[str, Any] = dict(legacy or params or {})
    if any(isinstance(v, dict) for v in rp.values()):
        raise ModelError("config.json: per-layer-type rope_parameters are not supported")
    theta = rp.get("rope_theta", hf.get("rope_theta", (params or {}).get("rope_theta")))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # older Phi-3 names, as transformers reads them
    if rope_type not in ROPE_TYPES:
        raise ModelError(
            f"config.json: rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(ROPE_TYPES)}"
        )
    partial = hf.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))
    fields = {f: rp[f] for f in _ROPE_FIELDS if rp.get(f) is not None}
    if rope_type in ("llama3", "yarn", "longrope"):
        if model_type == "phi3":  # transformers prefers Phi-3's top-level field (default 4096)
            fields["original_max_position_embeddings"] = hf.get(
                "original_max_position_embeddings", 4096
            )
        fields.setdefault(
            "original_max_position_embeddings",
            hf.get("max_position_embeddings", _HF_DEFAULTS[model_type]["max_position_embeddings"]),
        )
    try:
        rope = RopeParameters(
            rope_type=rope_type, rope_theta=10000.0 if theta is None else float(theta), **fields
        )
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ModelError(f"config.json: bad rope parameters {rp}: {msg}") from None
    return rope, float(partial if partial is not None else 1.0)


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face `config.json` (as a dict) of a supported family.

    Reads both transformers-5 (`rope_parameters`) and older (`rope_theta`, `rope_scaling`)
    files. Raises ModelError naming the model_type for other families.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)} "
            "(and gpt2 through the gpt model)"
        )
    d = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"config.json: hidden_act {act!r} is not supported; supported: silu")
    rope, partial = _hf_rope(hf, model_type)
    attention_bias = bool(d.get("attention_bias", False))
    qkv_bias, o_bias = {
        "llama": (attention_bias, attention_bias),
        "qwen3": (attention_bias, attention_bias),
        "qwen2": (True, False),
        "mistral": (False, False),
        "phi3": (False, False),
    }[model_type]
    window: int | None = None
    layer_types: list[str] | None = None
    if model_type in ("qwen2", "qwen3"):
        if d.get("use_sliding_window", False):
            window = hf.get("sliding_window", d["sliding_window"])
        if window is not None:
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d["max_window_layers"] else "full_attention"
                for i in range(d["num_hidden_layers"])
            ]
            if all(t == "sliding_attention" for t in layer_types):
                layer_types = None  # the default: every layer slides
            elif not any(t == "sliding_attention" for t in layer_types):
                window, layer_types = None, None
    elif model_type in ("mistral", "phi3"):
        window = hf.get("sliding_window", d.get("sliding_window"))
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * d["num_attention_heads"] == d["hidden_size"]:
        head_dim = None  # the derived default, so configs compare equal however they were written
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    eos = d.get("eos_token_id")
    try:
        return LlamaConfig(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=head_dim,
            max_position_embeddings=d["max_position_embeddings"],
            rms_norm_eps=d["rms_norm_eps"],
            rope=rope,
            partial_rotary_factor=partial,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=window,
            layer_types=layer_types,
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=list(eos) if isinstance(eos, list | tuple) else eos,
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype if dtype in ("float32", "float16", "bfloat16") else None,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"{p}: " for p in err["loc"])
        raise ModelError(f"config.json ({model_type}): {where}{err['msg']}") from None


def hf_config_from(config: LlamaConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """A Hugging Face `config.json` dict describing the same network as `config`.

    Written in both transformers-5 (`rope_parameters`) and legacy (`rope_theta`,
    `rope_scaling`) form, so old and new readers agree. vocab_size: when config has none.
    """
    vocab = config.vocab_size if config.vocab_size is not None else vocab_size
    if vocab is None:
        raise ModelError("hf_config_from needs vocab_size (argument or config.vocab_size)")
    t = config.model_type
    rope = config.rope.model_dump(exclude_none=True)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[t]],
        "model_type": t,
        "vocab_size": vocab,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.initializer_range,
        "rope_theta": config.rope.rope_theta,
        "rope_scaling": scaling if config.rope.rope_type != "default" else None,
        "rope_parameters": rope,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
    }
    if config.dtype is not None:
        out["dtype"] = out["torch_dtype"] = config.dtype
    if t in ("llama", "qwen3"):
        out["attention_bias"] = config.qkv_bias
    if t == "llama":
        out["mlp_bias"] = config.mlp_bias
    if t in ("qwen2", "qwen3"):
        L = config.num_hidden_layers
        types = config.layer_types or ["sliding_attention"] * L
        if config.sliding_window is None:
            types = ["full_attention"] * L
        first = next((i for i, s in enumerate(types) if s == "sliding_attention"), L)
        out["use_sliding_window"] = config.sliding_window is not None
        out["sliding_window"] = config.sliding_window
        out["max_window_layers"] = first
        out["layer_types"] = list(types)
    if t in ("mistral", "phi3"):
        out["sliding_window"] = config.sliding_window
    if t == "phi3":
        out["partial_rotary_factor"] = config.partial_rotary_factor
        original = config.rope.original_max_position_embeddings
        out["original_max_position_embeddings"] = original or config.max_position_embeddings
    return out


# Non-parameter tensors some older Llama conversions saved (recomputed here from the config).
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def llama_from_state_dict(
    config: LlamaConfig, state_dict: Mapping[str, torch.Tensor], vocab_size: int | None = None
) -> Llama:
    """A Llama whose parameters are the given tensors themselves (no random init, no copy).

    The model is built on the meta device and the tensors (e.g. memory-mapped safetensors, in
    their own dtype) are assigned. A tied checkpoint may omit `lm_head.weight`. Raises
    ModelError naming missing, unexpected or misshapen tensors.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_HF_IGNORED_SUFFIXES)}
    embed = sd.get("model.embed_tokens.weight")
    if embed is None:
        raise ModelError("not a Llama-family state dict: it has no model.embed_tokens.weight")
    vocab = vocab_size or config.vocab_size or embed.size(0)
    if config.tie_word_embeddings:
        head = sd.pop("lm_head.weight", None)
        if head is not None and head is not embed and not torch.equal(head, embed):
            raise ModelError(
                "the checkpoint's lm_head.weight differs from its embedding but "
                "tie_word_embeddings is true; set tie_word_embeddings false"
            )
    with torch.device("meta"):
        model = Llama(config, vocab)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}" for k in wrong[:3]]
        raise ModelError(
            f"weights do not fit the {config.model_type} config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {shapes}"
        )
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    return model


def build_llama(
    config: LlamaConfig,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """Registry builder: a language model's outputs are its vocabulary (num_outputs unused)."""
    return Llama(config, vocab_size)
