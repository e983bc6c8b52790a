"""``serve``: a local collector speaking the Pyroscope ingest API, with the web page.

    python -m middleware serve [--host 127.0.0.1] [--port 4040] [--data DIR] [--import DIR]...
                               [--token TOKEN] [--max-body BYTES] [--max-profile BYTES]
                               [--max-series-per-upload N] [--max-series-per-service N]
                               [--request-timeout SECONDS] [--max-connections N]
                               [--retention DURATION] [--max-size SIZE]

Agents push to it exactly as to Grafana Pyroscope (``MW_PROFILING_SERVER_URL=http://HOST:PORT``);
profiles are kept in SQLite under ``--data``. Profiles an agent wrote to its local store are
imported too: the agent's local store (``$MW_PROFILE_DIR``, default ~/.cache/middleware/profiles;
``--no-store-import`` skips it) and the directories given with ``--import`` are scanned on start
and every ``--import-interval`` seconds, and each file is imported once.

Listening on anything but loopback needs a token (``--token`` or ``$MW_SERVE_TOKEN``; the option
wins): uploads and the page must then send it (``Authorization: Bearer TOKEN``, or basic auth
with the token as password — the browser asks for it).

Limits: one upload holds at most ``--max-series-per-upload`` label sets (400 beyond);
a service keeps at most ``--max-series-per-service`` series, samples of new label sets beyond
that go to its one overflow series; a request's headers must arrive within
``--request-timeout`` seconds (its body within that plus 1 s per 64 KiB); at most
``--max-connections`` connections are open at once. Each defaults to its environment variable
(``MW_SERVE_MAX_SERIES_PER_UPLOAD``, ``MW_SERVE_MAX_SERIES_PER_SERVICE``,
``MW_SERVE_REQUEST_TIMEOUT``, ``MW_SERVE_MAX_CONNECTIONS``), else 2000, 50000, 30 and 256; the
option wins.

Retention: profiles older than ``--retention`` (default 7d) go, and the oldest go while the data
is larger than ``--max-size`` (default 2GiB), in the background (``off``: no such bound). Each
defaults to ``$MW_SERVE_RETENTION`` / ``$MW_SERVE_MAX_SIZE``, else to what the store was given
last. A full disk: uploads are answered 507 and the page keeps working.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from middleware.commands import CommandError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4040


def default_data_dir() -> str:
    """``$XDG_DATA_HOME/middleware/serve`` (``~/.local/share/middleware/serve``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "middleware", "serve")


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, scale = t[:-1], factor
            break
    try:
        value = int(float(t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 16M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


_N = TypeVar("_N", int, float)


def _within(number: Callable[[str], _N], lo: _N, hi: _N, expected: str) -> Callable[[str], _N]:
    """An argparse type: ``number(text)`` within lo..hi (a bad one: exit status 2, one line
    saying ``expected``)."""

    def parse(text: str) -> _N:
        try:
            value = number(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _checked(kind: str) -> Callable[[str], str]:
    """An argparse type: the text, once it reads as a retention ``kind`` ("duration" or "size");
    serve parses it again (the serve package is imported only when the command runs)."""
    def check(text: str) -> str:
        from middleware.serve import retention

        try:
            (retention.parse_duration if kind == "duration" else retention.parse_size)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def _int_within(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number within lo..hi."""
    return _within(int, lo, hi, f"a whole number from {lo} to {hi}")


def _seconds_within(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: seconds (a decimal number) within lo..hi."""
    return _within(float, lo, hi, f"seconds from {lo:g} to {hi:g}")


# The ranges the environment variables accept too (middleware/serve/ingest.py and server.py).
MAX_SERIES = 10**9
MAX_CONNECTIONS = 100_000
REQUEST_TIMEOUT_RANGE = (0.1, 3600.0)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="local collector (Pyroscope ingest API) with the profiling web page",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 = any free port)"
    )
    parser.add_argument(
        "--data", metavar="DIR", default=None, help=f"where the SQLite store lives (default: {default_data_dir()})"
    )
    parser.add_argument(
        "--import", dest="import_dirs", metavar="DIR", action="append", default=[],
        help="also import the pprof files of DIR (repeatable)",
    )
    parser.add_argument(
        "--no-store-import", action="store_true",
        help="do not import the agent's local store (the profile directory the agent's settings name; "
        "default ~/.cache/middleware/profiles)",
    )
    parser.add_argument(
        "--import-interval", type=float, default=10.0, metavar="SECONDS",
        help="how often to look for new files to import (default: 10)",
    )
    parser.add_argument(
        "--token", default=None,
        help="token uploads and the page must send (default: $MW_SERVE_TOKEN); required off loopback",
    )
    parser.add_argument(
        "--max-body", type=_size, default="16M", metavar="BYTES", help="largest upload body (default: 16M)"
    )
    parser.add_argument(
        "--max-profile", type=_size, default="64M", metavar="BYTES",
        help="largest decompressed profile (default: 64M); protects against gzip bombs",
    )
    parser.add_argument(
        "--max-series-per-upload", type=_int_within(1, MAX_SERIES), default=None, metavar="N",
        help="distinct label sets one upload may hold; more is refused with 400 "
             "(default: $MW_SERVE_MAX_SERIES_PER_UPLOAD or 2000)",
    )
    parser.add_argument(
        "--max-series-per-service", type=_int_within(1, MAX_SERIES), default=None, metavar="N",
        help="series a service may have; samples of new label sets beyond that go to its overflow series "
             "(default: $MW_SERVE_MAX_SERIES_PER_SERVICE or 50000)",
    )
    parser.add_argument(
        "--request-timeout", type=_seconds_within(*REQUEST_TIMEOUT_RANGE), default=None, metavar="SECONDS",
        help="a request's line and headers must arrive within this (also the keep-alive idle limit and each "
             "read's timeout; a body gets 1 s more per 64 KiB) (default: $MW_SERVE_REQUEST_TIMEOUT or 30)",
    )
    parser.add_argument(
        "--max-connections", type=_int_within(1, MAX_CONNECTIONS), default=None, metavar="N",
        help="connections open at once, one thread each; beyond it the one waiting longest for its request is "
             "closed, or 503 when all are busy (default: $MW_SERVE_MAX_CONNECTIONS or 256)",
    )
    parser.add_argument(
        "--retention", type=_checked("duration"), default=None, metavar="DURATION",
        help="keep profiles this long (7d, 12h, 30m, seconds; off) (default: $MW_SERVE_RETENTION, else the "
             "store's last setting, else 7d)",
    )
    parser.add_argument(
        "--max-size", type=_checked("size"), default=None, metavar="SIZE",
        help="keep at most this much data, the oldest going first (2GiB, 500M, bytes; off) "
             "(default: $MW_SERVE_MAX_SIZE, else the store's last setting, else 2GiB)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from middleware.serve import ConfigError, ServeApp, ServeConfig
    from middleware.serve.ingest import IngestLimits
    from middleware.serve.server import token_from_env

    import_dirs = list(args.import_dirs)
    if not args.no_store_import:
        from middleware.config import resolve_setting

        store_dir = resolve_setting("profile_dir")  # the agent's rule: None for "none"/"off", else absolute
        if store_dir and store_dir not in {os.path.abspath(d) for d in import_dirs}:
            import_dirs.append(store_dir)
    if args.import_interval <= 0:
        raise CommandError("--import-interval must be positive")
    # Options left out keep the defaults, which read the environment variables.
    limits: dict[str, Any] = {"max_body_bytes": args.max_body, "max_decompressed_bytes": args.max_profile}
    if args.max_series_per_upload is not None:
        limits["max_series_per_upload"] = args.max_series_per_upload
    if args.max_series_per_service is not None:
        limits["max_series_per_service"] = args.max_series_per_service
    connections: dict[str, Any] = {}
    if args.request_timeout is not None:
        connections["request_timeout"] = args.request_timeout
    if args.max_connections is not None:
        connections["max_connections"] = args.max_connections
    config = ServeConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data or default_data_dir(),
        token=token_from_env(args.token),
        import_dirs=import_dirs,
        import_interval=args.import_interval,
        limits=IngestLimits(**limits),
        retention=args.retention,
        max_size=args.max_size,
        **connections,
    )
    try:
        app = ServeApp(config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    auth = "token required" if config.token else "no token (loopback only)"
    imports = ", ".join(import_dirs) if import_dirs else "none"
    sys.stdout.write(
        f"middleware serve: listening on {app.url} ({auth}); data in {config.data_dir}; importing: {imports}\n"
        f"  agents: MW_PROFILING_SERVER_URL={app.url}   page: {app.url}/\n"
    )
    sys.stdout.flush()
    try:
        app.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopping")
    sys.stdout.write(f"middleware serve: stopped ({app.accepted} uploads accepted, {app.rejected} rejected)\n")
    return 0
