"""`shipyard package RUN_DIR` and `shipyard package verify|sign|pack|unpack|encrypt|...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from shipyard.cli.tables import field_table

console = Console()


class _BuildByDefault(TyperGroup):
    """A group where `shipyard package RUN_DIR ...` means `shipyard package build RUN_DIR ...`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's click Context
        help_names = set(ctx.help_option_names)
        if args and args[0] not in self.commands and args[0] not in help_names:
            args = ["build", *args]
        return super().parse_args(ctx, args)


package_app = typer.Typer(
    cls=_BuildByDefault,
    help=(
        "Build, verify, sign, encrypt and pack model packages.\n\n"
        "Examples:\n\n"
        "  shipyard package runs/digits-mlp/20261124-101500 -o digits-pkg\n\n"
        "  shipyard package verify digits-pkg --public-key me.pub\n\n"
        "  shipyard package sign digits-pkg --key me.key\n\n"
        "  shipyard package pack digits-pkg -o digits.ship\n\n"
        "  shipyard package inspect digits-pkg"
    ),
    no_args_is_help=True,
    add_completion=False,
)

KeyFileOption = typer.Option(
    None,
    "--key-file",
    help="File with the 256-bit key (hex or base64); default $SHIPYARD_PACKAGE_KEY.",
)


@package_app.command("build")
def build(
    run_dir: Path = typer.Argument(..., help="A training run directory."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output (default RUN_DIR/package)."),
) -> None:
    """Package a run's best checkpoint (also: `shipyard package RUN_DIR`).

    Example: shipyard package runs/digits-mlp/20261124-101500 -o digits-pkg
    """
    from shipyard.package import verify_package
    from shipyard.train import package_run

    path = package_run(run_dir, out)
    manifest = verify_package(path)
    console.print(f"wrote package {manifest.name} {manifest.version}: {path}", highlight=False)


@package_app.command("verify")
def verify(
    path: Path = typer.Argument(..., help="A package directory."),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="Require a valid signature by this Ed25519 public key (PEM)."
    ),
) -> None:
    """Check every file's size and hash (and the signature with --public-key).

    Example: shipyard package verify digits-pkg --public-key me.pub
    """
    from shipyard.package import verify_package

    manifest = verify_package(path, public_key=public_key)
    signed = ", signature valid" if public_key is not None else ""
    console.print(
        f"ok {manifest.name} {manifest.version}: {len(manifest.files)} file(s) verified{signed}",
        highlight=False,
    )


@package_app.command("sign")
def sign(
    path: Path = typer.Argument(..., help="A package directory."),
    key: Path = typer.Option(
        ..., "--key", help="Ed25519 private key (from `shipyard signing-keys generate`)."
    ),
) -> None:
    """Sign a package: write manifest.sig (Ed25519 over manifest.json).

    Example: shipyard signing-keys generate -o me && shipyard package sign digits-pkg --key me.key
    """
    from shipyard.package import sign_package

    sig = sign_package(path, key)
    console.print(f"signed: {sig}", highlight=False)


@package_app.command("pack")
def pack(
    path: Path = typer.Argument(..., help="A package directory."),
    out: Path = typer.Option(..., "-o", "--out", help="Output file, e.g. model.ship."),
) -> None:
    """Write a package as one file (a tar).

    Example: shipyard package pack digits-pkg -o digits.ship
    """
    from shipyard.package import pack_package

    target = pack_package(path, out)
    console.print(f"packed {path} → {target} ({target.stat().st_size} bytes)", highlight=False)


@package_app.command("unpack")
def unpack(
    file: Path = typer.Argument(..., help="A packed package (.ship)."),
    out: Path = typer.Option(..., "-o", "--out", help="Directory to create."),
    max_size: float = typer.Option(
        20.0, "--max-size", help="Refuse archives whose files add up to more GiB than this."
    ),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="Also require a valid signature by this public key."
    ),
) -> None:
    """Safely extract and verify a packed package.

    Example: shipyard package unpack digits.ship -o digits-pkg
    """
    from shipyard.package import unpack_package

    target = unpack_package(file, out, max_bytes=int(max_size * (1 << 30)), public_key=public_key)
    console.print(f"unpacked and verified: {target}", highlight=False)


@package_app.command("encrypt")
def encrypt(
    path: Path = typer.Argument(..., help="A package directory."),
    out: Path = typer.Option(..., "-o", "--out", help="Directory for the encrypted copy."),
    key_file: Path | None = KeyFileOption,
) -> None:
    """Write an encrypted copy (AES-256-GCM) of a package; sign it again afterwards.

    Example: SHIPYARD_PACKAGE_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')
    shipyard package encrypt digits-pkg -o digits-enc
    """
    from shipyard.package import encrypt_package

    target = encrypt_package(path, out, key_file)
    console.print(f"encrypted copy: {target}", highlight=False)


@package_app.command("decrypt")
def decrypt(
    path: Path = typer.Argument(..., help="An encrypted package directory."),
    out: Path = typer.Option(..., "-o", "--out", help="Directory for the decrypted copy."),
    key_file: Path | None = KeyFileOption,
) -> None:
    """Write a decrypted copy of an encrypted package.

    Example: shipyard package decrypt digits-enc -o digits-plain --key-file package.key
    """
    from shipyard.package import decrypt_package

    target = decrypt_package(path, out, key_file)
    console.print(f"decrypted copy: {target}", highlight=False)


@package_app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="A package directory."),
    as_json: bool = typer.Option(False, "--json", help="Print manifest.json instead of a table."),
) -> None:
    """Show a package's manifest (after verifying it).

    Example: shipyard package inspect digits-pkg
    """
    from shipyard.package import SIGNATURE, manifest_sha256, verify_package

    manifest = verify_package(path)
    if as_json:
        typer.echo(manifest.to_json(), nl=False)
        return
    table = field_table(f"{manifest.name} {manifest.version}")
    rows: list[tuple[str, Any]] = [
        ("task", manifest.task),
        ("architecture", f"{manifest.architecture.name} {_compact(manifest.architecture.config)}"),
        ("created", manifest.created),
        ("digest", f"sha256:{manifest_sha256(path)}"),
        ("signed", "yes" if (Path(path) / SIGNATURE).is_file() else "no"),
        ("encrypted", manifest.encryption.algorithm if manifest.encryption else "no"),
    ]
    for spec in manifest.signature.inputs:
        rows.append(("input", f"{spec.name} {spec.datatype} {spec.shape}"))
    for spec in manifest.signature.outputs:
        rows.append(("output", f"{spec.name} {spec.datatype} {spec.shape}"))
    if manifest.labels:
        rows.append(("labels", ", ".join(manifest.labels[:20])))
    for split, values in manifest.metrics.items():
        rows.append((f"{split} metrics", ", ".join(f"{k}={v:.4g}" for k, v in values.items())))
    lin = manifest.lineage
    rows += [
        ("config sha256", lin.config_sha256),
        ("data fingerprint", lin.data_fingerprint),
        ("git commit", lin.git_commit or "-"),
        ("run", f"{lin.run_dir or '-'} (step {lin.checkpoint_step})"),
        ("parent", f"{lin.parent.name} {lin.parent.version}" if lin.parent else "-"),
        ("derivation", manifest.derivation.method if manifest.derivation else "-"),
        ("versions", f"shipyard {lin.shipyard_version}, torch {lin.torch_version}"),
    ]
    for name, entry in manifest.files.items():
        rows.append((f"file {name}", f"{entry.size} bytes, {entry.algorithm}:{entry.digest[:16]}…"))
    for field, value in rows:
        table.add_row(field, str(value))
    console.print(table)


def _compact(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "name"}, separators=(",", ":"))
