"""Errors of compression and export (the CLI prints them as one line and exits with code 2)."""

from __future__ import annotations

from shipyard.errors import ShipyardError


class CompressError(ShipyardError):
    """A compression method cannot be applied (wrong model kind, bad parameter, ...)."""


class ExportError(CompressError):
    """An export failed, or its parity check against the package is off beyond tolerance."""
