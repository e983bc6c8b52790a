"""``sandwich FUNCTION``: who calls FUNCTION and what it calls, with their values."""
from __future__ import annotations

import argparse
import sys

from middleware.commands import add_profile_options, describe, load_selected
from middleware.reporters.sandwich import render_sandwich, sandwich


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sandwich",
        help="callers and callees of one function",
        description=(
            "Callers and callees of FUNCTION. FUNCTION is a qualified name (Calc.run), FILE:NAME, "
            "a unique suffix (run) or a unique part of a name."
        ),
    )
    parser.add_argument("function", metavar="FUNCTION")
    add_profile_options(parser)
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="callers/callees to show, 0 for all")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profile, name, unit = load_selected(args)
    sw = sandwich(profile, args.function, name)
    sys.stdout.write(describe(profile, name, unit) + "\n" + render_sandwich(sw, unit, limit=args.limit))
    return 0
