"""``export --format folded|speedscope -o FILE``: stacks for other tools."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from middleware.commands import (
    add_profile_options,
    load_from_args,
    value_name,
    write_output,
)
from middleware.reporters.folded import render_folded
from middleware.reporters.speedscope import render_speedscope

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export as folded stacks or speedscope JSON",
        description="Export the merged profile as Brendan Gregg's folded stacks or as a speedscope file.",
    )
    add_profile_options(parser)
    parser.add_argument("--format", choices=("folded", "speedscope"), required=True, help="output format")
    parser.add_argument("-o", "--output", default="-", metavar="FILE", help="output file (default: stdout)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profile = load_from_args(args)
    name, _ = value_name(profile, args.value)
    if args.format == "folded":
        text = render_folded(profile, name)
    else:
        label = Path(args.paths[0]).name if len(args.paths) == 1 else f"{len(args.paths)} inputs"
        text = render_speedscope(profile, name, name=f"middleware {name} profile: {label}")
    write_output(args.output, text)
    return 0
