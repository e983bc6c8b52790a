"""``flamegraph -o FILE.html``: one self-contained interactive page (flame graph, table, sandwich)."""
from __future__ import annotations

import argparse
import sys

from middleware.commands import add_profile_options, describe, load_selected, write_output
from middleware.reporters.flamegraph import render_html


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "flamegraph",
        help="write an interactive HTML flame graph",
        description="Write one self-contained HTML page: flame graph, function table and sandwich view.",
    )
    add_profile_options(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE.html", help="where to write the page")
    parser.add_argument("--title", help="page title (default: derived from the inputs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profile, name, unit = load_selected(args)
    title = args.title or f"middleware: {name} profile of {', '.join(args.paths)}"
    write_output(args.output, render_html(profile, title=title, value=name))
    sys.stderr.write(f"wrote {args.output}: {describe(profile, name, unit)}\n")
    return 0
