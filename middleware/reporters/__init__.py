"""Views of a :class:`~middleware.profile.Profile`, one module per output.

* :mod:`.table` — Self/Total per function (``top``)
* :mod:`.sandwich` — callers and callees of one function
* :mod:`.flamegraph` — the self-contained interactive HTML page and its JSON model
* :mod:`.folded` — Brendan Gregg's folded stacks
* :mod:`.speedscope` — speedscope's JSON file format
* :mod:`.diff` — which functions' share of the profile grew or shrank

Shared helpers for value selection and formatting live here.
"""
from __future__ import annotations

import logging

from middleware.profile import Profile

logger = logging.getLogger(__name__)

__all__ = ["resolve_value", "format_value", "format_percent", "percent"]

_TIME_UNITS = {"nanoseconds": 1, "microseconds": 1_000, "milliseconds": 1_000_000, "seconds": 1_000_000_000}


def resolve_value(profile: Profile, value: str | None) -> tuple[int, str, str]:
    """``(index, name, unit)`` of sample type ``value`` (None: the profile's default).

    Raises ``KeyError`` naming the available sample types when ``value`` is absent.
    """
    i = profile.value_index(value)
    name, unit = profile.sample_types[i]
    return i, name, unit


def format_value(value: float, unit: str) -> str:
    """Human-readable value: durations scaled to ns/us/ms/s, counts as integers."""
    scale = _TIME_UNITS.get(unit)
    if scale is None:
        if unit in ("count", ""):
            return f"{int(value)}"
        if unit == "bytes":
            for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
                if abs(value) >= div:
                    return f"{value / div:.2f}{suffix}"
            return f"{int(value)}B"
        return f"{value:g} {unit}"
    ns = value * scale
    a = abs(ns)
    if a >= 1e9:
        return f"{ns / 1e9:.2f}s"
    if a >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    if a >= 1e3:
        return f"{ns / 1e3:.2f}us"
    return f"{ns:.0f}ns"


def percent(value: float, total: float) -> float:
    """``value`` as a percentage of ``total`` (0 when total is 0)."""
    return 100.0 * value / total if total else 0.0


def format_percent(value: float, total: float) -> str:
    return f"{percent(value, total):.2f}%"
