"""Data: sources, seeded splits, preprocessing fitted on train only, tokenizers, token corpora.

Example::

    from shipyard.data import DataConfig, prepare_data
    data = prepare_data(DataConfig(source="builtin:digits"), "classification", seed=0)
    x, y = data.train[0]          # (1, 8, 8) float32, int64 class id

The names below are imported from their modules on first use (PEP 562), so reading a run config
(`shipyard.data.config`) does not import the datasets, the corpora or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.lazy import lazy_exports

if TYPE_CHECKING:
    from shipyard.data.chat import ChatTemplate, ChatTemplateError
    from shipyard.data.config import DataConfig, SplitFiles, SplitRatios, TokenizerConfig
    from shipyard.data.corpus import TokenWindows, default_cache_dir
    from shipyard.data.datasets import ArrayDataset
    from shipyard.data.prepare import DataInfo, PreparedData, prepare_data
    from shipyard.data.preprocessing import Preprocessor
    from shipyard.data.tokenization import EOS_TOKEN, PAD_TOKEN, HFTokenizerConfig, Tokenizer

# Each public name → the module (under shipyard.data) that defines it.
_EXPORTS: dict[str, str] = {
    "ChatTemplate": "chat",
    "ChatTemplateError": "chat",
    "DataConfig": "config",
    "SplitFiles": "config",
    "SplitRatios": "config",
    "TokenizerConfig": "config",
    "TokenWindows": "corpus",
    "default_cache_dir": "corpus",
    "ArrayDataset": "datasets",
    "DataInfo": "prepare",
    "PreparedData": "prepare",
    "prepare_data": "prepare",
    "Preprocessor": "preprocessing",
    "EOS_TOKEN": "tokenization",
    "PAD_TOKEN": "tokenization",
    "HFTokenizerConfig": "tokenization",
    "Tokenizer": "tokenization",
}

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ArrayDataset",
    "ChatTemplate",
    "ChatTemplateError",
    "DataConfig",
    "DataInfo",
    "HFTokenizerConfig",
    "PreparedData",
    "Preprocessor",
    "SplitFiles",
    "SplitRatios",
    "TokenWindows",
    "Tokenizer",
    "TokenizerConfig",
    "default_cache_dir",
    "prepare_data",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
