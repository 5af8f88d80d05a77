"""Compression and export: a package in, a child package (and a report) out.

Example::

    from shipyard.compress import quantize, prune, distill, export, import_hf

    result = quantize("digits-pkg", "digits-int8")          # dynamic int8 Linear layers
    result.package, result.report["delta"]                  # child path, measured changes
    prune("digits-pkg", "digits-half", 0.5, structured=True, finetune_steps=100)
    distill("digits-pkg", "digits-small", "student.yaml")
    path, parity = export("digits-pkg", "digits-onnx", format="onnx")
    import_hf("gpt-hf", "gpt-pkg")

Every child records its parent (`lineage.parent`) and how it was made (`derivation`), and loads
with `shipyard.package.load_package` like any package: without pickle, by architecture name.
See docs/compression.md.
"""

from __future__ import annotations

from shipyard.compress.errors import CompressError, ExportError
from shipyard.compress.export import export
from shipyard.compress.hf import import_hf
from shipyard.compress.layers import DynamicInt8Linear, Int8Linear, quantize_linears
from shipyard.compress.measure import BenchParams
from shipyard.compress.pipeline import CompressResult, compress, distill, prune, quantize

__all__ = [
    "BenchParams",
    "CompressError",
    "CompressResult",
    "DynamicInt8Linear",
    "ExportError",
    "Int8Linear",
    "compress",
    "distill",
    "export",
    "import_hf",
    "prune",
    "quantize",
    "quantize_linears",
]
