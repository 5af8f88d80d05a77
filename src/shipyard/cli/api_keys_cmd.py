"""`shipyard api-keys add|list|revoke`: the API keys `shipyard serve` checks (scopes infer, admin).

Package-signing keys are another thing: `shipyard signing-keys` (cli/signing_keys_cmd.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from shipyard.cli.tables import print_rows
from shipyard.serve.auth import add_key, default_keys_file, read_keys, revoke_key

console = Console()

KEYS_FILE_HELP = "API keys file (default $SHIPYARD_HOME/serve/keys.json)."

api_keys_app = typer.Typer(
    help=(
        "API keys for `shipyard serve`: create, list, revoke. Only a salted hash is stored.\n\n"
        "Examples:\n\n"
        "  shipyard api-keys add --scope infer --name billing-service\n\n"
        "  shipyard api-keys list\n\n"
        "  shipyard api-keys revoke billing-service"
    ),
    no_args_is_help=True,
    add_completion=False,
)


@api_keys_app.command("add")
def add(
    scope: str = typer.Option(..., "--scope", help="infer (predict) or admin (manage + infer)."),
    name: str | None = typer.Option(None, "--name", help="A name to recognise the key by."),
    keys_file: Path | None = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
) -> None:
    """Create an API key for `shipyard serve`; the key is printed once, only its hash is stored.

    Example: shipyard api-keys add --scope infer --name billing-service --keys-file keys.json
    """
    path = keys_file or default_keys_file()
    key, record = add_key(path, scope, name)
    typer.echo(key)
    Console(stderr=True).print(
        f"added {record.scope} key {record.id} ({record.name}) to {path}; it is shown only "
        "once, store it now",
        highlight=False,
    )


@api_keys_app.command("list")
def list_keys(
    keys_file: Path | None = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List API keys (ids, names, scopes; never secrets).

    Example: shipyard api-keys list --keys-file keys.json
    """
    keys = read_keys(keys_file or default_keys_file())
    if as_json:
        typer.echo(json.dumps([k.public() for k in keys], indent=2))
        return
    rows = [[k.id, k.name, k.scope, k.created, "revoked" if k.revoked else "active"] for k in keys]
    print_rows(console, ["id", "name", "scope", "created", "status"], rows)


@api_keys_app.command("revoke")
def revoke(
    key: str = typer.Argument(..., help="Key id or name."),
    keys_file: Path | None = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
) -> None:
    """Revoke an API key; a running server refuses it within a second.

    Example: shipyard api-keys revoke billing-service --keys-file keys.json
    """
    record = revoke_key(keys_file or default_keys_file(), key)
    console.print(f"revoked key {record.id} ({record.name})", highlight=False)
