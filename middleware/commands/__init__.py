"""The CLI subcommands, one module each, and what they share.

A subcommand module defines ``register(subparsers) -> None`` (adds its parser, sets
``func=run``) and ``run(args) -> int``; :data:`middleware.cli.COMMANDS` lists the modules.

Shared here: the profile-selection options every reading command takes
(:func:`add_profile_options`: ``PROFILE...``, ``--from``, ``--until``, ``--label``, ``--value``),
:func:`load_from_args`, time parsing and output helpers. Errors meant for the user are
:data:`USER_ERRORS`; the CLI prints them as one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from middleware.pprof import ProfileError, load_profiles
from middleware.profile import Profile
from middleware.reporters import format_value, resolve_value
from middleware.reporters.sandwich import FunctionMatchError

logger = logging.getLogger(__name__)

__all__ = [
    "CommandError",
    "USER_ERRORS",
    "add_profile_options",
    "add_time_options",
    "load_from_args",
    "load_selected",
    "add_comparison_options",
    "load_comparison",
    "parse_time",
    "parse_labels",
    "value_name",
    "describe",
    "write_output",
]


class CommandError(Exception):
    """A problem with the command line or the output; ``str()`` is the message."""


USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, ProfileError, FunctionMatchError)

_RELATIVE = re.compile(r"^(?:now)?\s*-\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FRACTION = re.compile(r"(?<=:\d\d)\.(\d+)")


def parse_time(text: str, now: float | None = None) -> int:
    """A point in time as Unix nanoseconds.

    Accepts Unix seconds (``1763719200`` or ``1763719200.5``), ISO 8601
    (``2026-11-21T10:00:00``, ``...+01:00``, ``...Z``; without a zone it is UTC), ``now``, and
    times relative to now (``-15m``, ``now-2h``; units s, m, h, d).
    """
    t = text.strip()
    current = time.time() if now is None else now
    if t == "now":
        return int(current * 1e9)
    m = _RELATIVE.match(t)
    if m:
        return int((current - float(m.group(1)) * _UNIT_SECONDS[m.group(2)]) * 1e9)
    try:
        return int(float(t) * 1e9)
    except ValueError:
        pass
    iso = t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t
    # Python 3.10's fromisoformat wants 3 or 6 fraction digits: pad/truncate to 6
    iso = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], iso)
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise CommandError(
            f"bad time {text!r}: use Unix seconds, ISO 8601 (2026-11-21T10:00:00Z), now or -15m"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def parse_labels(items: Sequence[str] | None) -> list[tuple[str, str]]:
    """``["k=v", ...]`` -> ``[("k", "v"), ...]``."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"bad --label {item!r}: expected KEY=VALUE, e.g. --label endpoint=/calc")
        out.append((key.strip(), value))
    return out


def add_time_options(parser: argparse.ArgumentParser, prefix: str = "", what: str = "") -> None:
    dest = prefix.replace("-", "_")
    parser.add_argument(
        f"--{prefix}from", dest=f"{dest}time_from", metavar="TIME",
        help=f"only profiles{what} whose window ends after TIME "
        "(Unix seconds, ISO 8601 - UTC unless a zone is given -, now, -15m)",
    )
    parser.add_argument(
        f"--{prefix}until", dest=f"{dest}time_until", metavar="TIME",
        help=f"only profiles{what} whose window starts before TIME",
    )
    if prefix:  # one side of a comparison: its own labels too (e.g. --before-label version=OLD)
        parser.add_argument(
            f"--{prefix}label", dest=f"{dest}label", action="append", default=[], metavar="KEY=VALUE",
            help=f"only samples{what} with this label, besides --label (repeatable)",
        )


def add_profile_options(parser: argparse.ArgumentParser, paths: bool = True) -> None:
    """``PROFILE...`` (unless ``paths`` is False), ``--from/--until``, ``--label``, ``--value``."""
    if paths:
        parser.add_argument(
            "paths", nargs="+", metavar="PROFILE",
            help="pprof file(s) or directories (e.g. the local store); all are merged",
        )
    add_time_options(parser)
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE",
        help="only samples with this label (repeatable; same key: any of the values, different keys: all)",
    )
    parser.add_argument(
        "--value", "--type", dest="value", metavar="TYPE",
        help="sample type to show: cpu, wall, samples, delay (lock waits), contentions, "
             "alloc_space, alloc_objects, inuse_space, inuse_objects (memory), ... "
             "(default: the profile's default type)",
    )


def time_range_of(args: argparse.Namespace, prefix: str = "") -> tuple[int | None, int | None] | None:
    dest = prefix.replace("-", "_")
    start_s = getattr(args, f"{dest}time_from", None)
    end_s = getattr(args, f"{dest}time_until", None)
    if prefix:  # --before-from etc. default to --from/--until
        start_s = start_s or getattr(args, "time_from", None)
        end_s = end_s or getattr(args, "time_until", None)
    if start_s is None and end_s is None:
        return None
    start = parse_time(start_s) if start_s is not None else None
    end = parse_time(end_s) if end_s is not None else None
    if start is not None and end is not None and end <= start:
        raise CommandError(f"empty time range: {start_s} .. {end_s}")
    return (start, end)


def load_from_args(
    args: argparse.Namespace,
    paths: Sequence[str] | None = None,
    prefix: str = "",
) -> Profile:
    """Load and merge the profiles the options select (``prefix``: "before-"/"after-" ranges and
    labels, on top of --from/--until and --label)."""
    side_labels = getattr(args, f"{prefix.replace('-', '_')}label", None) if prefix else None
    return load_profiles(
        list(paths if paths is not None else args.paths),
        time_range=time_range_of(args, prefix),
        labels=parse_labels([*(getattr(args, "label", None) or []), *(side_labels or [])]),
    )


def load_selected(args: argparse.Namespace) -> tuple[Profile, str, str]:
    """``(profile, name, unit)``: the merged profile the options select and the sample type to show."""
    profile = load_from_args(args)
    name, unit = value_name(profile, args.value)
    return profile, name, unit


def add_comparison_options(parser: argparse.ArgumentParser, before_help: str, after_help: str,
                           after_optional: bool = False) -> None:
    """``BEFORE AFTER`` (AFTER optional if ``after_optional``), the profile options without paths and
    each side's ``--before-*``/``--after-*`` time ranges and labels."""
    parser.add_argument("before", metavar="BEFORE", help=before_help)
    parser.add_argument("after", metavar="AFTER", nargs="?" if after_optional else None, help=after_help)
    add_profile_options(parser, paths=False)
    add_time_options(parser, "before-", " of BEFORE")
    add_time_options(parser, "after-", " of AFTER")


def _load_side(args: argparse.Namespace, path: str, side: str) -> Profile:
    try:
        return load_from_args(args, [path], prefix=f"{side}-")
    except ProfileError as exc:
        raise ProfileError(f"{side.upper()}: {exc}") from None


def load_comparison(args: argparse.Namespace, after_path: str) -> tuple[Profile, Profile, str, str, str]:
    """``(before, after, name, unit, header)``: BEFORE and AFTER (read from ``after_path``) with their
    ``--before-*``/``--after-*`` options, the sample type of both and a two-line header describing them."""
    before = _load_side(args, args.before, "before")
    after = _load_side(args, after_path, "after")
    name, unit = value_name(after, args.value)
    value_name(before, name)
    header = f"before: {describe(before, name, unit)}\nafter:  {describe(after, name, unit)}"
    return before, after, name, unit, header


def value_name(profile: Profile, value: str | None) -> tuple[str, str]:
    """``(name, unit)`` of the sample type to show; unknown names are a :class:`CommandError`."""
    try:
        _, name, unit = resolve_value(profile, value)
    except KeyError as exc:
        raise CommandError(str(exc.args[0])) from None
    return name, unit


def _fmt_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def describe(profile: Profile, name: str, unit: str) -> str:
    """One header line: sample type, total, sample count and time window."""
    total = profile.total(name)
    n = len(profile.samples)
    text = f"{name} ({unit}): total {format_value(total, unit)} in {n} stack{'' if n == 1 else 's'}"
    if profile.time_nanos:
        end = profile.time_nanos + profile.duration_nanos
        text += f", {_fmt_time(profile.time_nanos)} .. {_fmt_time(end)} UTC"
    return text


def write_output(path: str | None, text: str) -> None:
    """Write ``text`` to ``path`` ("-" or None: stdout)."""
    if path in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(path)
    try:
        if p.parent and not p.parent.exists():
            raise CommandError(f"{p}: directory {p.parent} does not exist")
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except OSError as exc:
        raise CommandError(f"{p}: cannot write ({exc.strerror or exc})") from None
