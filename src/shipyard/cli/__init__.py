"""The `shipyard` command line: a Typer app whose verbs are thin calls into the library."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer
from rich.console import Console

from shipyard import __version__
from shipyard.errors import ShipyardError

err_console = Console(stderr=True)

# Each verb: (its module under shipyard.cli, the Typer sub-app or command function in it, whether
# it is a sub-app, whether it is hidden), in the order they were always registered. A verb's module
# is imported only when the app is built with it, so `shipyard train ...` (and every torchrun
# worker) skips the server's, the compressor's and the other verbs' imports.
VERBS: dict[str, tuple[str, str, bool, bool]] = {
    "config": ("config_cmd", "config_app", True, False),
    "package": ("package_cmd", "package_app", True, False),
    "api-keys": ("api_keys_cmd", "api_keys_app", True, False),
    "signing-keys": ("signing_keys_cmd", "signing_keys_app", True, False),
    "keys": ("keys_cmd", "keys_app", True, True),  # deprecated spelling
    "models": ("models_cmd", "models_app", True, False),
    "train": ("train_cmd", "train", False, False),
    "eval": ("train_cmd", "evaluate", False, False),
    "cv": ("tuning_cmd", "cv", False, False),
    "tune": ("tuning_cmd", "tune", False, False),
    "serve": ("serve_cmd", "serve", False, False),
    "predict": ("serve_cmd", "predict", False, False),
    "compress": ("compress_cmd", "compress", False, False),
    "export": ("compress_cmd", "export", False, False),
    "import-hf": ("compress_cmd", "import_hf", False, False),
    "generate": ("generate_cmd", "generate", False, False),
    "ui": ("ui_cmd", "ui", False, False),
}


def build_app(verbs: list[str] | None = None) -> typer.Typer:
    """The `shipyard` app with the given verbs (default: all of them)."""
    app = typer.Typer(
        name="shipyard",
        help=(
            "From data to a secure, fast HTTP endpoint for PyTorch models.\n\n"
            "Examples:\n\n"
            "  shipyard train examples/digits-mlp.yaml\n\n"
            "  shipyard train examples/gpt-tiny.yaml --nproc 2 --set train.max_steps=200\n\n"
            "  shipyard eval runs/digits-mlp/<run-id> --split test\n\n"
            "  shipyard cv examples/digits-mlp.yaml --folds 5\n\n"
            "  shipyard tune examples/digits-tune.yaml --trials 8\n\n"
            "  shipyard package runs/digits-mlp/<run-id> -o digits-pkg\n\n"
            "  shipyard compress digits-pkg --quantize int8 -o digits-int8\n\n"
            "  shipyard export digits-pkg --format onnx -o digits-onnx\n\n"
            "  shipyard generate runs/gpt-tiny/<run-id>/package --prompt 'def main(' --seed 0\n\n"
            "  shipyard config validate examples/*.yaml\n\n"
            "  shipyard config show examples/digits-mlp.yaml --set train.epochs=5\n\n"
            "  shipyard config schema > shipyard.schema.json\n\n"
            "  shipyard ui --runs runs"
        ),
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        add_completion=False,
    )
    for verb in VERBS if verbs is None else verbs:
        module, attribute, is_group, hidden = VERBS[verb]
        target = getattr(importlib.import_module(f"shipyard.cli.{module}"), attribute)
        if is_group:
            app.add_typer(target, name=verb, hidden=hidden)
        else:
            app.command(verb, hidden=hidden)(target)
    app.callback()(_root)
    return app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shipyard {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["SHIPYARD_DEBUG"] = "1"


def verbs_needed(argv: list[str]) -> list[str] | None:
    """The verbs a command line needs: [VERB] when it names one (root flags such as --debug may
    come first), none for a bare --version, else None: all (--help lists them; a misspelt verb
    gets click's error with the names it could have meant)."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb is None and "--version" in argv and "--help" not in argv:
        return []
    return [verb] if verb in VERBS else None


def __getattr__(name: str) -> Any:
    # `from shipyard.cli import app`: the whole app, built once on first use.
    if name == "app":
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console-script entry point: run the app; project errors become one red line and exit 2."""
    try:
        build_app(verbs_needed(sys.argv[1:]))()
    except ShipyardError as exc:
        if os.environ.get("SHIPYARD_DEBUG") == "1":
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
