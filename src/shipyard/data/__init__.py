"""Data: sources, seeded splits, preprocessing fitted on train only, tokenizers, token corpora.

Example::

    from shipyard.data import DataConfig, prepare_data
    data = prepare_data(DataConfig(source="builtin:digits"), "classification", seed=0)
    x, y = data.train[0]          # (1, 8, 8) float32, int64 class id
"""

from __future__ import annotations

from shipyard.data.chat import ChatTemplate, ChatTemplateError
from shipyard.data.config import DataConfig, SplitFiles, SplitRatios, TokenizerConfig
from shipyard.data.corpus import TokenWindows, default_cache_dir
from shipyard.data.datasets import ArrayDataset
from shipyard.data.prepare import DataInfo, PreparedData, prepare_data
from shipyard.data.preprocessing import Preprocessor
from shipyard.data.tokenization import EOS_TOKEN, PAD_TOKEN, HFTokenizerConfig, Tokenizer

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
