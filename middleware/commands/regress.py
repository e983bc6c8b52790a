"""``regress BEFORE AFTER``: the functions whose cost grew beyond a threshold and the noise.

Exit status 0: no regression; 1: at least one (the findings are printed); 2: a usage error. For
CI: save a baseline profile of the code before the change, compare the new run's profile to it.
The test is described in :mod:`middleware.regression`.
"""
from __future__ import annotations

import argparse
import sys

from middleware.commands import CommandError, add_comparison_options, load_comparison
from middleware.regression import BASES, DEFAULT_THRESHOLD, compare, render_findings


def _threshold(text: str) -> float:
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad threshold {text!r} (e.g. 10% or 0.1)") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"bad threshold {text!r} (e.g. 10% or 0.1)")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "regress",
        help="functions whose cost grew from BEFORE to AFTER (exit status 1 if any)",
        description=(
            "Compare every function's cost (Self and Total) between BEFORE and AFTER -- per request when "
            "both sides count requests (the Flask, WSGI and ASGI integrations do), else as a share of the "
            "profile's total -- and report those that grew by more than --threshold beyond the sampling "
            "noise (a 99.9%% family-wise interval on the ratio of costs), and those that are new. Exit status "
            "1 when there is one, so a CI step can stop a slow change."
        ),
    )
    add_comparison_options(parser, "pprof file or directory (the baseline)", "pprof file or directory (the change)")
    parser.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD, metavar="PCT",
                        help="smallest growth of a share to report, e.g. 10%% (default: 10%%)")
    parser.add_argument("--share", dest="metric", choices=("auto", "self", "total"), default="auto",
                        help="which share to compare: self (a function's own frames), total (with its callees), or "
                             "auto: both, callers of a reported function left out (default)")
    parser.add_argument("--per", choices=BASES, default="auto",
                        help="what a function's cost is divided by: request (the requests served in the "
                             "profiles' windows), share (the profile's total), or auto: request when both sides "
                             "count requests (default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    before, after, name, unit, header = load_comparison(args, args.after)
    try:
        result = compare(before, after, value=name, threshold=args.threshold, metric=args.metric, per=args.per)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.per != "share" and before.request_count() and after.request_count():
        header += f"\ncost per request: {before.request_count()} requests before, {after.request_count()} after"
    elif args.per == "auto":
        header += "\ncost as a share of the total (the profiles count no requests)"
    sys.stdout.write(render_findings(result.findings, args.threshold, header=header, unit=unit,
                                     common=result.common, common_functions=result.common_functions))
    return 1 if result.findings else 0
