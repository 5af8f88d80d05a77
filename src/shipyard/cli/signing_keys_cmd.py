"""`shipyard signing-keys generate`: Ed25519 key pairs that sign and verify packages.

API keys for the server are another thing: `shipyard api-keys` (cli/api_keys_cmd.py).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from shipyard.package.signing import generate_signing_key

console = Console()

signing_keys_app = typer.Typer(
    help=(
        "Ed25519 key pairs that sign packages (`shipyard package sign`) and verify them "
        "(`shipyard serve --public-key`).\n\n"
        "Examples:\n\n"
        "  shipyard signing-keys generate -o release   (writes release.key and release.pub)"
    ),
    no_args_is_help=True,
    add_completion=False,
)


@signing_keys_app.command("generate")
def generate(
    out: Path = typer.Option(
        ..., "-o", "--out", help="Name prefix: writes NAME.key (private) and NAME.pub."
    ),
) -> None:
    """Generate an Ed25519 signing key pair for packages.

    NAME.key is the private key (PEM, mode 0600: keep it secret); NAME.pub is what verifiers need.

    Example: shipyard signing-keys generate -o release

    then: shipyard package sign pkg --key release.key
    """
    private_path, public_path = generate_signing_key(out)
    console.print(f"private key: {private_path} (keep secret)", highlight=False)
    console.print(f"public key:  {public_path}", highlight=False)
