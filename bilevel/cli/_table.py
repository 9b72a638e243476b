"""The one text-table printer of the command, the examples and the benchmarks."""

import math
from collections.abc import Sequence
from typing import Any


def format_cell(value: Any) -> str:
    """A table cell: floats with 4 significant digits, `None` as `-`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned plain-text table, one line per row under a header.

    Columns are the keys in order of first appearance; a key missing from a row is
    shown as `-`, like `None` and NaN; floats get 4 significant digits. Plain ASCII
    (no box drawing), so the table reads the same in a terminal, a log file or a
    Markdown code block.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column), *(len(line[i]) for line in cells)])
        for i, column in enumerate(columns)
    ]
    lines = [columns, *cells]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
        for line in lines
    )
