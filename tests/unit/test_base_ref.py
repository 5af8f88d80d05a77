"""`manifest.lora.base`: a package base (manifest + weights digests) or a Hugging Face checkpoint
base (its source fingerprint), exactly one of them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shipyard.package.manifest import BaseRef

SHA = "a" * 64


def test_a_base_is_a_package_or_a_checkpoint() -> None:
    package = BaseRef(name="b", version="1", manifest_sha256=SHA, weights_hash=f"blake3:{SHA}")
    checkpoint = BaseRef(name="b", version="hf", source_fingerprint=f"sha256:{SHA}")
    assert package.source_fingerprint is None and checkpoint.manifest_sha256 is None
    for bad in (
        {},  # neither
        {"manifest_sha256": SHA},  # half a package
        {
            "manifest_sha256": SHA,
            "weights_hash": f"sha256:{SHA}",
            "source_fingerprint": f"sha256:{SHA}",
        },
    ):
        with pytest.raises(ValidationError, match="manifest_sha256 and weights_hash"):
            BaseRef(name="b", version="1", **bad)
