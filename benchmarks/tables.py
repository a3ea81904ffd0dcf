"""CSV files and Markdown tables, written one way for the benchmarks and the harness (train/ imports
this module; benchmarks/ never imports train/)."""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, List, Mapping, Sequence


def csv_cell(value: Any) -> Any:
    """A CSV cell: None and non-finite floats empty (not computed), floats to 6 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_csv(path: str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` (dicts) as a CSV file with the header ``columns`` (other keys are left out).

    Written to ``path + ".tmp"`` and renamed over ``path``: a reader never sees half a file.
    """
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: csv_cell(row.get(column)) for column in columns})
    os.replace(path + ".tmp", path)


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]], padded: bool = True) -> str:
    """A Markdown table of text cells.

    ``padded``: columns padded to a common width and left-aligned (easy to read as text);
    otherwise cells unpadded and every column right-aligned (``---:``).
    """
    if not padded:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    out: List[str] = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
                      "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)
