"""Tables and figures of the benchmark reports: number formatters, Markdown tables, the perplexity of a
measured row, the provenance line and figure saving. One copy each; the ``_*_report`` modules compose them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from benchmarks._common import save_figure  # defined there, where scripts written before the skeleton find it

__all__ = ["DASH", "ppl", "missing", "sig", "fixed", "gib", "table", "load_text", "save_figure"]

DASH = "–"
"""What a table shows for a value that was not measured."""


def ppl(row: dict[str, Any], corpus: str = "wiki") -> float:
    """The perplexity of a measured row on ``corpus`` (rows hold ``perplexity[corpus]`` as a report dict)."""
    return row["perplexity"][corpus]["perplexity"]


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def sig(x: float | None, digits: int = 4, *, large: float | None = None) -> str:
    """``x`` to ``digits`` significant digits (one fewer from ``large`` up), a dash when not measured."""
    if missing(x):
        return DASH
    if large is not None and abs(x) >= large:
        digits -= 1
    return f"{x:.{digits}g}"


def fixed(x: float | None, fmt: str = ".2f") -> str:
    """``x`` in the format ``fmt``, a dash when not measured."""
    return DASH if missing(x) else format(x, fmt)


def gib(n: float | None, *, unit: str = "", none: str = DASH) -> str:
    """Bytes as GiB with two decimals (``unit`` appended, e.g. ``" GiB"``); ``none`` when not measured."""
    return none if n is None else f"{n / 2**30:.2f}{unit}"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A Markdown table: a header row, a ``---`` separator and one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_text(p: dict[str, Any]) -> str:
    """The 1-minute load averages of every measuring invocation of a run, ``start → end; ...``."""
    load = p.get("load_average_1min") or []
    if isinstance(load, dict):  # results written before the runs kept one entry per invocation
        load = [load]
    return "; ".join(f"{x['start']} → {x['end']}" for x in load) or DASH
