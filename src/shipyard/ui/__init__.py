"""The web dashboard: runs, comparisons, the registry, a live server view and a playground.

Server-rendered pages over JSON endpoints (`shipyard.ui.api`), plain JavaScript and CSS served
from this package (no CDN, no build step), a strict Content-Security-Policy. Mount it on a server
app with `mount_ui(create_app(settings), UISettings(runs_dir="runs"))`, or run `shipyard ui`.
"""

from __future__ import annotations

from shipyard.ui.app import UISettings, create_ui_app, mount_ui
from shipyard.ui.runs import RunStore, UIError, config_diff, downsample

__all__ = [
    "RunStore",
    "UIError",
    "UISettings",
    "config_diff",
    "create_ui_app",
    "downsample",
    "mount_ui",
]
