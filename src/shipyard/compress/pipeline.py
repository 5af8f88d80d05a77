"""`compress`: parent package → child package + report, by distillation, pruning, quantization.

Steps run in a fixed order where combined: distill (a smaller student) → prune → fine-tune →
quantize. The child records its parent (`lineage.parent`) and every step with its parameters
(`derivation`); the report compares parent and child measured on this machine, both loaded from
their packages.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from shipyard.compress.errors import CompressError
from shipyard.compress.export import ort_quantize_dynamic
from shipyard.compress.layers import quantize_linears
from shipyard.compress.measure import (
    BenchParams,
    build_report,
    quality,
    time_models,
    write_report,
)
from shipyard.compress.pruning import check_sparsity, prune_structured, prune_unstructured
from shipyard.compress.source import Parent, as_inputs, split_tensors
from shipyard.config import RunConfig, validate_config
from shipyard.package import load_package, write_package
from shipyard.package.loading import build_empty_model
from shipyard.train import DistillParams, best_checkpoint, fit
from shipyard.train.checkpoint import load_weights

QuantizeMethod = Literal["int8", "int8-weight"]
QUANTIZE_METHODS: tuple[str, ...] = ("int8", "int8-weight")
PACKAGE_SUBDIR = "package"  # OUT/package is the child; OUT/report.{json,md} beside it
REPORT_LINEAGE_KEY = "compression_report"  # the child's lineage: the absolute path of its report


@dataclass
class CompressResult:
    """What `compress` (and `quantize`, `prune`, `distill`) produced."""

    package: Path
    report: dict[str, Any]
    report_path: Path


@dataclass
class _Child:
    """The child being derived: a model, its config, and the steps taken so far."""

    model: nn.Module
    config: RunConfig
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    onnx_model: bytes | None = None
    masks: dict[str, torch.Tensor] | None = None


def compress(
    package: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    quantize: QuantizeMethod | None = None,
    prune: float | None = None,
    structured: bool = False,
    distill: str | os.PathLike[str] | dict[str, Any] | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    finetune_steps: int = 0,
    finetune_lr: float | None = None,
    name: str | None = None,
    version: str | None = None,
    bench: BenchParams | None = None,
) -> CompressResult:
    """Derive a smaller/faster child of a package; write OUT/package and OUT/report.{json,md}.

    quantize: "int8" (dynamic int8 Linear layers with PyTorch's quantized kernels; for an ONNX
        package, ONNX Runtime's dynamic int8) or "int8-weight" (int8 weights dequantized on the
        fly: 4x smaller Linear weights, for GPT-style models).
    prune: target sparsity in (0, 1): the fraction of weights zeroed (unstructured, global
        magnitude) or of hidden neurons/channels removed (`structured=True`, mlp and cnn).
    distill: a student run config (YAML path or dict; its `model` section at least) trained on
        the parent's soft targets (KL·T², weight `alpha`) plus the labels (1 - alpha).
    finetune_steps: train the pruned child this many steps (pruned weights stay zero), at
        `finetune_lr` (default: the parent's learning rate / 10, constant).
    name, version: the child's (default: the parent's name, its version + a method suffix).
    bench: how long to time parent and child for the report.
    """
    if quantize is None and prune is None and distill is None:
        raise CompressError("nothing to do: give quantize, prune and/or distill")
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise CompressError(f"unknown quantization {quantize!r}; choose one of {QUANTIZE_METHODS}")
    if prune is not None:
        check_sparsity(prune)
    elif structured:
        raise CompressError("--structured needs --prune SPARSITY")
    if finetune_steps < 0:
        raise CompressError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if finetune_steps and prune is None and distill is None:
        raise CompressError("--finetune-steps recovers accuracy after pruning; give --prune too")
    out_dir = Path(out)
    _check_out(out_dir)
    parent = Parent.open(package)
    backend = parent.loaded.manifest.backend
    if backend != "torch" and (prune is not None or distill is not None):
        raise CompressError(
            f"{parent.path} is an exported ({backend}) package; prune or distill its PyTorch "
            "parent, then export"
        )
    if parent.loaded.manifest.quantization is not None:
        raise CompressError(f"{parent.path} is already quantized; compress its parent instead")
    # an ONNX parent has no PyTorch model to change (its graph is quantized as a whole)
    start = parent.loaded.model if backend != "torch" else copy.deepcopy(parent.loaded.model)
    child = _Child(model=start, config=parent.config)
    with tempfile.TemporaryDirectory(prefix=".runs-", dir=_mkdir(out_dir)) as runs:
        if distill is not None:
            _distill(parent, child, distill, alpha, temperature, Path(runs) / "distill")
        if prune is not None:
            _prune(parent, child, prune, structured)
            if finetune_steps:
                _finetune(parent, child, finetune_steps, finetune_lr, Path(runs) / "finetune")
    if quantize is not None:
        _quantize(parent, child, quantize)
    return _finish(parent, child, out_dir, name=name, version=version, bench=bench)


def quantize(
    package: str | os.PathLike[str],
    out: str | os.PathLike[str],
    method: QuantizeMethod = "int8",
    **kwargs: Any,
) -> CompressResult:
    """Quantize a package (see `compress`): "int8" dynamic, or "int8-weight" weight-only."""
    return compress(package, out, quantize=method, **kwargs)


def prune(
    package: str | os.PathLike[str],
    out: str | os.PathLike[str],
    sparsity: float,
    *,
    structured: bool = False,
    finetune_steps: int = 0,
    **kwargs: Any,
) -> CompressResult:
    """Prune a package to `sparsity` (see `compress`), optionally fine-tuning afterwards."""
    return compress(
        package,
        out,
        prune=sparsity,
        structured=structured,
        finetune_steps=finetune_steps,
        **kwargs,
    )


def distill(
    package: str | os.PathLike[str],
    out: str | os.PathLike[str],
    student: str | os.PathLike[str] | dict[str, Any],
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    **kwargs: Any,
) -> CompressResult:
    """Train a smaller student on a package's predictions (see `compress`)."""
    return compress(package, out, distill=student, alpha=alpha, temperature=temperature, **kwargs)


# ------------------------------------------------------------------------------------ steps


def _quantize(parent: Parent, child: _Child, method: str) -> None:
    if parent.loaded.manifest.backend == "onnxruntime":
        if method != "int8":
            raise CompressError(
                f"an ONNX package can be quantized with int8 (ONNX Runtime), not {method}"
            )
        child.onnx_model = ort_quantize_dynamic((parent.path / "model.onnx").read_bytes())
        child.steps["quantize"] = {
            "scheme": "onnxruntime-dynamic-int8",
            "weight_type": "QInt8",
            "per_channel": False,
        }
        return
    scheme = "dynamic-int8" if method == "int8" else "weight-int8"
    layers = quantize_linears(child.model, scheme)
    params = {"granularity": "per-output-channel", "symmetric": True, "weight_dtype": "int8"}
    if scheme == "dynamic-int8":
        params["activations"] = "int8, quantized per batch at run time (torch.ao kernels)"
        params["engine"] = torch.backends.quantized.engine
    child.quantization = {"scheme": scheme, "layers": layers, "params": params}
    child.steps["quantize"] = {"scheme": scheme, "layers": len(layers), **params}


def _prune(parent: Parent, child: _Child, sparsity: float, structured: bool) -> None:
    info = parent.info
    if structured:
        model, config_model, changes = prune_structured(
            child.model, child.config.model, sparsity, tuple(info.input_shape), info.num_outputs
        )
        child.model = model
        child.config = child.config.model_copy(update={"model": config_model})
        child.steps["prune"] = {"sparsity": sparsity, "structured": True, **changes}
    else:
        child.masks = prune_unstructured(child.model, sparsity)
        child.steps["prune"] = {
            "sparsity": sparsity,
            "structured": False,
            "method": "global magnitude (L1), Linear and Conv weights",
        }


def _finetune(parent: Parent, child: _Child, steps: int, lr: float | None, run_dir: Path) -> None:
    raw = child.config.model_dump(mode="json")
    lr = lr if lr is not None else float(raw["optim"].get("lr", 1e-3)) / 10
    raw["optim"]["lr"] = lr
    raw["schedule"] = {"name": "constant"}
    raw["train"].update({"epochs": None, "max_steps": steps, "early_stopping": None})
    raw["eval"]["every_steps"] = None
    config = validate_config(raw, where="fine-tuning config")
    state = {k: v.detach().clone() for k, v in child.model.state_dict().items()}
    result = fit(config, run_dir=run_dir, init_weights=state, weight_masks=child.masks)
    child.model = _best_weights(config, parent, run_dir)
    val = {k: v for k, v in result.metrics.get("val", {}).items() if isinstance(v, int | float)}
    child.steps["finetune"] = {"steps": result.steps, "lr": lr, "val": val}


def _distill(
    parent: Parent,
    child: _Child,
    student: str | os.PathLike[str] | dict[str, Any],
    alpha: float,
    temperature: float,
    run_dir: Path,
) -> None:
    params = DistillParams(alpha=alpha, temperature=temperature)
    config = student_config(parent.config, student)
    result = fit(config, run_dir=run_dir, teacher=parent.loaded.model, distill=params)
    child.model = _best_weights(config, parent, run_dir)
    child.config = config
    val = {k: v for k, v in result.metrics.get("val", {}).items() if isinstance(v, int | float)}
    child.steps["distill"] = {
        "alpha": alpha,
        "temperature": temperature,
        "student": config.model.model_dump(mode="json"),
        "steps": result.steps,
        "val": val,
    }


def student_config(
    parent: RunConfig, student: str | os.PathLike[str] | dict[str, Any]
) -> RunConfig:
    """The parent's run config with the student's sections laid over it. The student must learn
    the same task from the same data: `task`, `seed` and `data`, if given, must match."""
    if isinstance(student, dict):
        raw_student, where = student, "student config"
    else:
        path = Path(student)
        if not path.is_file():
            raise CompressError(f"{path}: no such student config file")
        raw_student = yaml.safe_load(path.read_text(encoding="utf-8"))
        where = str(path)
    if not isinstance(raw_student, dict) or "model" not in raw_student:
        raise CompressError(f"{where}: a student config needs at least a model: section")
    raw = parent.model_dump(mode="json")
    for key in ("task", "seed", "data"):
        if key in raw_student:
            mine = validate_config({**raw, key: raw_student[key]}, where=where).model_dump(
                mode="json"
            )[key]
            if mine != raw[key]:
                raise CompressError(
                    f"{where}: {key} differs from the teacher's; a student learns from the "
                    f"teacher's predictions on the same data (remove {key}: or make it match)"
                )
    raw.update({k: v for k, v in raw_student.items() if k not in ("task", "seed", "data")})
    if "name" not in raw_student:
        raw["name"] = f"{parent.name}-student"
    return validate_config(raw, where=where)


def _best_weights(config: RunConfig, parent: Parent, run_dir: Path) -> nn.Module:
    model = build_empty_model(config.model, parent.info)
    load_weights(best_checkpoint(run_dir), model)
    return model.eval()


# ------------------------------------------------------------------------------------ output


def _finish(
    parent: Parent,
    child: _Child,
    out_dir: Path,
    *,
    name: str | None,
    version: str | None,
    bench: BenchParams | None,
) -> CompressResult:
    bench = bench or BenchParams()
    method = "+".join(child.steps)
    derivation = {"method": method, "params": child.steps}
    manifest = parent.loaded.manifest
    data = parent.data
    metrics: dict[str, dict[str, float]] = {}
    if child.onnx_model is None:
        child.model.eval()
        metrics["test"] = quality(child.model, data, child.config)
    path = write_package(
        out_dir / PACKAGE_SUBDIR,
        model=None if child.onnx_model is not None else child.model,
        onnx_model=child.onnx_model,
        config=child.config,
        data_info=parent.info,
        preprocessor=parent.loaded.preprocessor,
        tokenizer=parent.loaded.tokenizer,
        metrics=metrics,
        name=name or manifest.name,
        version=version or f"{manifest.version}-{_suffix(child.steps)}",
        derivation=derivation,
        parent=parent.ref,
        quantization=child.quantization,
        # where the report on this child will be (written below, once the child is measured):
        # the registry keeps the lineage, so a registered child leads back to its report
        lineage_extra={REPORT_LINEAGE_KEY: str((out_dir / "report.json").resolve())},
    )
    loaded_child = load_package(path)
    parent_quality = quality(parent.loaded.model, data, parent.config)
    child_quality = quality(loaded_child.model, data, child.config)
    x, _ = split_tensors(data, "test", limit=256)
    timings = time_models({"parent": parent.loaded, "child": loaded_child}, as_inputs(x), bench)
    report = build_report(
        parent=parent.loaded,
        child=loaded_child,
        parent_quality=parent_quality,
        child_quality=child_quality,
        timings=timings,
        derivation=derivation,
        bench=bench,
    )
    write_report(out_dir, report)
    return CompressResult(package=path, report=report, report_path=out_dir / "report.json")


def _suffix(steps: dict[str, dict[str, Any]]) -> str:
    parts = []
    if "distill" in steps:
        parts.append("student")
    if "prune" in steps:
        p = steps["prune"]
        parts.append(f"{'structured' if p['structured'] else 'pruned'}{round(p['sparsity'] * 100)}")
    if "finetune" in steps:
        parts.append("ft")
    if "quantize" in steps:
        scheme = steps["quantize"]["scheme"]
        parts.append({"weight-int8": "int8w"}.get(scheme, "int8"))
    return "-".join(parts)


def _check_out(out: Path) -> None:
    """OUT may be new, empty, or an earlier compress output (replaced)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CompressError(f"{out}: exists and is not a directory; choose another output")
    if out.is_dir():
        entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        if entries - {PACKAGE_SUBDIR, "report.json", "report.md"}:
            raise CompressError(
                f"{out}: already exists and holds other files; choose another output"
            )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(".runs-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return path
