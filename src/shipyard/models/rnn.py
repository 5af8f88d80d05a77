"""Recurrent network (LSTM or GRU) over token ids: sequence prediction or next-token language model.

Token embeddings, a stack of `nn.LSTM` / `nn.GRU` layers (dropout between layers), then a head:

- head "sequence": one prediction per sequence (classification or regression). The sequences are
  packed by their length (`pack_padded_sequence`), so right-padding changes nothing; the
  prediction reads the last layer's final state of each direction (forward: after the last real
  token; backward: after the first).
- head "lm": next-token logits at every position (B, T, V), one direction only. `forward` takes
  an `RNNState` (the recurrent counterpart of a KV cache) and carries it over, so generation
  feeds the prompt once and then one token per step. It satisfies `RecurrentLanguageModel`
  (models/protocol.py), so `generate` and the batching engine decode from it like from a GPT.

Padding: token id 0 (`PAD_ID`, the tokenizers' pad id) is padding; a sequence's length is its
count of non-padding tokens (right-padded), and an all-padding row is read as one token long.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.protocol import RecurrentState

PAD_ID = 0


class RNNConfig(StrictModel):
    """Config of a recurrent network over token ids (LSTM or GRU cells)."""

    name: Literal["rnn"] = "rnn"
    cell: Literal["lstm", "gru"] = Field("lstm", description="recurrent cell type")
    n_layer: int = Field(1, gt=0, description="stacked recurrent layers")
    n_embd: int = Field(64, gt=0, description="token embedding width")
    hidden_size: int = Field(128, gt=0, description="hidden state width (per direction)")
    bidirectional: bool = Field(False, description="read sequences both ways (head sequence only)")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on embeddings, between layers and before the head"
    )
    block_size: int = Field(
        128, gt=0, description="tokens per example (classification) or training window (lm)"
    )
    vocab_size: int | None = Field(None, gt=0, description="None = taken from the tokenizer")
    head: Literal["sequence", "lm"] | None = Field(
        None,
        description="sequence: one prediction per sequence; lm: next-token logits "
        "(default: from the run's task)",
    )

    @model_validator(mode="after")
    def _lm_is_one_way(self) -> RNNConfig:
        if self.head == "lm" and self.bidirectional:
            raise ValueError(
                "a language model (head lm) reads left to right only: set bidirectional false"
            )
        return self


class RNNState(RecurrentState):
    """Recurrent state carried between `RNN.forward` calls (head lm): the generation cache.

    `hidden` is (n_layer, B, hidden_size), or for an LSTM the pair (h, c); None before the first
    call. `seq_len` counts the tokens consumed so far. Rows leave and join a batch through
    `select` / `concat` (see `RecurrentState`), which the batching engine uses.
    """


class RNN(nn.Module):
    """Maps token ids (B, T) to (B, out_features) (head sequence) or logits (B, T, V) (head lm)."""

    def __init__(self, config: RNNConfig, vocab_size: int, out_features: int | None) -> None:
        super().__init__()
        if config.head is None:
            raise ModelError(
                "rnn config needs head 'sequence' or 'lm' (a run config fills it in from its task)"
            )
        if config.vocab_size is not None and config.vocab_size != vocab_size:
            raise ModelError(
                f"rnn config says vocab_size={config.vocab_size} but the model is built with "
                f"vocab_size={vocab_size}; remove model.vocab_size or make them agree"
            )
        if config.head == "sequence" and (out_features is None or out_features <= 0):
            raise ModelError(f"rnn head 'sequence' needs positive out_features, got {out_features}")
        if vocab_size <= 0:
            raise ModelError(f"rnn needs a positive vocab_size, got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.is_lm = config.head == "lm"
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        rnn_class = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            config.n_embd,
            config.hidden_size,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
            bidirectional=config.bidirectional,
        )
        directions = 2 if config.bidirectional else 1
        out = vocab_size if self.is_lm else out_features
        assert out is not None
        self.head = nn.Linear(config.hidden_size * directions, out)

    def new_state(self) -> RNNState:
        """An empty recurrent state to pass as `kv_cache` (head lm)."""
        if not self.is_lm:
            raise ModelError("rnn head 'sequence' takes no state; new_state is for head 'lm'")
        return RNNState()

    def forward(self, idx: torch.Tensor, kv_cache: RecurrentState | None = None) -> torch.Tensor:
        """(B, out_features) for head sequence, (B, T, V) logits for head lm.

        kv_cache: head lm only; its state is read and replaced, so the next call continues the
        sequences (the name matches GPT.forward so decoding code can call either).
        """
        if idx.dim() != 2:
            raise ModelError(f"rnn expects token ids of shape (B, T), got {tuple(idx.shape)}")
        x = self.drop(self.wte(idx))  # (B, T, n_embd)
        if self.is_lm:
            hidden = kv_cache.hidden if kv_cache is not None else None
            y, new_hidden = self.rnn(x, hidden)  # (B, T, H)
            if kv_cache is not None:
                kv_cache.hidden = new_hidden
                kv_cache.seq_len += idx.size(1)
            return self.head(self.drop(y))  # (B, T, V)
        if kv_cache is not None:
            raise ModelError("rnn head 'sequence' takes no state; kv_cache is for head 'lm'")
        lengths = (idx != PAD_ID).sum(dim=1).clamp(min=1).cpu()  # (B,)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, hidden = self.rnn(packed)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden  # (layers * dirs, B, H)
        # the last layer's final states: (B, 2H) forward + backward, or (B, H)
        last = torch.cat([h_n[-2], h_n[-1]], dim=-1) if self.config.bidirectional else h_n[-1]
        return self.head(self.drop(last))  # (B, out_features)
