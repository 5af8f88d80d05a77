"""The `data:` section of a run config: where the data comes from, how it is split and prepared."""

from __future__ import annotations

import re
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


class FoldsConfig(StrictModel):
    """Cross-validation: which fold of the pooled train+val rows this run validates on.

    `shipyard cv` sets this for each of its runs; the test split is never part of the pool.
    """

    k: int = Field(..., ge=2, description="number of folds")
    index: int | None = Field(
        ...,
        ge=0,
        description="the fold held out as val; null: train on every fold (no val), keep test",
    )
    stratify: bool = Field(
        True, description="classification: keep each class's share equal in every fold"
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> FoldsConfig:
        if self.index is not None and self.index >= self.k:
            raise ValueError(f"fold index {self.index} is out of range for k={self.k} (0..k-1)")
        return self


class AugmentationConfig(StrictModel):
    """Random changes to training batches only (val and test never change), seeded per step.

    Applied to the preprocessed tensors. Image operations (crop, flips, rotation, brightness,
    contrast) need (C, H, W) examples; noise and mixup also work on feature rows.
    """

    crop_padding: int = Field(
        0, ge=0, description="images: shift by up to N pixels (pad N, random crop back)"
    )
    hflip: float = Field(0.0, ge=0, le=1, description="images: probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="images: probability of a vertical flip")
    rotation: float = Field(
        0.0, ge=0, le=180, description="images: rotate by a uniform angle in [-deg, +deg]"
    )
    brightness: float = Field(
        0.0, ge=0, description="images: add a uniform offset in [-b, +b] per example"
    )
    contrast: float = Field(
        0.0, ge=0, lt=1, description="images: scale around each example's mean by [1-c, 1+c]"
    )
    noise_std: float = Field(0.0, ge=0, description="add Gaussian noise with this std")
    mixup_alpha: float = Field(
        0.0, ge=0, description="mixup: blend pairs with weight ~ Beta(alpha, alpha); 0 = off"
    )

    @property
    def uses_images(self) -> bool:
        """True if an image-only operation is switched on."""
        return bool(
            self.crop_padding
            or self.hflip
            or self.vflip
            or self.rotation
            or self.brightness
            or self.contrast
        )


ANONYMIZE_OPTIONS: dict[str, tuple[str, ...]] = {
    "drop": (),
    "hash": ("salt_env", "hash_chars"),
    "mask": ("keep_first", "keep_last", "pattern", "mask_char"),
    "generalize": ("step", "edges", "prefix"),
}


class AnonymizeRule(StrictModel):
    """One column's anonymisation, applied to CSV/JSONL rows before anything else reads them.

    drop: remove the column. hash: HMAC-SHA256 under a secret salt read from the environment
    variable `salt_env` (never from the config). mask: replace characters by `mask_char` (all
    but `keep_first`/`keep_last`, or only the matches of `pattern`). generalize: numbers to
    the lower edge of their bin (`step` or `edges`), text to its first `prefix` characters.
    """

    column: str = Field(..., min_length=1, description="the column (CSV header / JSONL key)")
    method: Literal["drop", "hash", "mask", "generalize"]
    salt_env: str = Field(
        "SHIPYARD_ANONYMIZE_SALT",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="hash: environment variable holding the secret salt",
    )
    hash_chars: int = Field(16, ge=8, le=64, description="hash: hex digits kept")
    keep_first: int = Field(0, ge=0, description="mask: leading characters left visible")
    keep_last: int = Field(0, ge=0, description="mask: trailing characters left visible")
    pattern: str | None = Field(None, description="mask: regex; mask only its matches")
    mask_char: str = Field("*", min_length=1, max_length=1, description="mask: replacement")
    step: float | None = Field(None, gt=0, description="generalize: numeric bin width")
    edges: list[float] | None = Field(
        None, min_length=1, description="generalize: ascending numeric bin edges"
    )
    prefix: int | None = Field(None, ge=0, description="generalize: keep this many characters")

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> AnonymizeRule:
        options = ANONYMIZE_OPTIONS[self.method]
        # options at their defaults are fine (a dumped config lists every field)
        foreign = sorted(
            name
            for name, info in type(self).model_fields.items()
            if name not in ("column", "method", *options) and getattr(self, name) != info.default
        )
        if foreign:
            allowed = ", ".join(sorted(options)) or "none"
            raise ValueError(
                f"column {self.column!r}: {', '.join(foreign)} do not apply to method "
                f"{self.method!r} (its options: {allowed})"
            )
        if self.method == "generalize":
            given = [n for n in ("step", "edges", "prefix") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(
                    f"column {self.column!r}: generalize needs exactly one of step, edges or "
                    f"prefix, got {given or 'none'}"
                )
            if self.edges is not None and self.edges != sorted(set(self.edges)):
                raise ValueError(f"column {self.column!r}: edges must be strictly ascending")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(
                    f"column {self.column!r}: pattern {self.pattern!r} is not a regex ({exc})"
                ) from None
        return self


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
    group_column: str | None = Field(
        None, description="CSV/JSONL: rows sharing a value stay in one cross-validation fold"
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
    packing: bool = Field(
        False,
        description="chat / prompt-completion: pack whole train examples into full windows "
        "(attention and positions stay inside each example); train.batch_size counts windows",
    )
    max_documents: int | None = Field(
        None, ge=1, description="text corpora: use at most this many documents (files)"
    )
    max_chars: int | None = Field(
        2_000_000, ge=1, description="text corpora: stop reading after this many characters"
    )
    folds: FoldsConfig | None = Field(
        None, description="cross-validation fold of this run (set by `shipyard cv`)"
    )
    augmentation: AugmentationConfig | None = Field(
        None, description="random changes to training batches only (images and feature rows)"
    )
    anonymize: list[AnonymizeRule] = Field(
        default_factory=list,
        description="CSV/JSONL: per-column drop / hash / mask / generalize, before splitting",
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

    @model_validator(mode="after")
    def _anonymize_fits(self) -> DataConfig:
        columns = [r.column for r in self.anonymize]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ValueError(f"data.anonymize has more than one rule for column(s) {twice}")
        dropped = {r.column for r in self.anonymize if r.method == "drop"}
        read = {self.target, self.text_column, *(self.features or [])} - {None}
        used = {str(c) for c in read} & dropped
        if used:
            raise ValueError(
                f"data.anonymize drops {sorted(used)}, which the run reads (target, "
                "text_column or features); drop it from those too, or hash/mask it instead"
            )
        if self.anonymize and self.is_instructions:
            raise ValueError(
                f"data.anonymize works on CSV/JSONL columns, not on data.format {self.format} "
                "examples; remove data.anonymize and anonymise the examples before training"
            )
        text = {r.column for r in self.anonymize if r.method in ("hash", "mask")}
        numeric = text & set(self.features or [])
        if numeric:
            raise ValueError(
                f"data.features {sorted(numeric)} are hashed/masked to text, which is not a "
                "number; generalize them instead, or leave them out of features"
            )
        return self

    @model_validator(mode="after")
    def _packing_needs_examples(self) -> DataConfig:
        if self.packing and not self.is_instructions:
            raise ValueError(
                f"data.packing packs chat / prompt-completion examples, but data.format is "
                f"{self.format!r} (text corpora are already cut into full windows); set "
                "data.format: chat | prompt-completion, or remove data.packing"
            )
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
