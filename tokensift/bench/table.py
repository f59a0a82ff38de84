"""The one markdown table writer of the benchmark reports, and their number format."""

from __future__ import annotations

ALIGN = {"l": "---", "r": "---:"}


def markdown_table(header: list, rows: list[list], align: str | None = None) -> str:
    """A markdown table: ``header`` then one line per row (cells written with ``str``).

    ``align`` (optional): one letter per column, ``l`` (``---``) or ``r`` (right: ``---:``).
    """
    marks = [ALIGN[letter] for letter in align] if align else ["---"] * len(header)
    if len(marks) != len(header):
        raise ValueError(f"align '{align}' names {len(marks)} columns, the header has {len(header)}")
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "".join(mark + "|" for mark in marks)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 2, suffix: str = "", missing: str = "–", nan_missing: bool = False) -> str:
    """``value`` with ``digits`` decimals and ``suffix`` (``"x"``: a ratio); ``missing`` for None
    (and for NaN with ``nan_missing``)."""
    if value is None or (nan_missing and value != value):
        return missing
    return f"{value:.{digits}f}{suffix}"
