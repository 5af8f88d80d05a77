"""`shipyard config validate|show|schema`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from shipyard.config import config_reference_markdown, config_schema, dump_config, load_config
from shipyard.errors import ConfigError

config_app = typer.Typer(
    help="Validate, show and describe run configs.", no_args_is_help=True, add_completion=False
)
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option(
    [], "--set", "-s", help="Override a key: section.key=value (YAML value; repeatable)."
)


@config_app.command("validate")
def validate(
    files: list[Path] = typer.Argument(..., help="Config files to check."),
    overrides: list[str] = SetOption,
) -> None:
    """Check config files; exit 2 naming every bad key.

    Example: shipyard config validate examples/*.yaml
    """
    failures = []
    for path in files:
        try:
            cfg = load_config(path, overrides)
        except ConfigError as exc:
            failures.append(str(exc))
            continue
        console.print(
            f"[green]ok[/green] {path} ({cfg.task}, model {cfg.model.name})", highlight=False
        )
    if failures:
        raise ConfigError("\n".join(failures))


@config_app.command("show")
def show(
    file: Path = typer.Argument(..., help="Config file."),
    overrides: list[str] = SetOption,
) -> None:
    """Print the resolved YAML with every default filled in and overrides applied.

    Example: shipyard config show examples/digits-mlp.yaml --set optim.lr=0.01
    """
    cfg = load_config(file, overrides)
    typer.echo(dump_config(cfg), nl=False)


@config_app.command("schema")
def schema() -> None:
    """Print the JSON Schema of run configs (for editor autocompletion of YAML).

    Example: shipyard config schema > shipyard.schema.json
    """
    typer.echo(json.dumps(config_schema(), indent=2))


@config_app.command("docs")
def docs() -> None:
    """Print the Markdown reference of every config key (type, default, description).

    Example: shipyard config docs > docs/configuration.md
    """
    typer.echo(config_reference_markdown())
