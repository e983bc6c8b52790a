"""The function table (``top``): Self and Total per function.

* **Self** of a function: the values of the samples where it is the leaf (running) frame. The Self
  column therefore sums to the profile total.
* **Total** of a function: the values of the samples where it appears anywhere on the stack,
  counted once per sample even when the function is on the stack several times (recursion).

Functions are identified by (qualified name, file), like pprof's function table. The line shown is
the line where the function spent the most Self time (or, for functions that never run as the
leaf, the most Total time).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from middleware.profile import Frame, Profile
from middleware.reporters import format_percent, format_value, percent, resolve_value

logger = logging.getLogger(__name__)

__all__ = ["FunctionRow", "Shares", "align_columns", "function_table", "render_table", "SORT_KEYS"]

SORT_KEYS = ("self", "total", "name")

FunctionKey = tuple[str, str]  # (function, file)

#: Stands in for the stack of a sample that has none, so that Self still sums to the total.
NO_FRAMES = (Frame("(no frames)"),)


class Shares:
    """``self_percent`` and ``total_percent`` of a row that has ``self_value``, ``total_value`` and
    ``profile_total`` (the whole profile's total for the selected sample type)."""

    self_value: int
    total_value: int
    profile_total: int

    @property
    def self_percent(self) -> float:
        return percent(self.self_value, self.profile_total)

    @property
    def total_percent(self) -> float:
        return percent(self.total_value, self.profile_total)


@dataclass(frozen=True)
class FunctionRow(Shares):
    """One function of the table. Values are in the unit of the selected sample type."""

    function: str
    file: str
    line: int
    self_value: int
    total_value: int
    profile_total: int  # the whole profile's total for the selected sample type

    @property
    def key(self) -> FunctionKey:
        return (self.function, self.file)

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def _sort(rows: list[FunctionRow], sort: str) -> list[FunctionRow]:
    if sort == "self":
        rows.sort(key=lambda r: (-r.self_value, -r.total_value, r.function, r.file))
    elif sort == "total":
        rows.sort(key=lambda r: (-r.total_value, -r.self_value, r.function, r.file))
    elif sort == "name":
        rows.sort(key=lambda r: (r.function, r.file))
    else:
        raise ValueError(f"unknown sort key {sort!r} (choose from {', '.join(SORT_KEYS)})")
    return rows


def function_table(profile: Profile, value: str | None = None, sort: str = "self") -> list[FunctionRow]:
    """Self/Total of every function seen in ``profile`` for sample type ``value`` (None: default).

    Rows are sorted by ``sort`` ("self", "total" or "name"); functions whose Self and Total are
    both 0 are left out. Raises ``KeyError`` for an unknown sample type.
    """
    index, _, _ = resolve_value(profile, value)
    self_v: dict[FunctionKey, int] = defaultdict(int)
    total_v: dict[FunctionKey, int] = defaultdict(int)
    # per function: line -> [self, total] to pick the line to show
    lines: dict[FunctionKey, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    grand_total = 0
    for sample in profile.samples:
        v = sample.values[index]
        grand_total += v
        if not v:
            continue
        stack = sample.stack or NO_FRAMES
        leaf = stack[-1]
        leaf_key = (leaf.function, leaf.file)
        self_v[leaf_key] += v
        lines[leaf_key][leaf.line][0] += v
        seen: set[FunctionKey] = set()
        seen_lines: set[tuple[FunctionKey, int]] = set()
        for frame in stack:
            key = (frame.function, frame.file)
            if key not in seen:
                seen.add(key)
                total_v[key] += v
            if (key, frame.line) not in seen_lines:
                seen_lines.add((key, frame.line))
                lines[key][frame.line][1] += v

    rows = []
    for key, total in total_v.items():
        per_line = lines[key]
        line = max(per_line, key=lambda ln: (per_line[ln][0], per_line[ln][1], -ln)) if per_line else 0
        rows.append(FunctionRow(key[0], key[1], line, self_v.get(key, 0), total, grand_total))
    return _sort(rows, sort)


def render_table(
    rows: list[FunctionRow],
    unit: str,
    limit: int | None = None,
    header: str = "",
) -> str:
    """Format ``rows`` as an aligned text table (the first ``limit`` rows)."""
    shown = rows if limit is None or limit <= 0 else rows[:limit]
    cells = [("Self", "Self%", "Total", "Total%", "Function", "Location")]
    for r in shown:
        cells.append(
            (
                format_value(r.self_value, unit),
                format_percent(r.self_value, r.profile_total),
                format_value(r.total_value, unit),
                format_percent(r.total_value, r.profile_total),
                r.function,
                r.location,
            )
        )
    return align_columns(cells, 4, header, len(rows) - len(shown))


def align_columns(cells: Sequence[Sequence[str]], numeric: int, header: str, hidden: int) -> str:
    """``cells`` (the first row holds the titles) as aligned text: the first ``numeric`` columns
    right-aligned, then the function column left-aligned, then the last column as it is; after
    them a line saying how many functions (``hidden``) were left out, if any."""
    widths = [max(len(row[i]) for row in cells) for i in range(numeric + 1)]
    lines = [header] if header else []
    for row in cells:
        numbers = "  ".join(row[i].rjust(widths[i]) for i in range(numeric))
        lines.append(f"{numbers}  {row[numeric].ljust(widths[numeric])}  {row[numeric + 1]}".rstrip())
    if hidden > 0:
        lines.append(f"({hidden} more functions; use --limit 0 to show all)")
    return "\n".join(lines) + "\n"
