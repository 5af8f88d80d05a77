"""Server settings: one validated object that `shipyard serve`, `create_app` and workers share.

Workers started by uvicorn (`--workers N`) import the app factory in a fresh process, so the
settings travel as JSON in the `SHIPYARD_SERVE_SETTINGS` environment variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shipyard.errors import ShipyardError

SETTINGS_ENV = "SHIPYARD_SERVE_SETTINGS"

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ServeError(ShipyardError):
    """The server cannot start or an operation on it was refused (bad settings, bad package)."""


class ServeSettings(BaseModel):
    """Everything the server needs to start. Defaults are safe for a loopback-only server."""

    model_config = ConfigDict(extra="forbid")

    packages: list[Path] = Field(default_factory=list, description="Package directories to serve.")
    registry_refs: list[str] = Field(
        default_factory=list, description="Registry refs to serve: NAME, NAME:VERSION, NAME@ALIAS."
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapter packages served on the one served package (their base): "
        "model name -> package directory.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    keys_file: Path | None = None
    insecure_no_auth: bool = False
    public_key: Path | None = Field(
        None, description="Ed25519 public key: require signed packages."
    )
    # dynamic batching
    max_batch_size: int = Field(32, ge=1, le=65536, description="Rows per forward pass.")
    max_wait_ms: float = Field(0.0, ge=0, le=10_000, description="How long a batch waits to fill.")
    # language models (continuous batching engine, one per LM model version)
    max_running_seqs: int = Field(
        16, ge=1, le=4096, description="Sequences a language model decodes together."
    )
    decode_weights: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="Language models: auto (the package's weights, fastest exact kernel), "
        "int8 (quantize fp32 weights to int8 for decoding) or fp32.",
    )
    kv_cache: Literal["auto", "fp32", "fp16"] = Field(
        "auto",
        description="Language models: what the KV cache stores: auto (float16 with int8 "
        "weights on the native kernels, else the model's dtype), fp32 or fp16.",
    )
    # limits
    max_queue: int = Field(
        256,
        ge=1,
        description="Queued requests per model before 503 (for language models: waiting "
        "generation requests beyond --max-running-seqs).",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Per-request deadline (queue + forward) → 504."
    )
    max_body_bytes: int = Field(16 << 20, ge=1024, description="Request bodies above this → 413.")
    rate_limit: float | None = Field(
        None, gt=0, description="Requests/s per API key (token bucket)."
    )
    rate_burst: int | None = Field(None, ge=1, description="Bucket size (default: 2×rate, ≥1).")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads per worker.")
    metrics_public: bool = Field(
        False, description="Serve /metrics without a key even when not bound to loopback."
    )
    access_log: bool = True

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if not self.insecure_no_auth and not self.keys_file and not is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host!r} without API keys: pass --keys-file (create keys "
                "with `shipyard api-keys add`) or --insecure-no-auth to serve without "
                "authentication"
            )
        if self.adapters:
            self._check_adapters()
        return self

    def _check_adapters(self) -> None:
        served = len(self.packages) + len(self.registry_refs)
        if served != 1:
            raise ValueError(
                f"--adapter needs exactly one served package, the adapters' base; got {served}"
            )
        for name in self.adapters:
            if not MODEL_NAME.match(name):
                raise ValueError(
                    f"--adapter name {name!r} is not a model name (letters, digits, '.', '_', "
                    "'-'; starting with a letter or digit)"
                )
        if self.decode_weights == "int8":
            raise ValueError(
                "--decode-weights int8 cannot serve --adapter: the adapted layers decode on the "
                "base's fp32 weights; use auto or fp32"
            )

    @property
    def auth_enabled(self) -> bool:
        """True when requests must carry an API key."""
        return self.keys_file is not None and not self.insecure_no_auth

    def to_env(self) -> None:
        """Publish the settings for worker processes (see `from_env`)."""
        os.environ[SETTINGS_ENV] = self.model_dump_json()

    @classmethod
    def from_env(cls) -> ServeSettings:
        """The settings a parent `shipyard serve` published (worker processes call this)."""
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise ServeError(f"{SETTINGS_ENV} is not set: start workers with `shipyard serve`")
        return cls.model_validate_json(raw)


def default(name: str) -> Any:
    """The default of one setting: `shipyard serve`'s options and the batcher take theirs from
    here, so each default is written once (in `ServeSettings`)."""
    return ServeSettings.model_fields[name].get_default(call_default_factory=True)


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
