"""The sandwich view: one function with its direct callers above and its direct callees below.

For a function F and each sample whose stack contains F:

* every function that directly calls F somewhere in that stack gets the sample's value once
  (so a caller's value is the part of F's Total reached through that caller);
* every function that F directly calls somewhere in that stack gets the value once (the part of
  F's Total spent below F in that callee);
* F's Self and Total are as in the function table.

Direct self-recursion (F calling F) is not listed as a caller or callee. F at the root of a stack
has no caller, so the callers' values may add up to less than F's Total; F's Self is the part of
its Total not spent in callees.
"""
from __future__ import annotations

import difflib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from middleware.profile import Profile
from middleware.reporters import format_percent, format_value, resolve_value
from middleware.reporters.table import NO_FRAMES, FunctionKey, Shares

logger = logging.getLogger(__name__)

__all__ = ["FunctionMatchError", "Relative", "Sandwich", "find_function", "sandwich", "render_sandwich"]


class FunctionMatchError(LookupError):
    """FUNCTION matched no function or several; ``str(err)`` is a one-line message."""


@dataclass(frozen=True)
class Relative:
    """A caller or callee with the value that flows through it."""

    function: str
    file: str
    value: int


@dataclass
class Sandwich(Shares):
    function: str
    file: str
    self_value: int
    total_value: int
    profile_total: int
    callers: list[Relative] = field(default_factory=list)
    callees: list[Relative] = field(default_factory=list)


def _functions(profile: Profile) -> set[FunctionKey]:
    return {(f.function, f.file) for s in profile.samples for f in s.stack}


def _pick(query: str, found: list[FunctionKey], how: str) -> FunctionKey:
    if len(found) == 1:
        return found[0]
    shown = ", ".join(f"{n} ({f})" if f else n for n, f in sorted(found)[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    raise FunctionMatchError(
        f"function {query!r} is ambiguous ({how} {len(found)} functions: {shown}{more}); give the full name"
    )


def find_function(profile: Profile, query: str) -> FunctionKey:
    """Resolve FUNCTION to one (name, file) of the profile.

    Tried in order, the first rule with any match wins: exact qualified name; ``FILE:NAME``
    (file given by a path suffix); name ending in ``.QUERY`` (e.g. ``run`` for ``Calc.run``);
    case-insensitive substring. Raises :class:`FunctionMatchError` when nothing or several
    functions match.
    """
    funcs = sorted(_functions(profile))
    exact = [k for k in funcs if k[0] == query]
    if exact:
        return _pick(query, exact, "matches")
    if ":" in query:
        fpart, _, npart = query.rpartition(":")
        by_file = [k for k in funcs if k[0] == npart and (k[1] == fpart or k[1].endswith("/" + fpart))]
        if by_file:
            return _pick(query, by_file, "matches")
    suffix = [k for k in funcs if k[0].endswith("." + query)]
    if suffix:
        return _pick(query, suffix, "ends")
    low = query.lower()
    sub = [k for k in funcs if low in k[0].lower()]
    if sub:
        return _pick(query, sub, "is part of")
    close = difflib.get_close_matches(query, sorted({k[0] for k in funcs}), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise FunctionMatchError(f"no function matching {query!r} in the profile{hint}")


def sandwich(profile: Profile, function: str | FunctionKey, value: str | None = None) -> Sandwich:
    """Callers and callees of ``function`` (a query for :func:`find_function`, or a key)."""
    key = find_function(profile, function) if isinstance(function, str) else function
    index, _, _ = resolve_value(profile, value)
    callers: dict[FunctionKey, int] = defaultdict(int)
    callees: dict[FunctionKey, int] = defaultdict(int)
    self_v = total_v = grand_total = 0
    for sample in profile.samples:
        v = sample.values[index]
        grand_total += v
        if not v:
            continue
        stack = [(f.function, f.file) for f in (sample.stack or NO_FRAMES)]
        if key not in stack:
            continue
        total_v += v
        if stack[-1] == key:
            self_v += v
        up: set[FunctionKey] = set()
        down: set[FunctionKey] = set()
        for i, k in enumerate(stack):
            if k != key:
                continue
            if i > 0 and stack[i - 1] != key:
                up.add(stack[i - 1])
            if i + 1 < len(stack) and stack[i + 1] != key:
                down.add(stack[i + 1])
        for k in up:
            callers[k] += v
        for k in down:
            callees[k] += v

    def rel(d: dict[FunctionKey, int]) -> list[Relative]:
        return [Relative(n, f, val) for (n, f), val in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))]

    return Sandwich(key[0], key[1], self_v, total_v, grand_total, rel(callers), rel(callees))


def render_sandwich(sw: Sandwich, unit: str, limit: int | None = None) -> str:
    """Text rendering: callers, the function itself, callees."""

    def block(title: str, rels: list[Relative]) -> list[str]:
        out = [title]
        shown = rels if not limit or limit <= 0 else rels[:limit]
        if not shown:
            out.append("    (none)")
        vals = [format_value(r.value, unit) for r in shown]
        pcts = [format_percent(r.value, sw.profile_total) for r in shown]
        w1 = max((len(x) for x in vals), default=0)
        w2 = max((len(x) for x in pcts), default=0)
        for r, val, pct in zip(shown, vals, pcts, strict=True):
            where = f"  {r.file}" if r.file else ""
            out.append(f"    {val.rjust(w1)}  {pct.rjust(w2)}  {r.function}{where}")
        if len(shown) < len(rels):
            out.append(f"    ({len(rels) - len(shown)} more)")
        return out

    where = f" ({sw.file})" if sw.file else ""
    lines = block(f"Callers of {sw.function}:", sw.callers)
    lines.append(
        f"==> {sw.function}{where}  total {format_value(sw.total_value, unit)} "
        f"({format_percent(sw.total_value, sw.profile_total)})  self {format_value(sw.self_value, unit)} "
        f"({format_percent(sw.self_value, sw.profile_total)})"
    )
    lines += block(f"Callees of {sw.function}:", sw.callees)
    return "\n".join(lines) + "\n"
