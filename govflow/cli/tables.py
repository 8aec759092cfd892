"""Tables of the human listings, drawn to fit 80 columns.

A listing shows an execution id by its first ``SHORT_ID`` characters: every command that
takes an id takes that start too, and ``--json`` prints the whole id.
"""

from __future__ import annotations

from rich import box
from rich.table import Column, Table
from rich.text import Text

SHORT_ID = 8


def listing_table(*columns: Column | str) -> Table:
    """A table with a rule under its header and two spaces between columns."""
    return Table(
        *columns, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True
    )


def short_id(full: str) -> str:
    """The start of an id that listings show: ``3f2a1b7c``."""
    return full[:SHORT_ID]


def fields_table(rows: list[tuple[str, str]]) -> Table:
    """Name and value lines, the names right-aligned; a long value folds under itself."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="right", style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for name, value in rows:
        grid.add_row(name, Text(value))
    return grid


def one_line(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with ``…`` when longer."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def rest_of(console_width: int, fixed: int, floor: int = 20) -> int:
    """The width left for a table's one flexible column beside ``fixed`` columns' worth."""
    return max(floor, console_width - fixed)
