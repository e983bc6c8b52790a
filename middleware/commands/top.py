"""``top`` (alias ``table``): the function table, Self and Total, by Self unless --sort total."""
from __future__ import annotations

import argparse
import json
import sys

from middleware.commands import add_profile_options, describe, load_selected
from middleware.reporters.table import function_table, render_table


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "top", aliases=["table"],
        help="functions by Self and Total time",
        description="Table of functions with Self (time as the running frame) and Total (time on the stack).",
    )
    add_profile_options(parser)
    parser.add_argument("--sort", choices=("self", "total", "name"), default="self", help="sort order (default: self)")
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="show N rows, 0 for all (default: 20)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profile, name, unit = load_selected(args)
    rows = function_table(profile, name, sort=args.sort)
    if args.format == "json":
        shown = rows if args.limit <= 0 else rows[: args.limit]
        doc = {
            "value": {"name": name, "unit": unit},
            "total": profile.total(name),
            "functions": [
                {"function": r.function, "file": r.file, "line": r.line, "self": r.self_value,
                 "total": r.total_value, "self_percent": r.self_percent, "total_percent": r.total_percent}
                for r in shown
            ],
        }
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return 0
    sys.stdout.write(render_table(rows, unit, limit=args.limit, header=describe(profile, name, unit)))
    return 0
