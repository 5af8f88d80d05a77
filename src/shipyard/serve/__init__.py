"""Serving: packages behind KServe V2 and simple JSON routes, with batching, auth and metrics.

Example::

    from shipyard.serve import ServeSettings, create_app
    app = create_app(ServeSettings(packages=["runs/digits/package"], max_batch_size=64))

See docs/serving.md.

The names below are imported from their modules on first use (PEP 562), so managing API keys
(`shipyard api-keys`, which needs only `shipyard.serve.auth`) imports neither the app nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shipyard.serve.app import create_app
    from shipyard.serve.batching import Batcher
    from shipyard.serve.core import ModelRepository, ServedModel
    from shipyard.serve.settings import ServeError, ServeSettings

# Each public name → the module (under shipyard.serve) that defines it.
_EXPORTS: dict[str, str] = {
    "create_app": "app",
    "Batcher": "batching",
    "ModelRepository": "core",
    "ServedModel": "core",
    "ServeError": "settings",
    "ServeSettings": "settings",
}

__all__ = ["Batcher", "ModelRepository", "ServeError", "ServeSettings", "ServedModel", "create_app"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
