"""Plain-text tables for terminals and reprs, drawn by rich: aligned columns, no colours or borders."""

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table


def text_table(*columns: str, show_header: bool = True) -> "Table":
    """A borderless rich table with these columns: right-aligned, or left-aligned when named ``"<name"``."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_header=show_header, header_style=None)
    for name in columns:
        left = name.startswith("<")
        table.add_column(name.removeprefix("<"), justify="left" if left else "right", min_width=4)
    return table


def render_table(table: "Table") -> str:
    """The table as plain text (no colours, markup or emoji codes, whatever the terminal), columns two spaces
    apart, no trailing spaces; wide enough that no cell is wrapped or cut."""
    from rich.console import Console

    console = Console(width=1_000_000, color_system=None, force_terminal=False, force_jupyter=False, no_color=True,
                      markup=False, emoji=False, highlight=False, file=io.StringIO())
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())
