"""Preprocessing fitted on the train split only: feature scaling, label encoding, target scaling.

A fitted `Preprocessor` serialises to plain JSON (`to_dict`) and travels in the package, so serving
applies exactly the transform training used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from shipyard.errors import DataError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
FORMAT_VERSION = 1


def fit_class_names(labels: Sequence[Any] | np.ndarray) -> list[str]:
    """Sorted unique labels as strings (numeric labels sort by value: 2 before 10)."""
    unique = {str(v) for v in np.asarray(labels, dtype=object).tolist()}
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def encode_labels(labels: np.ndarray, class_names: list[str], split: str) -> np.ndarray:
    """Class ids (int64) of raw labels; DataError for a label not in `class_names` (from train)."""
    index = {name: i for i, name in enumerate(class_names)}
    ids = np.empty(len(labels), dtype=np.int64)
    for r, value in enumerate(np.asarray(labels, dtype=object).tolist()):
        i = index.get(str(value))
        if i is None:
            raise DataError(
                f"label {value!r} in the {split} split does not occur in the train split "
                f"(train classes: {', '.join(class_names[:20])}); every class needs train rows"
            )
        ids[r] = i
    return ids


class Preprocessor:
    """Feature scaling (+ regression target scaling + class names), fitted on train rows only.

    Features are scaled as x' = (x - offset) / scale with statistics per feature for 2-D inputs
    (N, F) and per channel for image inputs (N, C, H, W): standardize uses offset=mean, scale=std;
    minmax uses offset=min, scale=max-min; a zero scale becomes 1 (constant features stay finite).
    Regression targets (N, k) are standardized per column when `target_scaling="standardize"`.
    """

    def __init__(
        self,
        method: Literal["standardize", "minmax", "none"] = "standardize",
        target_scaling: Literal["standardize", "none"] = "none",
        class_names: list[str] | None = None,
        feature_names: list[str] | None = None,
    ) -> None:
        self.method = method
        self.target_scaling = target_scaling
        self.class_names = class_names
        self.feature_names = feature_names
        self.offset: np.ndarray | None = None  # (C,) float64
        self.scale: np.ndarray | None = None
        self.target_mean: np.ndarray | None = None  # (k,)
        self.target_std: np.ndarray | None = None

    def fit(self, x_train: np.ndarray, y_train: np.ndarray | None = None) -> Preprocessor:
        """Fit statistics on the train features (and regression targets when scaling them)."""
        x = np.asarray(x_train, dtype=np.float64)
        if self.method != "none":
            if x.shape[0] == 0:
                raise DataError("cannot fit preprocessing on an empty train split")
            axes = (0, *range(2, x.ndim))
            if self.method == "standardize":
                offset, scale = x.mean(axis=axes), x.std(axis=axes)
            else:
                offset = x.min(axis=axes)
                scale = x.max(axis=axes) - offset
            self.offset, self.scale = offset, np.where(scale > 0, scale, 1.0)
        if self.target_scaling == "standardize" and y_train is not None:
            y = np.asarray(y_train, dtype=np.float64).reshape(len(y_train), -1)
            std = y.std(axis=0)
            self.target_mean, self.target_std = y.mean(axis=0), np.where(std > 0, std, 1.0)
        return self

    @staticmethod
    def _broadcast(stat: np.ndarray, ndim: int) -> np.ndarray:
        return stat.reshape((1, -1) + (1,) * (ndim - 2))

    def transform(self, x: ArrayT) -> ArrayT:
        """Scaled features, float32, same container type (numpy or torch) as `x`: (N, *shape)."""
        if self.method == "none" or self.offset is None or self.scale is None:
            return x
        if isinstance(x, torch.Tensor):
            return torch.from_numpy(self.transform(x.detach().cpu().numpy())).to(x.device)
        arr = np.asarray(x, dtype=np.float32)
        offset = self._broadcast(self.offset, arr.ndim).astype(np.float32)
        scale = self._broadcast(self.scale, arr.ndim).astype(np.float32)
        return ((arr - offset) / scale).astype(np.float32)

    def transform_target(self, y: ArrayT) -> ArrayT:
        """Scaled regression targets (N, k); identity unless target scaling was fitted."""
        if self.target_mean is None or self.target_std is None:
            return y
        if isinstance(y, torch.Tensor):
            return torch.from_numpy(self.transform_target(y.detach().cpu().numpy())).to(y.device)
        return ((np.asarray(y, np.float32) - self.target_mean) / self.target_std).astype(np.float32)

    def inverse_transform_target(self, y: ArrayT) -> ArrayT:
        """Model outputs (N, k) back in the original target units."""
        if self.target_mean is None or self.target_std is None:
            return y
        if isinstance(y, torch.Tensor):
            out = self.inverse_transform_target(y.detach().cpu().numpy())
            return torch.from_numpy(out).to(y.device)
        return (np.asarray(y, np.float32) * self.target_std + self.target_mean).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (lists, floats, strings)."""

        def as_list(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(v) for v in a.tolist()]

        return {
            "version": FORMAT_VERSION,
            "method": self.method,
            "offset": as_list(self.offset),
            "scale": as_list(self.scale),
            "target_scaling": self.target_scaling,
            "target_mean": as_list(self.target_mean),
            "target_std": as_list(self.target_std),
            "class_names": self.class_names,
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Rebuild a fitted preprocessor from `to_dict()` output."""
        if d.get("version") != FORMAT_VERSION:
            raise DataError(
                f"preprocessor format version {d.get('version')!r} is not supported "
                f"(expected {FORMAT_VERSION}); re-create the package with this shipyard version"
            )
        p = cls(d["method"], d["target_scaling"], d.get("class_names"), d.get("feature_names"))

        def as_array(v: list[float] | None) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=np.float64)

        p.offset, p.scale = as_array(d.get("offset")), as_array(d.get("scale"))
        p.target_mean, p.target_std = as_array(d.get("target_mean")), as_array(d.get("target_std"))
        return p

    def __repr__(self) -> str:
        return f"Preprocessor(method={self.method!r}, target_scaling={self.target_scaling!r})"
