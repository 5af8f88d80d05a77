"""`shipyard keys ...`: key management. Add a verb with `@keys_app.command("NAME")`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()

keys_app = typer.Typer(
    help=(
        "Create and manage keys.\n\n"
        "Examples:\n\n"
        "  shipyard keys generate -o release   (writes release.key and release.pub)"
    ),
    no_args_is_help=True,
    add_completion=False,
)


@keys_app.command("generate")
def generate(
    out: Path = typer.Option(
        ..., "-o", "--out", help="Name prefix: writes NAME.key (private) and NAME.pub."
    ),
) -> None:
    """Generate an Ed25519 signing key pair for packages.

    NAME.key is the private key (PEM, mode 0600: keep it secret); NAME.pub is what verifiers need.

    Example: shipyard keys generate -o release && shipyard package sign pkg --key release.key
    """
    from shipyard.package.signing import generate_signing_key

    private_path, public_path = generate_signing_key(out)
    console.print(f"private key: {private_path} (keep secret)", highlight=False)
    console.print(f"public key:  {public_path}", highlight=False)
