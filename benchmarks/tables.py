"""Markdown tables for the benchmarks' output (the form benchmarks/README.md quotes)."""

from typing import List, Sequence


def print_markdown_table(header: Sequence[str], rows: List[Sequence[str]]):
    """A Markdown table, each column as wide as its widest cell, between blank lines."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()
