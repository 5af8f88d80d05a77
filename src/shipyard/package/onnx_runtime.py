"""ONNX Runtime as a package backend: an `nn.Module` facade over an `InferenceSession`.

`load_package` wraps an exported package's model.onnx in `OnnxRuntimeModule`, so `LoadedModel`
(preprocessing, softmax, labels) and everything built on it, the server included, run it
unchanged. onnxruntime is an optional dependency (`pip install 'shipyard[export]'`), imported here
and only when such a package is loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from shipyard.errors import PackageError
from shipyard.package.manifest import Signature

ORT_OUTPUT = "output"  # the one output name every exported graph has


def import_onnxruntime() -> Any:
    """The onnxruntime module, or a PackageError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise PackageError(
            "this package runs on ONNX Runtime, which is not installed: "
            "pip install 'shipyard[export]'"
        ) from None
    return onnxruntime


class OnnxRuntimeModule(nn.Module):
    """Runs an ONNX graph (bytes) with ONNX Runtime on CPU; call it like the PyTorch model.

    forward takes the tensor the PyTorch model takes (preprocessed features, or token ids) and
    returns the same outputs (logits / values) as a CPU tensor. No gradients, no KV cache.
    """

    def __init__(self, data: bytes, signature: Signature, *, where: str = "model.onnx") -> None:
        super().__init__()
        self._data = data
        self._where = where
        self.session = self._session(torch.get_num_threads())
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise PackageError(f"{where}: expected a graph with one input, got {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_dtype = np.int64 if signature.inputs[0].datatype == "INT64" else np.float32
        self.size_bytes = len(data)

    def _session(self, threads: int) -> Any:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # as many as torch uses, like the parent
        options.inter_op_num_threads = 1
        try:
            return ort.InferenceSession(
                self._data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise PackageError(
                f"{self._where}: ONNX Runtime cannot load the model ({exc})"
            ) from None

    def set_threads(self, threads: int) -> None:
        """Re-create the session with `threads` intra-op threads."""
        self.session = self._session(threads)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Outputs of the graph for input `x` (B, ...)."""
        if kwargs:
            raise PackageError(
                f"an ONNX Runtime package takes only the input tensor, not {sorted(kwargs)} "
                "(no KV cache: serve the PyTorch package for generation)"
            )
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(self.input_dtype, copy=False))
        (out,) = self.session.run(None, {self.input_name: arr})[:1]
        return torch.from_numpy(np.asarray(out))
