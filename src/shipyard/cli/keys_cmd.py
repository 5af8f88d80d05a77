"""`shipyard keys ...`: the old spelling, kept working. It mixed two kinds of keys; each verb now
prints a note naming its new home (`shipyard api-keys ...` or `shipyard signing-keys ...`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from shipyard.cli import api_keys_cmd, signing_keys_cmd

err_console = Console(stderr=True)

keys_app = typer.Typer(
    help=(
        "Deprecated: use `shipyard api-keys add|list|revoke` (server API keys) or "
        "`shipyard signing-keys generate` (package signing keys).\n\n"
        "Example: shipyard api-keys add --scope infer"
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _deprecated(verb: str, new: str, command: Callable[..., Any]) -> None:
    """Register `command` as `shipyard keys VERB`, with a note that points to `new`."""

    @functools.wraps(command)
    def alias(*args: Any, **kwargs: Any) -> Any:
        err_console.print(
            f"note: `shipyard keys {verb}` is deprecated; use `{new}`",
            highlight=False,
            soft_wrap=True,
        )
        return command(*args, **kwargs)

    alias.__doc__ = f"Deprecated: use `{new}`.\n\n" + (command.__doc__ or "")
    keys_app.command(verb)(alias)


_deprecated("add", "shipyard api-keys add", api_keys_cmd.add)
_deprecated("list", "shipyard api-keys list", api_keys_cmd.list_keys)
_deprecated("revoke", "shipyard api-keys revoke", api_keys_cmd.revoke)
_deprecated("generate", "shipyard signing-keys generate", signing_keys_cmd.generate)
