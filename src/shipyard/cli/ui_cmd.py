"""`shipyard ui`: the web dashboard (runs, compare, registry, server, playground) on its own."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from shipyard.cli.serve_cmd import (
    KEYS_FILE_HELP,
    _default_keys_file,
    _first_error,
    _preflight,
    run_server,
)
from shipyard.serve.settings import ServeError, ServeSettings


def ui(
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of run directories to show."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8500, "--port", "-p", help="Port (0: pick a free one)."),
    keys_file: Path | None = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve without API keys even off loopback."
    ),
    registry_url: str | None = typer.Option(
        None, "--registry-url", help="Registry database URL (default $SHIPYARD_REGISTRY_URL)."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
) -> None:
    """Open the web dashboard: runs and their curves, comparisons, the registry (promote,
    rollback, history) and this server's metrics. To try served models in the playground,
    use `shipyard serve PACKAGE --ui` instead.

    Example: shipyard ui --runs runs --port 8500   (then open http://127.0.0.1:8500/ui/)

    Off loopback, keys are required (as for serve):
    shipyard ui --host 0.0.0.0 --keys-file keys.json
    """
    if keys_file is None and not insecure_no_auth:
        default = _default_keys_file()
        keys_file = default if default.is_file() else None
    if not runs.is_dir():
        raise ServeError(
            f"{runs}: no such folder of runs; pass --runs DIR (where `shipyard train` wrote runs)"
        )
    try:
        settings = ServeSettings(
            host=host,
            port=port,
            keys_file=keys_file.resolve() if keys_file else None,
            insecure_no_auth=insecure_no_auth,
        )
    except ValidationError as exc:
        raise ServeError(_first_error(exc)) from None
    _preflight(settings)  # as for serve: a keys file without an active key fails here
    from shipyard.ui.app import UISettings

    run_server(
        settings,
        log_level=log_level,
        ui=UISettings(runs_dir=runs.resolve(), registry_url=registry_url),
    )
