"""`shipyard models ...`: register, list, show, promote, rollback, delete and pull packages."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from shipyard.cli.tables import field_table, print_rows
from shipyard.errors import RegistryError

console = Console()

models_app = typer.Typer(
    help=(
        "The model registry: packages by name and version, with aliases "
        "(staging, production...).\n\n"
        "Database: $SHIPYARD_REGISTRY_URL (default SQLite in $SHIPYARD_HOME). "
        "Artifacts: $SHIPYARD_ARTIFACT_ROOT "
        "(default $SHIPYARD_HOME/artifacts; or s3://bucket/prefix)."
    ),
    no_args_is_help=True,
)


def _registry() -> Any:
    from shipyard.package.registry import Registry

    return Registry()


def _split_version_ref(ref: str) -> tuple[str, int]:
    from shipyard.package.registry import parse_ref

    name, version, _alias = parse_ref(ref)
    if version is None:
        raise RegistryError(f"{ref!r}: give an exact version as NAME:VERSION (e.g. {name}:3)")
    return name, version


def _parse_tags(raw: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegistryError(f"bad --tag {item!r}: use KEY=VALUE (e.g. --tag team=vision)")
        tags[key] = value
    return tags


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _summary(mv: Any) -> str:
    aliases = f" ({', '.join(mv.aliases)})" if mv.aliases else ""
    return f"{mv.ref}{aliases}"


@models_app.command("register")
def register(
    package: Path = typer.Argument(
        ..., help="A package directory (manifest.json, model.safetensors)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Register under this name (default: the package's)."
    ),
    description: str | None = typer.Option(
        None, "--description", help="Free text for this version."
    ),
    tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE label (repeatable)."),
) -> None:
    """Verify a package and record it as the next version of its model.

    Example: shipyard models register runs/digits-mlp/20250101-120000/package --tag team=vision
    """
    with _registry() as registry:
        mv = registry.register(package, name=name, description=description, tags=_parse_tags(tag))
    console.print(f"registered [bold]{mv.ref}[/bold] -> {mv.artifact_uri}", highlight=False)


@models_app.command("list")
def list_models(
    name: str | None = typer.Argument(None, help="Show the versions of this model instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List registered models, or the versions of one model.

    Example: shipyard models list            (or: shipyard models list digits-mlp)
    """
    with _registry() as registry:
        models = registry.list_models() if name is None else []
        versions = registry.list_versions(name) if name is not None else []
    if name is None:
        if as_json:
            typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
            return
        rows = [
            [
                m.name,
                _fmt(m.latest_version),
                str(m.versions),
                ", ".join(f"{a}={v}" for a, v in m.aliases.items()),
                m.description or "",
            ]
            for m in models
        ]
        header = ["name", "latest", "versions", "aliases", "description"]
        print_rows(
            console, header, rows, title=f"models ({len(models)})", right=["latest", "versions"]
        )
        return
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in versions], indent=2))
        return
    rows = [
        [
            str(v.version),
            ", ".join(v.aliases),
            v.task or "",
            v.created.strftime("%Y-%m-%d %H:%M:%S"),
            v.manifest_sha256[:12],
            v.description or "",
        ]
        for v in versions
    ]
    header = ["version", "aliases", "task", "created", "sha256", "description"]
    print_rows(
        console, header, rows, title=f"{name}: {len(versions)} version(s)", right=["version"]
    )


@models_app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME (latest), NAME:VERSION or NAME@ALIAS."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show one version: artifact, digest, aliases, tags and metrics.

    Example: shipyard models show digits-mlp@production
    """
    with _registry() as registry:
        mv = registry.get(ref)
    if as_json:
        typer.echo(json.dumps(mv.to_dict(), indent=2))
        return
    table = field_table(mv.ref)
    rows: list[tuple[str, Any]] = [
        ("aliases", ", ".join(mv.aliases)),
        ("task", mv.task),
        ("created", mv.created.isoformat(timespec="seconds")),
        ("artifact", mv.artifact_uri),
        ("manifest sha256", mv.manifest_sha256),
        ("source package", f"{mv.source_name} {mv.source_version}"),
        ("description", mv.description),
    ]
    rows += [(f"tag {k}", v) for k, v in mv.tags.items()]
    rows += [(f"metric {k}", v) for k, v in _flat(mv.metrics or {}).items()]
    for key, value in rows:
        table.add_row(key, _fmt(value))
    console.print(table)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, int | float | str | bool) or value is None:
            out[f"{prefix}{key}"] = value
    return out


@models_app.command("promote")
def promote(
    ref: str = typer.Argument(..., help="NAME:VERSION to promote."),
    to: str = typer.Option(..., "--to", help="Alias: staging, production, archived or your own."),
) -> None:
    """Point an alias at a version (the previous target is kept for rollback).

    Example: shipyard models promote digits-mlp:3 --to production
    """
    name, version = _split_version_ref(ref)
    with _registry() as registry:
        mv = registry.promote(name, version, to, actor=_cli_actor())
    console.print(f"{name}@{to} -> {_summary(mv)}", highlight=False)


@models_app.command("rollback")
def rollback(
    name: str = typer.Argument(..., help="Model name."),
    alias: str = typer.Option("production", "--alias", help="Alias to move back."),
) -> None:
    """Move an alias back to the version it pointed to before its last promotion.

    Example: shipyard models rollback digits-mlp --alias production
    """
    with _registry() as registry:
        mv = registry.rollback(name, alias, actor=_cli_actor())
    console.print(f"{name}@{alias} -> {_summary(mv)}", highlight=False)


@models_app.command("history")
def history(
    name: str = typer.Argument(..., help="Model name."),
    alias: str | None = typer.Option(None, "--alias", help="Only this alias."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show every promotion and rollback of a model's aliases, newest first, and who made it.

    Example: shipyard models history digits-mlp --alias production
    """
    with _registry() as registry:
        events = registry.history(name, alias)
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in events], indent=2))
        return
    rows = [
        [
            e.created.isoformat(timespec="seconds"),
            e.alias,
            e.action + (" (rolled back)" if e.undone else ""),
            str(e.version),
            e.actor or "unknown",
        ]
        for e in events
    ]
    print_rows(console, ["when", "alias", "action", "version", "who"], rows)


@models_app.command("delete")
def delete(
    ref: str = typer.Argument(..., help="NAME:VERSION to delete."),
    force: bool = typer.Option(
        False, "--force", help="Also when aliases point to it (removes them)."
    ),
) -> None:
    """Delete a version and its artifact (refused while an alias points to it, unless --force).

    Example: shipyard models delete digits-mlp:2
    """
    name, version = _split_version_ref(ref)
    with _registry() as registry:
        mv = registry.delete(name, version, force=force)
    console.print(f"deleted {mv.ref} ({mv.artifact_uri})", highlight=False)


@models_app.command("pull")
def pull(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS."),
    dest: Path = typer.Argument(..., help="New directory to write the package to."),
) -> None:
    """Download a version into a new directory, verified against its manifest.

    Example: shipyard models pull digits-mlp@production ./digits-prod
    """
    with _registry() as registry:
        mv = registry.get(ref)
        path = registry.pull(mv.ref, dest)
    console.print(f"pulled {_summary(mv)} -> {path}", highlight=False)


def _cli_actor() -> str:
    """Who the alias history records for a change made from the command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"
