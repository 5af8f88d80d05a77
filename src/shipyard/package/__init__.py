"""Packages: a verified, loadable-without-code directory that fully describes a trained model.

Example::

    from shipyard.train import package_run
    from shipyard.package import load_package
    path = package_run("runs/digits-mlp/20261124-101500")      # → runs/.../package
    loaded = load_package(path)                                 # verifies every file's hash
    loaded.predict([[0.0] * 64])                                # [{"label": "0", ...}]

See docs/packages.md for the format and its safety guarantees.

The names below are imported from their modules on first use (PEP 562), so verifying, signing
or registering a package (`shipyard package verify`, `shipyard models register`) never imports
torch: only loading and writing one does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.lazy import lazy_exports

if TYPE_CHECKING:
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

# Each public name → the module (under shipyard.package) that defines it.
_EXPORTS: dict[str, str] = {
    "pack_package": "archive",
    "unpack_package": "archive",
    "InvalidInputError": "loading",
    "LoadedModel": "loading",
    "build_empty_model": "loading",
    "conform_input": "loading",
    "load_package": "loading",
    "FORMAT_VERSION": "manifest",
    "MANIFEST": "manifest",
    "ONNX_MODEL": "manifest",
    "SIGNATURE": "manifest",
    "TOKENIZER": "manifest",
    "WEIGHTS": "manifest",
    "Architecture": "manifest",
    "Derivation": "manifest",
    "Encryption": "manifest",
    "FileEntry": "manifest",
    "Lineage": "manifest",
    "Manifest": "manifest",
    "ParentRef": "manifest",
    "Quantization": "manifest",
    "Signature": "manifest",
    "TensorSpec": "manifest",
    "manifest_sha256": "manifest",
    "read_manifest": "manifest",
    "verify_package": "manifest",
    "KEY_ENV": "security",
    "decrypt_package": "security",
    "encrypt_package": "security",
    "generate_package_key": "security",
    "sign_package": "security",
    "generate_signing_key": "signing",
    "verify_signature": "signing",
    "build_signature": "writer",
    "write_package": "writer",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
