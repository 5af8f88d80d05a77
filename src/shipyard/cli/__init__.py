"""The `shipyard` command line: a Typer app whose verbs are thin calls into the library."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from shipyard import __version__
from shipyard.cli.api_keys_cmd import api_keys_app
from shipyard.cli.compress_cmd import compress, export, import_hf
from shipyard.cli.config_cmd import config_app
from shipyard.cli.generate_cmd import generate
from shipyard.cli.keys_cmd import keys_app
from shipyard.cli.models_cmd import models_app
from shipyard.cli.package_cmd import package_app
from shipyard.cli.serve_cmd import predict, serve
from shipyard.cli.signing_keys_cmd import signing_keys_app
from shipyard.cli.train_cmd import evaluate, train
from shipyard.cli.tuning_cmd import cv, tune
from shipyard.cli.ui_cmd import ui
from shipyard.errors import ShipyardError

err_console = Console(stderr=True)

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
app.add_typer(config_app, name="config")
app.add_typer(package_app, name="package")
app.add_typer(api_keys_app, name="api-keys")
app.add_typer(signing_keys_app, name="signing-keys")
app.add_typer(keys_app, name="keys", hidden=True)  # deprecated spelling
app.add_typer(models_app, name="models")
app.command("train")(train)
app.command("eval")(evaluate)
app.command("cv")(cv)
app.command("tune")(tune)
app.command("serve")(serve)
app.command("predict")(predict)
app.command("compress")(compress)
app.command("export")(export)
app.command("import-hf")(import_hf)
app.command("generate")(generate)
app.command("ui")(ui)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shipyard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["SHIPYARD_DEBUG"] = "1"


def main() -> None:
    """Console-script entry point: run the app; project errors become one red line and exit 2."""
    try:
        app()
    except ShipyardError as exc:
        if os.environ.get("SHIPYARD_DEBUG") == "1":
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
