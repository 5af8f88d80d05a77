"""GPT: a decoder-only transformer language model with the GPT-2 architecture (nanoGPT style).

Token + learned position embeddings, pre-LayerNorm blocks (causal self-attention, 4x GELU MLP),
a final LayerNorm and a language-model head tied to the token embedding.

Parameter names follow Hugging Face `GPT2LMHeadModel` (`transformer.wte`,
`transformer.h.0.attn.c_attn`, ..., `lm_head`), so `to_hf_gpt2_state_dict` and
`from_hf_gpt2_state_dict` only transpose the projection weights (HF's `Conv1D` stores (in, out)).

Incremental decoding: pass a `KVCache` to `GPT.forward`. The first call (prefill) fills it with the
keys and values of the prompt; each later call appends the new tokens' keys and values, so one
token at a time costs O(T) instead of O(T^2). For batched decoding of sequences of different
lengths, pass `positions` (B, T) and an `attention_mask` (B, S) over cache slots.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.attention import NativeKernels, attention, gelu_tanh
from shipyard.models.protocol import (
    KVCache,
    check_segments,
    segment_attention_mask,
    segment_runs,
    window_attention_mask,
)

LAYER_NORM_EPS = 1e-5


def check_heads(n_embd: int, n_head: int) -> None:
    """Raise ValueError unless the embedding width splits evenly into attention heads."""
    if n_embd % n_head != 0:
        raise ValueError(
            f"n_embd must be divisible by n_head, got n_embd={n_embd} and n_head={n_head} "
            f"(remainder {n_embd % n_head}); pick e.g. n_embd={n_head * max(1, n_embd // n_head)}"
        )


class GPTConfig(StrictModel):
    """Config of a GPT-2 style causal language model."""

    name: Literal["gpt"] = "gpt"
    n_layer: int = Field(4, gt=0, description="number of transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads per block")
    n_embd: int = Field(128, gt=0, description="embedding width (divisible by n_head)")
    block_size: int = Field(128, gt=0, description="maximum context length in tokens")
    vocab_size: int | None = Field(None, gt=0, description="None = taken from the tokenizer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = Field(True, description="biases in Linear and LayerNorm layers")
    tie_weights: bool = Field(True, description="share the token embedding with the LM head")
    mlp_hidden: int | None = Field(
        None, gt=0, description="MLP width (None = 4 * n_embd); structured pruning narrows it"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        check_heads(self.n_embd, self.n_head)
        return self


class SelfAttention(NativeKernels, nn.Module):
    """Multi-head self-attention; causal or not is decided per call (GPT vs encoder)."""

    def __init__(
        self, n_embd: int, n_head: int, dropout: float, bias: bool, layer_idx: int = 0
    ) -> None:
        super().__init__()
        self.n_embd = n_embd
        self.n_head = n_head
        self.dropout = dropout
        self.layer_idx = layer_idx  # which KVCache slot this layer writes
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend over x (B, T, C) (plus cached keys); `attn_mask` is True where allowed."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, nh, S, hs), S = T_cached + T
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask, dropout, is_causal, native=self.native_kernels)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class FeedForward(NativeKernels, nn.Module):
    """Position-wise MLP: C -> H (4C by default) -> GELU (tanh approximation, as GPT-2) -> C."""

    def __init__(self, n_embd: int, dropout: float, bias: bool, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * n_embd
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        h = gelu_tanh(self.c_fc(x), self.gelu, native=self.native_kernels)  # (B, T, H)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float,
        bias: bool,
        layer_idx: int = 0,
        mlp_hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=LAYER_NORM_EPS, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias, layer_idx)
        self.ln_2 = nn.LayerNorm(n_embd, eps=LAYER_NORM_EPS, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Map (B, T, C) to (B, T, C)."""
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class Transformer(nn.Module):
    """The GPT trunk; a module (not a ModuleDict) so attribute access stays typed."""

    def __init__(self, config: GPTConfig, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(
            Block(
                config.n_embd,
                config.n_head,
                config.dropout,
                config.bias,
                layer_idx=i,
                mlp_hidden=config.mlp_hidden,
            )
            for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)


class GPT(nn.Module):
    """GPT-2 style causal language model mapping token ids (B, T) to logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig, vocab_size: int) -> None:
        super().__init__()
        if config.vocab_size is not None and config.vocab_size != vocab_size:
            raise ModelError(
                f"gpt config says vocab_size={config.vocab_size} but the model is built with "
                f"vocab_size={vocab_size}; remove model.vocab_size or make them agree"
            )
        if vocab_size <= 0:
            raise ModelError(f"gpt needs a positive vocab_size, got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.transformer = Transformer(config, vocab_size)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(init_gpt2_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth (two residual additions per block).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def max_context(self) -> int:
        """Most tokens one sequence may hold (block_size: positions are learned)."""
        return self.config.block_size

    @property
    def n_layer(self) -> int:
        """Number of transformer blocks (KV cache layers)."""
        return self.config.n_layer

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache sized for this model."""
        return KVCache(self.config.n_layer)

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
        attention_mask: (B, T_cached + T), True/1 for real tokens and False/0 for padding
            slots, which no query attends (a padding query attends only itself).
        segments: (B, T) ids of packed rows (several examples per row): each run of equal ids
            attends only to itself and its positions restart at 0, so every example gets the
            logits it would get alone. Not with kv_cache or attention_mask.
        last_only: logits of the last position only, (B, 1, V) (a prefill's next token).
        """
        if idx.dim() != 2:
            raise ModelError(f"gpt expects token ids of shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        block_size = self.config.block_size
        if idx.size(1) > block_size:
            raise ModelError(
                f"gpt got a sequence of {T} tokens but block_size is {block_size}; "
                "truncate the input or raise model.block_size"
            )
        past = 0
        runs = segment_positions = None
        if segments is not None:
            check_segments(segments, idx, kv_cache, attention_mask)
            runs, segment_positions = segment_runs(segments)  # positions < T: in range
        if kv_cache is not None:
            if kv_cache.n_layer != self.config.n_layer:
                raise ModelError(
                    f"KV cache has {kv_cache.n_layer} layers but the model has "
                    f"{self.config.n_layer}; create it with model.new_kv_cache()"
                )
            past = kv_cache.seq_len
        if positions is None and segment_positions is not None:
            positions = segment_positions  # (B, T)
        elif positions is None:
            if past + T > block_size:
                raise ModelError(
                    f"gpt context would hold {past + T} tokens ({past} cached + {T} new) but "
                    f"block_size is {block_size}; start a new cache or raise model.block_size"
                )
            positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        else:
            if positions.shape != (B, T):
                raise ModelError(
                    f"positions must have the shape of idx {(B, T)}, got {tuple(positions.shape)}"
                )
            if positions.numel() and (
                int(positions.min()) < 0 or int(positions.max()) >= block_size
            ):
                raise ModelError(
                    f"positions must lie in [0, {block_size}) (block_size), got "
                    f"[{int(positions.min())}, {int(positions.max())}]"
                )
        attn_mask: torch.Tensor | None
        if runs is not None:
            attn_mask, is_causal = segment_attention_mask(runs, None), False
        else:
            mask_of = window_attention_mask if kv_cache is None else kv_cache.attention_mask
            attn_mask, is_causal = mask_of(T, past, attention_mask, None, idx.device)

        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(positions)  # (T, C) or (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): a prefill needs only the next token's logits
        x = self.transformer.ln_f(x)  # (B, T, C)
        return self.lm_head(x)  # (B, T, vocab_size)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (shared ones counted once).

        exclude_embeddings: leave out the lookup tables that do no matrix multiply: the position
            embedding, and the token embedding unless it is tied to (and so is) the LM head.
            This is the N of the 6N FLOPs-per-token estimate.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context, for MFU.

        6N for the weight matmuls plus 12 * L * H * Q * T for attention scores and values
        (PaLM appendix B), with N non-embedding parameters, Q the head size, T block_size.
        """
        c = self.config
        n = self.num_parameters(exclude_embeddings=True)
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size


def init_gpt2_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 interop. These only build dicts, so transformers is never imported here.

# HF GPT-2 keeps these projections in Conv1D layout: weight (in, out) instead of Linear's (out, in).
_CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Buffers some transformers versions keep in GPT-2 state dicts (causal mask, mask fill value).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _bias_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every bias HF GPT-2 has (ours has none when config.bias is False)."""
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {"transformer.ln_f.bias": (C,)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.bias"] = (4 * C,)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    return shapes


def hf_gpt2_config_kwargs(config: GPTConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `transformers.GPT2Config` describing the same network as `config`."""
    vocab = vocab_size if vocab_size is not None else config.vocab_size
    if vocab is None:
        raise ModelError("hf_gpt2_config_kwargs needs vocab_size (argument or config.vocab_size)")
    if config.vocab_size is not None and config.vocab_size != vocab:
        raise ModelError(
            f"config.vocab_size={config.vocab_size} disagrees with vocab_size={vocab_size}"
        )
    return {
        "vocab_size": vocab,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden or 4 * config.n_embd,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_weights,
    }


def to_hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """State dict loadable into `transformers.GPT2LMHeadModel` (tensors are fresh copies).

    Projection weights are transposed to Conv1D layout; a model built with bias=False gets
    zero biases, which is the same function.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        if name.endswith(_CONV1D_WEIGHTS):
            t = t.t()  # (out, in) -> (in, out)
        out[name] = t.contiguous().clone()
    if not model.config.bias:
        ref = model.lm_head.weight
        for name, shape in _bias_shapes(model.config).items():
            out[name] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    return out


def from_hf_gpt2_state_dict(
    state_dict: dict[str, torch.Tensor], config: GPTConfig, vocab_size: int | None = None
) -> GPT:
    """Build a GPT from a Hugging Face GPT-2 state dict (`GPT2LMHeadModel` or `GPT2Model`).

    vocab_size: defaults to config.vocab_size, then to the rows of `transformer.wte.weight`.
    Raises ModelError when the weights do not fit `config` (names or shapes).
    """
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith(_HF_BUFFERS):
            continue  # non-parameter buffers of older transformers versions
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model keys have no "transformer." prefix
        sd[name] = tensor
    if "transformer.wte.weight" not in sd:
        raise ModelError("not a GPT-2 state dict: it has no transformer.wte.weight")
    wte = sd["transformer.wte.weight"]
    vocab = vocab_size or config.vocab_size or wte.size(0)
    sd.setdefault("lm_head.weight", wte)  # tied checkpoints may omit the head
    if config.tie_weights and not torch.equal(sd["lm_head.weight"], wte):
        raise ModelError(
            "the checkpoint's lm_head differs from its token embedding but config.tie_weights is "
            "True; set model.tie_weights=false"
        )
    if not config.bias:
        for name in _bias_shapes(config):
            bias = sd.pop(name, None)
            if bias is not None and bool(bias.any()):
                raise ModelError(
                    f"{name} is non-zero but config.bias is False; set model.bias=true to keep it"
                )
    for name in list(sd):
        if name.endswith(_CONV1D_WEIGHTS):
            sd[name] = sd[name].t()  # (in, out) -> (out, in)
    model = GPT(config, vocab)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"GPT-2 weights do not fit the gpt config {config}: {e}") from e
    return model
