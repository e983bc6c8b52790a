"""Brendan Gregg's folded stacks: one line per distinct stack, ``root;caller;leaf value``.

Frames are function names (the format has no room for files or lines). Identical stacks are
summed across labels; samples whose value is 0 are left out. Lines are sorted, so the output is
deterministic and diff-friendly. ``;`` and line breaks inside names are replaced, since they would
break the format.
"""
from __future__ import annotations

import logging
from collections import defaultdict

from middleware.profile import Profile
from middleware.reporters import resolve_value

logger = logging.getLogger(__name__)

__all__ = ["folded_stacks", "render_folded"]


def _clean(name: str) -> str:
    return name.replace(";", ":").replace("\n", " ").replace("\r", " ") or "<unknown>"


def folded_stacks(profile: Profile, value: str | None = None) -> dict[str, int]:
    """``{"a;b;c": value}`` for sample type ``value`` (None: the profile's default)."""
    index, _, _ = resolve_value(profile, value)
    out: dict[str, int] = defaultdict(int)
    for sample in profile.samples:
        v = sample.values[index]
        if v and sample.stack:
            out[";".join(_clean(f.function) for f in sample.stack)] += v
    return dict(out)


def render_folded(profile: Profile, value: str | None = None) -> str:
    """The folded text, one ``stack value`` line per stack, sorted by stack."""
    stacks = folded_stacks(profile, value)
    return "".join(f"{stack} {v}\n" for stack, v in sorted(stacks.items()))
