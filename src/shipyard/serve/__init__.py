"""Serving: packages behind KServe V2 and simple JSON routes, with batching, auth and metrics.

Example::

    from shipyard.serve import ServeSettings, create_app
    app = create_app(ServeSettings(packages=["runs/digits/package"], max_batch_size=64))

See docs/serving.md.
"""

from __future__ import annotations

from shipyard.serve.app import create_app
from shipyard.serve.batching import Batcher
from shipyard.serve.core import ModelRepository, ServedModel
from shipyard.serve.settings import ServeError, ServeSettings

__all__ = ["Batcher", "ModelRepository", "ServeError", "ServeSettings", "ServedModel", "create_app"]
