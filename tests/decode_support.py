"""Tiny language models and set-up shared by the generation and decode-kernel tests."""

from __future__ import annotations

import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.llama import Llama, LlamaConfig

TOK = Tokenizer.byte()


def peaked_gpt() -> GPT:
    """A 2-layer GPT with a clear greedy choice, as in a trained model (a random tiny model's
    logits are nearly flat: any rounding flips its argmax)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=96), TOK.vocab_size)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8.0)
    return model.eval()


def tiny_llama(**overrides: object) -> Llama:
    """A 2-layer Llama with grouped-query attention (4 query, 2 key/value heads)."""
    torch.manual_seed(0)
    fields: dict[str, object] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "vocab_size": TOK.vocab_size,
    }
    fields.update(overrides)
    return Llama(LlamaConfig.model_validate(fields)).eval()
