"""The plain-text table every bench script prints before it writes its JSON."""
from __future__ import annotations

from typing import Callable, Sequence

# (header, cell): cell maps a row to its text, e.g. ("tok/s", lambda r: f"{r['tokens_per_s']:.1f}")
Column = tuple[str, Callable[[dict], str]]


def print_table(rows: Sequence[dict], columns: Sequence[Column]) -> None:
    cells = [[cell(r) for _, cell in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(columns)]
    header = "  ".join(h.rjust(w) for (h, _), w in zip(columns, widths))
    print(header)
    print("-" * len(header))
    for c in cells:
        print("  ".join(text.rjust(w) for text, w in zip(c, widths)))
