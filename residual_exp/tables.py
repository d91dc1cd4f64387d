"""Tables, written one way: markdown for files and reports, aligned text for the console, CSV.

Every table in the package (the results table a run prints, the report's paper layout, the
analyses' tables) goes through :func:`markdown_table` / :func:`text_table` /
:func:`write_table`; files are written atomically.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .atomic import atomic_write_text

Formatter = Callable[[str, object], str]


def format_value(key: str, v) -> str:
    """Default cell format: floats with 4 significant digits, ``nan`` and empty for None."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def columns_of(rows: Sequence[Mapping]) -> list[str]:
    """Every key of ``rows``, in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _cells(rows: Sequence[Mapping], cols: Sequence[str], fmt: Formatter) -> list[list[str]]:
    return [[fmt(c, r.get(c)) for c in cols] for r in rows]


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                   headers: Sequence[str] | None = None, fmt: Formatter = format_value,
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` per column: ``l`` (default) or ``r``."""
    cols = list(columns or columns_of(rows))
    heads = list(headers or cols)
    esc = lambda s: s.replace("|", "\\|")
    rule = ["---:" if a == "r" else "---" for a in (align or ["l"] * len(cols))]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in _cells(rows, cols, fmt)]
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None,
               fmt: Formatter = format_value, right_from: int = 0) -> str:
    """An aligned plain-text table (console); columns from index ``right_from`` on are right-aligned."""
    heads = list(headers or columns)
    body = [heads] + _cells(rows, columns, fmt)
    widths = [max(len(row[i]) for row in body) for i in range(len(columns))]
    line = lambda row: "  ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(body[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in body[1:]])


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")    # a spreadsheet reads such a cell as a formula


def csv_cell(v):
    """A value as a CSV cell: text that a spreadsheet would run as a formula (a class or file name
    starting with ``=``, ``+``, ``-``, ``@``) gets a leading ``'``; a float that is exactly a float32
    (an accuracy from a float32 metric) is written at float32 precision (0.395, not 0.39500001072883606);
    other values as they are."""
    if isinstance(v, str):
        return "'" + v if v.startswith(FORMULA_PREFIXES) else v
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        v = float(v)
        if math.isfinite(v) and float(np.float32(v)) == v:
            return repr(float(str(np.float32(v))))
        return v
    return v


def csv_text(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or columns_of(rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[csv_cell(c) for c in cols], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({csv_cell(c): csv_cell(r.get(c, "")) for c in cols})
    return buf.getvalue()


def write_table(rows: Sequence[Mapping], path: str | os.PathLike, title: str | None = None,
                columns: Sequence[str] | None = None) -> tuple[Path, Path]:
    """``<path>.csv`` (full precision) and ``<path>.md``, both written atomically; returns both."""
    base = Path(path)
    cols = list(columns or columns_of(rows))
    csv_path, md_path = base.with_suffix(".csv"), base.with_suffix(".md")
    atomic_write_text(csv_path, csv_text(rows, cols))
    atomic_write_text(md_path, (f"# {title}\n\n" if title else "") + markdown_table(rows, cols))
    return csv_path, md_path
