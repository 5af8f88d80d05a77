"""Transformer encoder for sequence classification / regression (BERT-like, pre-LayerNorm).

Token + learned position embeddings, bidirectional transformer blocks (the GPT blocks, called
without the causal mask), pooling over tokens, LayerNorm and a linear head.

Padding: token id 0 (`PAD_ID`) is padding. Padded positions are never attended to and are left
out of the mean pooling, so right-padding a sequence does not change its output. Pass an explicit
`attention_mask` to `Encoder.forward` if your tokenizer uses id 0 for a real token.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.gpt import LAYER_NORM_EPS, Block, check_heads, init_gpt2_weights

PAD_ID = 0


class EncoderConfig(StrictModel):
    """Config of a bidirectional transformer encoder with a pooled prediction head."""

    name: Literal["encoder"] = "encoder"
    n_layer: int = Field(2, gt=0, description="number of transformer blocks")
    n_head: int = Field(4, gt=0, description="attention heads per block")
    n_embd: int = Field(128, gt=0, description="embedding width (divisible by n_head)")
    block_size: int = Field(128, gt=0, description="maximum sequence length in tokens")
    vocab_size: int | None = Field(None, gt=0, description="None = taken from the tokenizer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="mean over non-padding tokens, or the first token's state"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> EncoderConfig:
        check_heads(self.n_embd, self.n_head)
        return self


class Encoder(nn.Module):
    """Maps token ids (B, T) (0 = padding) to predictions (B, out_features)."""

    def __init__(self, config: EncoderConfig, vocab_size: int, out_features: int) -> None:
        super().__init__()
        if config.vocab_size is not None and config.vocab_size != vocab_size:
            raise ModelError(
                f"encoder config says vocab_size={config.vocab_size} but the model is built with "
                f"vocab_size={vocab_size}; remove model.vocab_size or make them agree"
            )
        if vocab_size <= 0 or out_features <= 0:
            raise ModelError(
                f"encoder needs positive vocab_size and out_features, got {vocab_size} and "
                f"{out_features}"
            )
        self.config = config
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(
            Block(config.n_embd, config.n_head, config.dropout, bias=True)
            for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(config.n_embd, out_features)
        self.apply(init_gpt2_weights)

    def forward(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return (B, out_features) for token ids `idx` (B, T).

        attention_mask: (B, T), True/1 for real tokens; default `idx != PAD_ID`.
        """
        if idx.dim() != 2:
            raise ModelError(f"encoder expects token ids of shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if idx.size(1) > self.config.block_size:
            raise ModelError(
                f"encoder got a sequence of {T} tokens but block_size is "
                f"{self.config.block_size}; truncate the input or raise model.block_size"
            )
        keep = idx != PAD_ID if attention_mask is None else attention_mask.bool()  # (B, T)
        if keep.shape != (B, T):
            raise ModelError(
                f"attention_mask must have the shape of idx {(B, T)}, got {tuple(keep.shape)}"
            )
        # Every query sees the real keys, and itself so an all-padding row stays finite.
        eye = torch.eye(T, dtype=torch.bool, device=idx.device)  # (T, T)
        attn_mask = keep[:, None, None, :] | eye  # (B, 1, T, T)

        positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for block in self.h:
            x = block(x, attn_mask=attn_mask)  # (B, T, C)

        if self.config.pooling == "cls":
            pooled = x[:, 0]  # (B, C)
        else:
            w = keep.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B, C)
        return self.head(self.ln_f(pooled))  # (B, out_features)
