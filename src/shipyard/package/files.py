"""The fixed file names of a package directory (the format's own vocabulary, nothing else)."""

from __future__ import annotations

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WEIGHTS = "model.safetensors"
ONNX_MODEL = "model.onnx"
TOKENIZER = "tokenizer.json"
RESERVED = frozenset({MANIFEST, SIGNATURE})  # never listed in the manifest's `files`
TOKENIZER_CONFIG = "tokenizer_config.json"  # an imported HF tokenizer's settings and chat template
