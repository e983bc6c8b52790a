"""``diff BEFORE [AFTER]``: which functions' Self share grew or shrank most.

BEFORE and AFTER are pprof files or directories. With one directory (a store) and
``--before-from/--before-until/--after-from/--after-until``, compares two time ranges of it.
"""
from __future__ import annotations

import argparse
import sys

from middleware.commands import CommandError, add_comparison_options, load_comparison, write_output
from middleware.profile import GAUGE_TYPES
from middleware.reporters.diff import diff_profiles, render_diff


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="what grew or shrank between two profiles",
        description=(
            "Compare the Self share (percent of each profile's total) of every function between BEFORE "
            "and AFTER, biggest change first. Without AFTER, BEFORE is read twice with the "
            "--before-*/--after-* time ranges (e.g. two periods of the local store)."
        ),
    )
    add_comparison_options(parser, "pprof file or directory", "pprof file or directory (default: BEFORE)",
                           after_optional=True)
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="rows to show, 0 for all (default: 20)")
    parser.add_argument(
        "-o", "--output", metavar="FILE.html",
        help="also write the diff flame graph (frames coloured by the change of their share) as one HTML page",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    after_path = args.after
    if after_path is None:
        ranged = any(getattr(args, f"{s}_time_{e}") for s in ("before", "after") for e in ("from", "until"))
        if not ranged and not (args.before_label or args.after_label):
            raise CommandError("give AFTER, or one store with --before-from/--before-until/--after-from/--after-until"
                               " or --before-label/--after-label")
        after_path = args.before
    before, after, name, unit, sides = load_comparison(args, after_path)
    try:
        rows = diff_profiles(before, after, name)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    growth = name in GAUGE_TYPES
    header = sides + "\n" + (
        "Growth = Self after - before (live at the end of each side's latest window), biggest first"
        if growth else "Change = Self share after - before, in percentage points"
    )
    sys.stdout.write(render_diff(rows, unit, limit=args.limit, header=header, growth=growth))
    if args.output:
        from middleware.reporters.flamegraph import diff_to_json, render_html

        title = f"middleware diff ({name}): {args.before} -> {after_path}"
        data = diff_to_json(before, after, name, title=title, names=("before", "after"))
        write_output(args.output, render_html(after, title=title, data=data))
        sys.stderr.write(f"wrote {args.output}\n")
    return 0
