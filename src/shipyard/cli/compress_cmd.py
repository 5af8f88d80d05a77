"""`shipyard compress`, `shipyard export` and `shipyard import-hf`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from shipyard.cli.tables import print_rows, transpose
from shipyard.compress.measure import report_rows

console = Console()


def compress(
    package: Path = typer.Argument(..., help="The parent package directory."),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output directory: OUT/package (the child) + OUT/report.{json,md}."
    ),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="int8 (dynamic int8 Linear layers; ONNX Runtime int8 for an ONNX package) or "
        "int8-weight (int8 weights, fp compute: for GPT-style models).",
    ),
    prune: float | None = typer.Option(
        None, "--prune", help="Target sparsity in (0, 1): fraction of weights (or units) removed."
    ),
    structured: bool = typer.Option(
        False, "--structured", help="Remove whole neurons/channels (mlp, cnn): smaller and faster."
    ),
    distill: Path | None = typer.Option(
        None, "--distill", help="Student run config (YAML, at least a model: section)."
    ),
    alpha: float = typer.Option(0.5, "--alpha", help="Distillation: weight of the soft targets."),
    temperature: float = typer.Option(2.0, "--temperature", help="Distillation temperature."),
    finetune_steps: int = typer.Option(
        0, "--finetune-steps", min=0, help="Fine-tune the pruned child this many steps."
    ),
    finetune_lr: float | None = typer.Option(
        None, "--finetune-lr", help="Fine-tuning learning rate (default: the parent's / 10)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="Threads while timing parent and child (default: torch's)."
    ),
) -> None:
    """Derive a smaller or faster child package and report size, speed and quality vs the parent.

    Example: shipyard compress digits-pkg --quantize int8 -o digits-int8

    Structured pruning + fine-tuning: shipyard compress digits-pkg --prune 0.5 --structured
    --finetune-steps 200 -o digits-half

    Distillation: shipyard compress digits-pkg --distill student.yaml -o digits-small
    """
    from shipyard.compress import BenchParams
    from shipyard.compress import compress as run_compress

    result = run_compress(
        package,
        out,
        quantize=quantize,  # type: ignore[arg-type]  # validated by compress()
        prune=prune,
        structured=structured,
        distill=distill,
        alpha=alpha,
        temperature=temperature,
        finetune_steps=finetune_steps,
        finetune_lr=finetune_lr,
        bench=BenchParams(threads=threads),
    )
    header, rows = report_table(result.report)
    print_rows(
        console,
        header,
        rows,
        title=f"{result.report['derivation']['method']}: {package} → {result.package}",
        right=header[1:],
    )
    console.print(f"report: {out / 'report.md'}", highlight=False, soft_wrap=True)


def report_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The compress report turned: a row per measure, a column per model (parent, child,
    change), the versions in a row of their own, so that it fits 80 columns."""
    header, *rows = transpose(report_rows(report))
    names = [h.split(": ", 1) for h in header[1:]]  # "parent: VERSION" → a column and a row
    rows.insert(0, ["version", *(n[1] if len(n) > 1 else "" for n in names)])
    return ["", *(n[0] for n in names)], rows


def export(
    package: Path = typer.Argument(..., help="The package to export."),
    format: str = typer.Option(
        "onnx",
        "--format",
        "-f",
        help="onnx, torchscript, hf (gpt and Llama-family LLMs) or peft (a LoRA adapter).",
    ),
    out: Path | None = typer.Option(
        None, "-o", "--out", help="Output directory (default PACKAGE-FORMAT beside the package)."
    ),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", help="Largest allowed output difference on the test split."
    ),
    max_shard_size: str | None = typer.Option(
        None,
        "--max-shard-size",
        help="hf: largest safetensors file, e.g. 2GB or 500MB (default 5GB); bigger models "
        "are sharded with an index.",
    ),
) -> None:
    """Export a package, checking parity with it on the test split.

    ONNX becomes a package that `load_package` and `shipyard serve` run with ONNX Runtime.

    Example: shipyard export digits-pkg --format onnx -o digits-onnx

    TorchScript artifact: shipyard export digits-pkg --format torchscript

    Hugging Face directory (transformers' from_pretrained loads it):
    shipyard export qwen-pkg --format hf -o qwen-hf --max-shard-size 2GB

    A LoRA run's adapter for peft: shipyard export lora-pkg --format peft -o adapter
    """
    from shipyard.compress import export as run_export

    shard = _size_bytes(max_shard_size) if max_shard_size is not None else None
    path, parity = run_export(
        package,
        out,
        format=format,  # type: ignore[arg-type]  # validated by export()
        tolerance=tolerance,
        max_shard_size=shard,
    )
    if "tensors" in parity:  # a PEFT adapter: no model outputs to compare, the tensors are
        console.print(
            f"exported peft adapter → {path}: {parity['tensors']} tensors for "
            f"{parity['layers']} layers, read back and equal to the package's",
            highlight=False,
            soft_wrap=True,
        )
        return
    agreement = parity.get("argmax_agreement")
    agree = f", argmax agreement {agreement:.2%}" if agreement is not None else ""
    console.print(
        f"exported {format} → {path}; parity on {parity['rows']} test rows: max abs difference "
        f"{parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:g}){agree}",
        highlight=False,
        soft_wrap=True,  # one line, also when piped (no hard wrap at 80 columns)
    )


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size_bytes(text: str) -> int:
    """Bytes of '5GB', '500MB', '2GiB' or a plain number; ConfigError otherwise."""
    from shipyard.errors import ConfigError

    raw = text.strip().upper()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if raw.endswith(u)), None)
    number = raw[: -len(unit)] if unit else raw
    try:
        value = float(number) * (_UNITS[unit] if unit else 1)
    except ValueError:
        value = -1
    if value < 1:
        raise ConfigError(
            f"--max-shard-size {text!r} is not a size; use bytes or a number with KB, MB, GB "
            "(or KiB, MiB, GiB), e.g. 2GB"
        )
    return int(value)


def import_hf(
    directory: Path = typer.Argument(
        ...,
        help="A Hugging Face model directory: config.json, safetensors weights (one file or "
        "shards + index), tokenizer files. Families: llama, mistral, qwen2, qwen3, phi3, gpt2.",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Package directory to write."),
) -> None:
    """Import a Hugging Face checkpoint directory as a shipyard package.

    The weights are memory-mapped (about their size in RAM), the tokenizer and chat template
    kept as they are; pickled .bin checkpoints are refused.

    Example: shipyard import-hf ./Qwen2.5-0.5B-Instruct -o qwen-pkg
    """
    from shipyard.compress import import_hf as run_import
    from shipyard.package import verify_package

    path = run_import(directory, out)
    manifest = verify_package(path)
    console.print(
        f"wrote package {manifest.name} {manifest.version}: {path}", highlight=False, soft_wrap=True
    )
