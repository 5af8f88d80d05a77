"""Export a package to ONNX (as a package ONNX Runtime serves), TorchScript, or a Hugging Face
directory (GPT-2, Llama family), each with a parity check against the package (on its test
split; Hugging Face exports on seeded prompts, so imported packages export too).

ONNX: the graph comes from `torch.onnx.export` (the torch.export-based exporter) with a dynamic
batch dimension (and sequence length for language models); the exported package keeps the
parent's manifest (signature, preprocessing, labels, tokenizer) with `backend: onnxruntime`, so
`load_package` and `shipyard serve` run it unchanged. TorchScript: `model.pt` is a standalone
artifact for C++/mobile runtimes; TorchScript archives hold code, so `load_package` never loads
them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from shipyard.compress.errors import ExportError
from shipyard.compress.hf import MAX_SHARD_SIZE, export_hf
from shipyard.compress.peft import export_peft
from shipyard.compress.source import Parent, as_inputs, split_tensors
from shipyard.models.lora import merge_lora
from shipyard.package import LoadedModel, load_package, write_package

ExportFormat = Literal["onnx", "torchscript", "hf", "peft"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "hf", "peft")
ONNX_INPUT = "input"
ONNX_OUTPUT = "output"
TORCHSCRIPT_FILE = "model.pt"
PARITY_ROWS = 512  # test rows compared (all of a small test split)


class _PlainForward(nn.Module):
    """The model with a one-tensor forward, as exporters want it.

    Language models get an explicit all-ones attention mask: the causal mask is then built from
    tensors instead of a Python `T > 1` test, so one graph serves every sequence length.
    """

    def __init__(self, model: nn.Module, token_lm: bool) -> None:
        super().__init__()
        self.model = model
        self.token_lm = token_lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_lm:
            return self.model(x, attention_mask=torch.ones_like(x, dtype=torch.bool))
        return self.model(x)


def export(
    package: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    format: ExportFormat = "onnx",
    tolerance: float = 1e-4,
    opset: int | None = None,
    max_shard_size: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Export a package; return (output path, parity report).

    out: default PACKAGE-FORMAT beside the package. peft writes a LoRA package's adapter alone;
        the other formats write the whole model, with any adapter merged into it.
    tolerance: largest allowed absolute difference of the outputs (probabilities, values or
        logits) on the test split; beyond it, or with any argmax disagreement for classifiers,
        the export is removed and ExportError raised.
    max_shard_size: hf only: bytes per safetensors file (default 5 GiB); larger models are
        written as shards with model.safetensors.index.json.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    parent = Parent.open(package)
    if parent.loaded.manifest.backend != "torch":
        raise ExportError(
            f"{parent.path} is already an exported ({parent.loaded.manifest.backend}) package"
        )
    target = Path(out) if out is not None else parent.path.with_name(f"{parent.path.name}-{format}")
    if format == "peft":
        return export_peft(parent, target)
    if parent.loaded.manifest.lora is not None:
        merge_lora(parent.loaded.model)  # every other format holds the whole, merged model
    if format == "hf":
        shard = max_shard_size if max_shard_size is not None else MAX_SHARD_SIZE
        return export_hf(parent, target, tolerance=tolerance, max_shard_size=shard)
    if format == "onnx":
        return _export_onnx(parent, target, tolerance, opset)
    return _export_torchscript(parent, target, tolerance)


# ------------------------------------------------------------------------------------ ONNX


def onnx_bytes(
    model: nn.Module, example: torch.Tensor, *, token_lm: bool, opset: int | None
) -> bytes:
    """The ONNX graph of `model` (bytes) with a dynamic batch (and sequence) dimension."""
    wrapper = _PlainForward(model, token_lm).eval()
    batch = torch.export.Dim("batch")
    dims: dict[int, Any] = {0: batch}
    if token_lm:
        dims[1] = torch.export.Dim("tokens", max=int(example.shape[1]))
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        with _quiet(), tempfile.TemporaryDirectory() as tmp:
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_shapes=(dims,),
                verbose=False,
                **kwargs,
            )
            if program is None:
                raise ExportError("torch.onnx.export returned no program")
            file = Path(tmp) / "model.onnx"
            program.save(str(file), external_data=False)
            return file.read_bytes()
    except ExportError:
        raise
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx and onnxscript ({exc}): pip install 'shipyard[export]'"
        ) from None
    except Exception as exc:  # the exporter raises many types; say which model failed
        raise ExportError(f"torch.onnx.export failed for this model: {exc}") from None


def ort_quantize_dynamic(model: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 quantization of an ONNX graph (int8 weights of MatMul/Gemm)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ExportError(
            "ONNX Runtime quantization needs: pip install 'shipyard[export]'"
        ) from None
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(model)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def _export_onnx(
    parent: Parent, target: Path, tolerance: float, opset: int | None
) -> tuple[Path, dict[str, Any]]:
    loaded = parent.loaded
    token_lm = loaded.task == "language-modeling"
    x, _ = split_tensors(parent.data, "test", limit=PARITY_ROWS)
    data = onnx_bytes(loaded.model, x[:2], token_lm=token_lm, opset=opset)
    m = loaded.manifest
    path = write_package(
        target,
        model=None,
        onnx_model=data,
        config=parent.config,
        data_info=parent.info,
        preprocessor=loaded.preprocessor,
        tokenizer=loaded.tokenizer,
        metrics=m.metrics,
        name=m.name,
        version=f"{m.version}-onnx",
        derivation={"method": "export-onnx", "params": {"exporter": "torch.onnx (dynamo)"}},
        parent=parent.ref,
    )
    try:
        child = load_package(path)
        report = parity(loaded, child, as_inputs(x), tolerance)
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, report


# ------------------------------------------------------------------------------------ TorchScript


def _export_torchscript(
    parent: Parent, target: Path, tolerance: float
) -> tuple[Path, dict[str, Any]]:
    loaded = parent.loaded
    token_lm = loaded.task == "language-modeling"
    x, _ = split_tensors(parent.data, "test", limit=PARITY_ROWS)
    wrapper = _PlainForward(loaded.model, token_lm).eval()
    with _quiet(), torch.no_grad():
        try:
            traced = torch.jit.trace(wrapper, (x[:2],), check_trace=False)
        except Exception as exc:
            raise ExportError(f"torch.jit.trace failed for this model: {exc}") from None
        with torch.inference_mode():
            want = _batched(loaded.model, x)
            got = _batched(traced, x)
    report = _compare(want.numpy(), got.numpy(), loaded.task, tolerance, "model outputs")
    if target.exists() and not (target / TORCHSCRIPT_FILE).is_file():
        raise ExportError(
            f"{target}: exists and is not a TorchScript export; choose another output"
        )
    target.mkdir(parents=True, exist_ok=True)
    with _quiet():
        torch.jit.save(traced, str(target / TORCHSCRIPT_FILE))
    info = {
        "format": "torchscript",
        "parent": parent.ref.model_dump(),
        "input": "preprocessed features (B, ...) or token ids (B, T); see the parent manifest",
        "parity": report,
    }
    (target / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target, report


# ------------------------------------------------------------------------------------ parity


def _batched(model: Any, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def parity(
    reference: LoadedModel, candidate: LoadedModel, x: np.ndarray, tolerance: float
) -> dict[str, Any]:
    """Compare two loaded packages through `predict_arrays` on the same inputs; raise
    ExportError when the outputs differ by more than `tolerance` (or argmax disagrees)."""
    key = reference.signature.outputs[0].name
    want = np.concatenate(
        [reference.predict_arrays(x[i : i + 128])[key] for i in range(0, len(x), 128)]
    )
    got = np.concatenate(
        [candidate.predict_arrays(x[i : i + 128])[key] for i in range(0, len(x), 128)]
    )
    return _compare(want, got, reference.task, tolerance, f"predict_arrays()[{key!r}]")


def _compare(
    want: np.ndarray, got: np.ndarray, task: str, tolerance: float, what: str
) -> dict[str, Any]:
    if want.shape != got.shape:
        raise ExportError(f"parity: {what} shapes differ: {want.shape} vs {got.shape}")
    diff = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64))))
    report: dict[str, Any] = {
        "rows": int(want.shape[0]),
        "max_abs_diff": diff,
        "tolerance": tolerance,
    }
    if task != "regression":
        agree = float(np.mean(want.argmax(-1) == got.argmax(-1)))
        report["argmax_agreement"] = agree
    if not diff <= tolerance:
        raise ExportError(
            f"parity check failed: {what} differ by up to {diff:.3g} on {report['rows']} test "
            f"rows (tolerance {tolerance:g}); the export was removed"
        )
    if task == "classification" and report["argmax_agreement"] < 1.0:
        raise ExportError(
            f"parity check failed: predicted labels agree on {report['argmax_agreement']:.2%} "
            "of test rows (need 100%); the export was removed"
        )
    return report


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters print progress and deprecation notes; keep the CLI's output to our summary."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        import logging

        # torch.onnx logs progress; onnxruntime.quantization logs advice on the root logger
        loggers = [logging.getLogger("torch.onnx"), logging.getLogger()]
        levels = [log.level for log in loggers]
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)
