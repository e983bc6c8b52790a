"""``python -m middleware``: argparse front end over the subcommands in :mod:`middleware.commands`.

Subcommands are listed in :data:`COMMANDS`. Each module there defines
``register(subparsers) -> None``, which adds its parser(s) and sets ``func=run`` where
``run(args: argparse.Namespace) -> int`` returns the exit status. Adding a subcommand is one line
in :data:`COMMANDS`. Optional modules that are absent are skipped.

Errors the user can fix (unreadable profile, unknown function, bad option value) are printed as
one line on stderr with exit status 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from middleware.commands import USER_ERRORS

logger = logging.getLogger(__name__)

__all__ = ["COMMANDS", "build_parser", "main"]

#: (module, optional). Optional modules are skipped when they are not installed.
COMMANDS: list[tuple[str, bool]] = [
    ("middleware.commands.top", False),
    ("middleware.commands.sandwich", False),
    ("middleware.commands.flamegraph", False),
    ("middleware.commands.export", False),
    ("middleware.commands.diff", False),
    ("middleware.commands.regress", False),
    ("middleware.commands.serve", True),
]

PROG = "python -m middleware"


def _load(module: str, optional: bool) -> object | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if optional and exc.name == module:
            logger.debug("subcommand module %s is not available", module)
            return None
        if optional:
            logger.warning("subcommand module %s cannot be imported: %s", module, exc)
            return None
        raise
    except ImportError as exc:
        if optional:
            logger.warning("subcommand module %s cannot be imported: %s", module, exc)
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read pprof profiles (files, directories, the local store) and find the bottleneck.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, optional in COMMANDS:
        mod = _load(module, optional)
        if mod is not None:
            mod.register(subparsers)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="middleware: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO if args.verbose == 1 else logging.DEBUG)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except USER_ERRORS as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # output piped into `head` & co.: not an error; keep Python from complaining at exit
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130
