"""Packages: a verified, loadable-without-code directory that fully describes a trained model.

Example::

    from shipyard.train import package_run
    from shipyard.package import load_package
    path = package_run("runs/digits-mlp/20261124-101500")      # → runs/.../package
    loaded = load_package(path)                                 # verifies every file's hash
    loaded.predict([[0.0] * 64])                                # [{"label": "0", ...}]

See docs/packages.md for the format and its safety guarantees.
"""

from __future__ import annotations

from shipyard.package.archive import pack_package, unpack_package
from shipyard.package.loading import (
    InvalidInputError,
    LoadedModel,
    build_empty_model,
    conform_input,
    load_package,
)
from shipyard.package.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    ONNX_MODEL,
    SIGNATURE,
    TOKENIZER,
    WEIGHTS,
    Architecture,
    Derivation,
    Encryption,
    FileEntry,
    Lineage,
    Manifest,
    ParentRef,
    Quantization,
    Signature,
    TensorSpec,
    manifest_sha256,
    read_manifest,
    verify_package,
)
from shipyard.package.security import (
    KEY_ENV,
    decrypt_package,
    encrypt_package,
    generate_package_key,
    sign_package,
)
from shipyard.package.signing import generate_signing_key, verify_signature
from shipyard.package.writer import build_signature, write_package

__all__ = [
    "FORMAT_VERSION",
    "KEY_ENV",
    "MANIFEST",
    "ONNX_MODEL",
    "SIGNATURE",
    "TOKENIZER",
    "WEIGHTS",
    "Architecture",
    "Derivation",
    "Encryption",
    "FileEntry",
    "InvalidInputError",
    "Lineage",
    "LoadedModel",
    "Manifest",
    "ParentRef",
    "Quantization",
    "Signature",
    "TensorSpec",
    "build_empty_model",
    "build_signature",
    "conform_input",
    "decrypt_package",
    "encrypt_package",
    "generate_package_key",
    "generate_signing_key",
    "load_package",
    "manifest_sha256",
    "pack_package",
    "read_manifest",
    "sign_package",
    "unpack_package",
    "verify_package",
    "verify_signature",
    "write_package",
]
