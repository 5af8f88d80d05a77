"""The parent package a compression or export starts from, and the data it was trained on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shipyard.compress.errors import CompressError
from shipyard.config import PretrainedConfig, RunConfig, validate_config
from shipyard.data import DataInfo, PreparedData, prepare_data
from shipyard.data.datasets import gather
from shipyard.errors import ShipyardError
from shipyard.models import TOKEN_MODELS
from shipyard.package import LoadedModel, ParentRef, load_package, manifest_sha256
from shipyard.train.finetune import pretrained_block_size


@dataclass
class Parent:
    """A loaded parent package, its run config, and (on first use) its rebuilt data splits."""

    path: Path
    loaded: LoadedModel
    config: RunConfig
    _data: PreparedData | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Parent:
        """Verify and load the package at `path`; its manifest's `config` must be a run config."""
        root = Path(path)
        loaded = load_package(root)
        try:
            config = validate_config(loaded.manifest.config, where=f"{root}/manifest.json config")
        except ShipyardError as exc:
            raise CompressError(f"{root}: the package's run config is not usable ({exc})") from None
        return cls(path=root, loaded=loaded, config=config)

    @property
    def ref(self) -> ParentRef:
        """{name, version, manifest_sha256} for the child's lineage."""
        m = self.loaded.manifest
        return ParentRef(name=m.name, version=m.version, manifest_sha256=manifest_sha256(self.path))

    @property
    def info(self) -> DataInfo:
        return DataInfo.from_dict(self.loaded.manifest.data)

    @property
    def data(self) -> PreparedData:
        """The parent's train/val/test splits, rebuilt from its config (same seed, same split)."""
        if self._data is None:
            fingerprint = self.loaded.manifest.data.get("fingerprint")
            if isinstance(fingerprint, str) and fingerprint.startswith("hf:"):
                raise CompressError(
                    f"{self.path} was imported from a Hugging Face checkpoint and has no data "
                    "splits to measure quality on; this step needs a package trained by shipyard "
                    "(export --format hf works on imported packages)"
                )
            self._data = rebuild_data(self.config, fingerprint, pretrained=self.loaded)
        return self._data


def rebuild_data(
    config: RunConfig,
    fingerprint: str | None = None,
    *,
    pretrained: LoadedModel | None = None,
) -> PreparedData:
    """Prepare the data a run config describes; refuse if its fingerprint differs from the
    package's (the source changed, so the held-out split would not be the same rows).

    pretrained: the package, for a run that started from a pretrained model: its block size
    and tokenizer came from that model instead of the config, as in training.
    """
    if isinstance(config.model, PretrainedConfig):
        if pretrained is None:
            raise CompressError("a run on a pretrained model needs its package to rebuild data")
        data = prepare_data(
            config.data,
            config.task,
            config.seed,
            block_size=pretrained_block_size(pretrained, config.data.block_size),
            tokenizer=pretrained.tokenizer,
        )
    else:
        token_model = config.model.name in TOKEN_MODELS
        block_size = getattr(config.model, "block_size", None) if token_model else None
        data = prepare_data(config.data, config.task, config.seed, block_size=block_size)
    if fingerprint is not None and data.info.fingerprint != fingerprint:
        raise CompressError(
            "the data the package was trained on has changed (fingerprint "
            f"{data.info.fingerprint[:12]} != {fingerprint[:12]}); quality could not be compared "
            "on the same held-out split"
        )
    return data


def split_tensors(
    data: PreparedData, split: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a split as tensors (model inputs after preprocessing), at most `limit` rows."""
    dataset: Any = data.splits.get(split)
    if dataset is None or len(dataset) == 0:
        raise CompressError(f"the {split} split is empty; nothing to measure on")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return gather(dataset, torch.arange(n))


def as_inputs(x: torch.Tensor) -> np.ndarray:
    """A batch as the array `LoadedModel.predict_arrays` takes (int64 ids or float32)."""
    arr = x.numpy()
    return arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32, copy=False)
