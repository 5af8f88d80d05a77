"""Tables that stay readable in a narrow terminal (80 columns).

Rich squeezes a table that is wider than the terminal by cutting its cells to "…" ("paren…",
"spars…"), which leaves nothing to read. `print_rows` prints a table when every cell fits whole,
and otherwise one block per row with a line per column (the same data, read downwards).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

_BORDER = 4  # a rounded box: "│ " before the first column, " │" after the last
_GAP = 3  # " │ " between two columns


def table_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    """The width a table needs to show every header and cell whole."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], max((len(line) for line in cell.splitlines()), default=0))
    return sum(widths) + _GAP * (len(widths) - 1) + _BORDER


def print_rows(
    console: Console,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
) -> None:
    """Print `rows` under `header`: as a table when it fits `console`, else row by row.

    `right` names the columns to right-align (numbers) in the table layout.
    """
    if table_width(header, rows) <= console.width:
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="right" if name in right else "left", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    console.print(vertical(header, rows, title=title))


def vertical(header: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None) -> Table:
    """One block per row (its first cell as the block's heading), a line per other column."""
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for i, row in enumerate(rows):
        if i:
            table.add_section()
        table.add_row(header[0], row[0], style="bold")
        for name, cell in zip(header[1:], row[1:], strict=True):
            table.add_row(name, cell)
    return table


def transpose(rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """Rows ↔ columns (a report with few rows and many columns reads better turned)."""
    return [list(column) for column in zip(*rows, strict=True)]


def field_table(title: str | None = None) -> Table:
    """A two-column field/value table whose long values (paths, digests) fold onto more lines
    instead of being cut to "…"."""
    table = Table(title=title, show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    return table
