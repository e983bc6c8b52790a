"""``serve``: a local collector speaking the Pyroscope ingest API, with the web page.

    python -m middleware serve [--host 127.0.0.1] [--port 4040] [--data DIR] [--import DIR]...
                               [--token TOKEN] [--max-body BYTES] [--max-profile BYTES]

Agents push to it exactly as to Grafana Pyroscope (``MW_PROFILING_SERVER_URL=http://HOST:PORT``);
profiles are kept in SQLite under ``--data``. Profiles an agent wrote to its local store are
imported too: the agent's local store (``$MW_PROFILE_DIR``, default ~/.cache/middleware/profiles;
``--no-store-import`` skips it) and the directories given with ``--import`` are scanned on start
and every ``--import-interval`` seconds, and each file is imported once.

Listening on anything but loopback needs a token (``--token`` or ``$MW_SERVE_TOKEN``; the option
wins): uploads and the page must then send it (``Authorization: Bearer TOKEN``, or basic auth
with the token as password — the browser asks for it).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from middleware.commands import CommandError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4040
PROFILE_DIR_ENV = "MW_PROFILE_DIR"


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


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="local collector (Pyroscope ingest API) with the profiling web page",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 = any free port)")
    parser.add_argument(
        "--data", metavar="DIR", default=None, help=f"where the SQLite store lives (default: {default_data_dir()})"
    )
    parser.add_argument(
        "--import", dest="import_dirs", metavar="DIR", action="append", default=[],
        help="also import the pprof files of DIR (repeatable)",
    )
    parser.add_argument(
        "--no-store-import", action="store_true",
        help=f"do not import the agent's local store (${PROFILE_DIR_ENV} or ~/.cache/middleware/profiles)",
    )
    parser.add_argument(
        "--import-interval", type=float, default=10.0, metavar="SECONDS",
        help="how often to look for new files to import (default: 10)",
    )
    parser.add_argument(
        "--token", default=None,
        help="token uploads and the page must send (default: $MW_SERVE_TOKEN); required off loopback",
    )
    parser.add_argument("--max-body", type=_size, default="16M", metavar="BYTES", help="largest upload body (default: 16M)")
    parser.add_argument(
        "--max-profile", type=_size, default="64M", metavar="BYTES",
        help="largest decompressed profile (default: 64M); protects against gzip bombs",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from middleware.serve import ConfigError, ServeApp, ServeConfig
    from middleware.serve.ingest import IngestLimits
    from middleware.serve.server import token_from_env

    import_dirs = list(args.import_dirs)
    if not args.no_store_import:
        from middleware.config import default_profile_dir

        store_dir = os.environ.get(PROFILE_DIR_ENV) or default_profile_dir()
        if store_dir not in import_dirs:
            import_dirs.append(store_dir)
    if args.import_interval <= 0:
        raise CommandError("--import-interval must be positive")
    config = ServeConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data or default_data_dir(),
        token=token_from_env(args.token),
        import_dirs=import_dirs,
        import_interval=args.import_interval,
        limits=IngestLimits(max_body_bytes=args.max_body, max_decompressed_bytes=args.max_profile),
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
