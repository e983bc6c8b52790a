"""``python -m middleware serve``: its configuration and lifecycle (:class:`ServeApp`).

The collector is a store (:mod:`middleware.serve.store`, SQLite), an importer of local-store
files (:mod:`middleware.serve.importer`) and an HTTP server: connections, authentication and
bodies in :mod:`middleware.serve.httpd`, the routes (ingest, query API, web page) in
:mod:`middleware.serve.routes`.

"Loopback" is decided on the address the server actually binds: the host is resolved once the
way the C library reads addresses (``127.1``, ``0x7f.1``, ``2130706433`` are 127.0.0.1; names
through the resolver) and that numeric address is bound, so the check and the socket cannot
disagree. Anything but loopback needs a token (see :mod:`middleware.serve.httpd`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from middleware.serve.httpd import BODY, BUSY, WAITING, Server, Server6
from middleware.serve.importer import Importer
from middleware.serve.ingest import IngestLimits, env_number
from middleware.serve.query import QueryEngine
from middleware.serve.regressions import RegressionWatcher
from middleware.serve.retention import MAX_SIZE_ENV, RETENTION_ENV, parse_duration, parse_size
from middleware.serve.routes import Handler
from middleware.serve.store import STORED, Store

log = logging.getLogger(__name__)

__all__ = [
    "ServeConfig",
    "ServeApp",
    "ConfigError",
    "is_loopback",
    "resolve_listen_address",
    "TOKEN_ENV",
    "REQUEST_TIMEOUT_ENV",
    "MAX_CONNECTIONS_ENV",
    "RETENTION_ENV",
    "MAX_SIZE_ENV",
]

TOKEN_ENV = "MW_SERVE_TOKEN"
REQUEST_TIMEOUT_ENV = "MW_SERVE_REQUEST_TIMEOUT"
MAX_CONNECTIONS_ENV = "MW_SERVE_MAX_CONNECTIONS"


class ConfigError(ValueError):
    """The server cannot start with this configuration (message says why)."""


def _env_number(name: str, default: float, lo: float, hi: float) -> float:
    """A numeric setting from the environment; a bad value is logged and the default used."""
    return env_number(name, default, lo, hi, float, f"a number within {lo:g}..{hi:g}; using {default:g}")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 4040
    data_dir: str = "mw-serve-data"
    token: str | None = None
    import_dirs: list[str] = field(default_factory=list)
    import_interval: float = 10.0
    limits: IngestLimits = field(default_factory=IngestLimits)
    #: Seconds: each read/write, and the deadline for a request's headers (see :mod:`middleware.serve.httpd`).
    request_timeout: float = field(default_factory=lambda: _env_number(REQUEST_TIMEOUT_ENV, 30.0, 0.1, 3600.0))
    #: Connections open at once (one thread each).
    max_connections: int = field(default_factory=lambda: int(_env_number(MAX_CONNECTIONS_ENV, 256, 1, 100_000)))
    #: Retention (:mod:`middleware.serve.retention`): "7d", "off"...; None: $MW_SERVE_RETENTION, else
    #: what the store was given last, else 7 days. ``max_size`` likewise ("2GiB"; $MW_SERVE_MAX_SIZE).
    retention: str | None = None
    max_size: str | None = None
    #: Seconds between retention passes when the last one had nothing more to delete.
    retention_interval: float = 10.0
    #: Seconds between passes of the regression detector over the versions (:mod:`middleware.serve.regressions`).
    regress_interval: float = 10.0


def resolve_listen_address(host: str) -> tuple[socket.AddressFamily, str]:
    """``(family, numeric address)`` that listening on ``host`` binds.

    Numeric addresses are read the way the C library reads them (``inet_aton``: ``127.1``,
    ``0x7f.1``, ``0177.0.0.1`` and ``2130706433`` all are 127.0.0.1); IPv6 may come in brackets;
    names are resolved once (an IPv4 address preferred, as binding a name did before). Raises
    :class:`OSError` (or :class:`ValueError`) when ``host`` cannot be resolved.
    """
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        return socket.AF_INET, "0.0.0.0"  # what binding "" means: every interface
    if any(c.isspace() or c == "\x00" for c in h):
        raise ValueError(f"bad host {host!r}")
    try:
        ip = ipaddress.ip_address(h)
        return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), str(ip)
    except ValueError:
        pass
    if ":" not in h:
        try:
            return socket.AF_INET, socket.inet_ntoa(socket.inet_aton(h))
        except OSError:
            pass
    infos = socket.getaddrinfo(h, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise OSError(f"{host!r} has no IPv4 or IPv6 address")
    infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
    family, _, _, _, sockaddr = infos[0]
    return socket.AddressFamily(family), str(sockaddr[0])


def _address_is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` (an address in any spelling, or a name) binds a loopback
    address only (see :func:`resolve_listen_address`); False when it cannot be resolved."""
    try:
        return _address_is_loopback(resolve_listen_address(host)[1])
    except (OSError, ValueError, UnicodeError):
        return False


def check_config(config: ServeConfig) -> tuple[socket.AddressFamily, str]:
    """Refuse configurations that would expose profiles or crash later (raises ConfigError);
    returns the address to bind (:func:`resolve_listen_address`, resolved this once)."""
    try:
        family, address = resolve_listen_address(config.host)
    except (OSError, ValueError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {config.host!r}: {exc}") from None
    if not _address_is_loopback(address) and not config.token:
        raise ConfigError(
            f"refusing to listen on {config.host!r} without a token: anything but loopback needs "
            f"--token or {TOKEN_ENV} (uploads and the page then need it)"
        )
    if config.token is not None and len(config.token) < 8:
        raise ConfigError("the token must be at least 8 characters long")
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"bad port {config.port}")
    if not (config.request_timeout > 0 and config.max_connections >= 1):
        raise ConfigError("request_timeout must be positive and max_connections at least 1")
    return family, address


def retention_bounds(config: ServeConfig) -> tuple[Any, Any]:
    """(max age in seconds, max bytes) from the config, else the environment; each may be None
    (no bound) or :data:`~middleware.serve.store.STORED` (the store's own). A bad value in the
    config is a ConfigError; in the environment, a logged warning and the store's own."""
    out: list[Any] = []
    for given, env, parse, option in ((config.retention, RETENTION_ENV, parse_duration, "retention"),
                                      (config.max_size, MAX_SIZE_ENV, parse_size, "max_size")):
        if given is not None:
            try:
                out.append(parse(given))
            except ValueError as exc:
                raise ConfigError(f"{option}: {exc}") from None
            continue
        raw = (os.environ.get(env) or "").strip()
        try:
            out.append(parse(raw) if raw else STORED)
        except ValueError as exc:
            log.warning("ignoring %s=%r: %s; using the store's own setting", env, raw, exc)
            out.append(STORED)
    return out[0], out[1]


class ServeApp:
    """The collector: store + importer + HTTP server. Use :meth:`start`/:meth:`stop` (tests) or
    :meth:`serve_forever` (the command)."""

    def __init__(self, config: ServeConfig) -> None:
        family, address = check_config(config)
        self.config = config
        max_age, max_bytes = retention_bounds(config)
        self.store = Store(config.data_dir, max_series_per_service=config.limits.max_series_per_service,
                           max_age_s=max_age, max_bytes=max_bytes, retention_interval_s=config.retention_interval)
        self.engine = QueryEngine(self.store)
        self.regressions = RegressionWatcher(self.store, self.engine, interval_s=config.regress_interval)
        self.importer = Importer(self.store, config.import_dirs, limits=config.limits, interval=config.import_interval)
        self.accepted = 0
        self.rejected = 0
        self.disk_full_warned = False
        server_cls = Server6 if family == socket.AF_INET6 else Server
        try:
            # The numeric address the loopback check looked at, not the name again.
            self.httpd = server_cls((address, config.port), Handler)
        except OSError:
            self.store.close()
            raise
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host.strip()
        try:
            socket.inet_aton(host)
            host = str(self.httpd.server_address[0])  # 127.1 or 0x7f.1: say 127.0.0.1
        except OSError:
            pass
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Counters: uploads, series folded into overflow series, connections."""
        httpd = self.httpd
        phases = httpd.connection_phases()
        return {
            "uploads": {"accepted": self.accepted, "rejected": self.rejected},
            "series_overflow": {
                "limit_per_service": self.store.max_series_per_service,
                "uploads": self.store.overflow_uploads,
                "samples": self.store.overflow_samples,
            },
            "storage": self.store.storage(),
            "connections": {
                "open": sum(phases.values()),
                "max": self.config.max_connections,
                "waiting": phases[WAITING],
                "reading_body": phases[BODY],
                "busy": phases[BUSY],
                "timed_out": httpd.timed_out,
                "evicted": httpd.evicted,
                "refused_busy": httpd.refused,
            },
        }

    def start(self) -> ServeApp:
        """Serve in a background thread (returns at once)."""
        self.importer.start()
        self.regressions.start()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="mw-serve-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` is called from another thread or a signal."""
        self.importer.start()
        self.regressions.start()
        try:
            self.httpd.serve_forever()
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, finish pending writes and close the store (idempotent)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=30)
            self._thread = None
            self._close()

    def _close(self) -> None:
        self.importer.stop()
        self.regressions.stop()
        self.httpd.close_all_connections()
        self.httpd.server_close()
        self.store.close()

    def __enter__(self) -> ServeApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def token_from_env(explicit: str | None) -> str | None:
    """The token: ``--token`` beats ``MW_SERVE_TOKEN``; empty means none."""
    token = explicit if explicit is not None else os.environ.get(TOKEN_ENV)
    return token or None
