"""Serving: packages behind KServe V2 and simple JSON routes, with batching, auth and metrics.

Example::

    from shipyard.serve import ServeSettings, create_app
    app = create_app(ServeSettings(packages=["runs/digits/package"], max_batch_size=64))

See docs/serving.md.

The names below are imported from their modules on first use (PEP 562), so managing API keys
(`shipyard api-keys`, which needs only `shipyard.serve.auth`) imports neither the app nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
