"""Project exceptions. The CLI turns them into one red line and exit code 2."""

from __future__ import annotations


class ShipyardError(Exception):
    """Base class for every error shipyard raises on purpose (bad input, bad state)."""


class ConfigError(ShipyardError):
    """A run config is invalid: unknown key, wrong type, or inconsistent sections."""


class DataError(ShipyardError):
    """Data cannot be loaded or split: missing file/column, non-numeric feature, empty split..."""


class ModelError(ShipyardError):
    """A model cannot be built from its config."""


class TrainError(ShipyardError):
    """Training cannot start or continue (e.g. resume with an incompatible config)."""


class CheckpointError(ShipyardError):
    """A checkpoint is missing, corrupt or incompatible."""


class PackageError(ShipyardError):
    """A package is malformed, tampered with, or cannot be loaded safely."""


class EvaluateError(ShipyardError):
    """Metrics or reports got inputs they cannot use (wrong shapes, labels out of range...)."""


class RegistryError(ShipyardError):
    """The model registry or its artifact store refused an operation (bad name, unknown ref...)."""


class GenerationError(ShipyardError):
    """A generation request is invalid: bad sampling parameter, prompt too long for the model."""


class EngineOverloaded(ShipyardError):
    """The generation engine's wait queue is full (or it is shutting down); retry later."""
