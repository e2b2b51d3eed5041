"""Markdown tables for reports (the runner's paper-vs-ours table and the experiments' extra tables)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are formatted with ``str`` (a ``|`` inside a cell is escaped)."""
    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def routing_counts_markdown(table_EY: Any, col_labels: Sequence[str], row_label: str = "expert") -> str:
    """A routing table (E, Y) (rows: experts numbered from 0, as everywhere in moekit; columns: labels; counts)
    with a per-expert total column."""
    rows = [[f"{e}"] + [str(int(v)) for v in table_EY[e]] + [str(int(sum(table_EY[e])))]
            for e in range(len(table_EY))]
    return markdown_table([row_label, *col_labels, "total"], rows)
