"""The `data:` section of a run config: where the data comes from, how it is split and prepared."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from shipyard.config_base import StrictModel

SplitName = Literal["train", "val", "test"]


class SplitRatios(StrictModel):
    """Fractions of the rows (or documents) that go to each split; they must sum to 1."""

    train: float = Field(0.8, gt=0, le=1, description="fraction for training")
    val: float = Field(0.1, ge=0, lt=1, description="fraction for validation")
    test: float = Field(0.1, ge=0, lt=1, description="fraction for the final test")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split ratios must sum to 1, got train={self.train} + val={self.val} + "
                f"test={self.test} = {total:g}"
            )
        return self


class SplitFiles(StrictModel):
    """Explicit files per split, instead of ratios. `val`/`test` may be omitted."""

    train: str = Field(..., description="file (or glob) with the training rows")
    val: str | None = Field(None, description="file with the validation rows")
    test: str | None = Field(None, description="file with the test rows")


class TokenizerConfig(StrictModel):
    """How text becomes token ids: raw bytes (256 ids) or a BPE vocabulary trained on train text."""

    kind: Literal["byte", "bpe"] = "byte"
    vocab_size: int = Field(
        1024, ge=260, le=1_000_000, description="BPE only: target vocabulary size"
    )
    min_frequency: int = Field(2, ge=1, description="BPE only: minimum pair frequency to merge")


class DataConfig(StrictModel):
    """Where the data comes from and how it is split and prepared.

    `source` is `builtin:digits`, `builtin:synthetic-regression`, `builtin:python-stdlib`, or a
    path / glob to user files (CSV, JSONL, NPZ, plain text, or an image folder).
    """

    source: str | None = Field(None, description="builtin:NAME, or a path/glob to user files")
    format: Literal[
        "auto", "csv", "jsonl", "npz", "text", "image-folder", "chat", "prompt-completion"
    ] = Field(
        "auto",
        description="file format; auto = from the extension (a directory = image-folder); "
        "chat / prompt-completion: JSONL instruction data for fine-tuning a language model",
    )
    features: list[str] | None = Field(
        None, description="CSV/JSONL feature columns (default: every column but the target)"
    )
    target: str | None = Field(
        None, description="CSV/JSONL target column, or NPZ target array name (default: 'y')"
    )
    text_column: str | None = Field(
        None, description="CSV/JSONL: a text column to tokenize (sequence classification)"
    )
    splits: SplitRatios = Field(default_factory=SplitRatios)
    files: SplitFiles | None = Field(None, description="explicit files per split (replaces source)")
    shuffle: bool = Field(True, description="shuffle rows (seeded) before a ratio split")
    preprocessing: Literal["standardize", "minmax", "none"] = Field(
        "standardize", description="feature scaling, fitted on the train split only"
    )
    target_scaling: Literal["standardize", "none"] = Field(
        "none", description="regression only: scale the target (fitted on train)"
    )
    tokenizer: TokenizerConfig | None = Field(
        None, description="required for language modeling and text columns"
    )
    image_size: tuple[int, int] | None = Field(
        None, description="image folders: resize every image to (height, width)"
    )
    grayscale: bool = Field(False, description="image folders: convert images to one channel")
    sampling: Literal["random", "sequential"] = Field(
        "random", description="language modeling: how training windows are drawn"
    )
    block_size: int | None = Field(
        None,
        gt=0,
        description="a pretrained language model's tokens per example (default: its context "
        "length); models built from scratch take model.block_size",
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="chat / prompt-completion: an example longer than the window is cut, "
        "left out, or an error (counts are in the run summary)",
    )
    train_on: Literal["answers", "all"] = Field(
        "answers",
        description="chat / prompt-completion: score only assistant / completion tokens, or all",
    )
    max_documents: int | None = Field(
        None, ge=1, description="text corpora: use at most this many documents (files)"
    )
    max_chars: int | None = Field(
        2_000_000, ge=1, description="text corpora: stop reading after this many characters"
    )
    n_samples: int = Field(1000, ge=10, description="synthetic-regression: number of rows")
    n_features: int = Field(8, ge=1, description="synthetic-regression: number of features")
    noise: float = Field(0.1, ge=0, description="synthetic-regression: noise standard deviation")

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("builtin:"):
            name = v.removeprefix("builtin:")
            if name not in BUILTIN_SOURCES:
                raise ValueError(
                    f"unknown builtin source {v!r}; choose one of "
                    + ", ".join(f"builtin:{n}" for n in BUILTIN_SOURCES)
                )
        return v

    @model_validator(mode="after")
    def _source_or_files(self) -> DataConfig:
        if (self.source is None) == (self.files is None):
            raise ValueError("give exactly one of data.source or data.files")
        return self

    @property
    def is_instructions(self) -> bool:
        """True for chat or prompt/completion JSONL (supervised fine-tuning)."""
        return self.format in ("chat", "prompt-completion")

    @property
    def is_text_corpus(self) -> bool:
        """True when the source is text for language modeling."""
        return self.source == "builtin:python-stdlib" or self.format == "text"


BUILTIN_SOURCES = ("digits", "synthetic-regression", "python-stdlib")
