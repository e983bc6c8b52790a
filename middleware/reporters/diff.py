"""What changed between two profiles: each function's Self share before and after.

Shares are percentages of each profile's own total, so profiles of different lengths or loads
compare fairly; the change is in percentage points (after - before). Rows are sorted by the size
of the change, biggest first.

Snapshot types (``inuse_objects``, ``inuse_space``: what is live at a moment) are compared by
their values instead: the growth view. A function whose live memory grew from one window to a
later one comes first, by how much it grew (a leak), whatever its share.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from middleware.profile import GAUGE_TYPES, Profile
from middleware.reporters import format_value, resolve_value
from middleware.reporters.table import align_columns, function_table

logger = logging.getLogger(__name__)

__all__ = ["DiffRow", "diff_profiles", "render_diff"]


@dataclass(frozen=True)
class DiffRow:
    function: str
    file: str
    before_self: int
    after_self: int
    before_percent: float
    after_percent: float

    @property
    def change(self) -> float:
        """After minus before, in percentage points."""
        return self.after_percent - self.before_percent

    @property
    def growth(self) -> int:
        """After minus before, in the sample type's unit."""
        return self.after_self - self.before_self


def diff_profiles(before: Profile, after: Profile, value: str | None = None) -> list[DiffRow]:
    """Self share of every function in either profile, sorted by absolute change (largest first).

    ``value`` names the sample type in both profiles (None: the default of ``after``).
    """
    name = value if value is not None else after.default_value_name()
    _, _, unit_b = resolve_value(before, name)
    _, _, unit_a = resolve_value(after, name)
    if unit_a != unit_b:
        raise ValueError(f"sample type {name!r} is in {unit_b} before and in {unit_a} after")
    b_rows = {r.key: r for r in function_table(before, name)}
    a_rows = {r.key: r for r in function_table(after, name)}
    rows = []
    for key in set(b_rows) | set(a_rows):
        b, a = b_rows.get(key), a_rows.get(key)
        rows.append(
            DiffRow(
                key[0],
                key[1],
                b.self_value if b else 0,
                a.self_value if a else 0,
                b.self_percent if b else 0.0,
                a.self_percent if a else 0.0,
            )
        )
    rows = [r for r in rows if r.before_self or r.after_self]
    if name in GAUGE_TYPES:  # growth view: biggest growth first, then the biggest shrinking
        rows.sort(key=lambda r: (-r.growth, r.function, r.file))
    else:
        rows.sort(key=lambda r: (-abs(r.change), r.function, r.file))
    return rows


def render_diff(
    rows: list[DiffRow], unit: str, limit: int | None = None, header: str = "", growth: bool = False
) -> str:
    """Aligned text: change in points (``growth``: in the unit), Self share before -> after, Self
    values, function."""
    shown = rows if not limit or limit <= 0 else rows[:limit]
    cells = [("Growth" if growth else "Change", "Before", "After", "Self before", "Self after", "Function", "File")]
    for r in shown:
        change = ("+" if r.growth >= 0 else "-") + format_value(abs(r.growth), unit) if growth else f"{r.change:+.2f}pp"
        cells.append(
            (
                change,
                f"{r.before_percent:.2f}%",
                f"{r.after_percent:.2f}%",
                format_value(r.before_self, unit),
                format_value(r.after_self, unit),
                r.function,
                r.file,
            )
        )
    return align_columns(cells, 5, header, len(rows) - len(shown))
