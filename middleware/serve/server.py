"""The HTTP side of ``python -m middleware serve``: ingest, query API, web page.

Built on the standard library's :class:`http.server.ThreadingHTTPServer` (one thread per
connection, HTTP/1.1 keep-alive so agents reuse their connection). A local collector receives a
few uploads per agent per 10 s and a handful of UI queries; a thread per connection is plenty,
and it keeps ``serve`` free of dependencies. The expensive parts — SQLite writes — are serialised
by the store's single writer thread with group commit (see :mod:`middleware.serve.store`).

Routes::

    POST /ingest                     the Pyroscope ingest API (PROTOCOL.md)
    POST /push.v1.PusherService/Push the newer push API (application/proto or application/json)
    GET  /                           the web page (static/index.html, app.js, app.css)
    GET  /static/<file>              page assets, plus the reporters' flame graph script
    GET  /healthz                    "ok" (no token needed)
    GET  /api/services               services with their profile types
    GET  /api/profile_types          ?service=
    GET  /api/label_names            ?service=[&type=&from=&until=]
    GET  /api/label_values           ?service=&name=[&type=&from=&until=]
    GET  /api/timeline               selection [&step=seconds]
    GET  /api/profile                selection -> reporters' JSON (flame tree + function table)
    GET  /api/sandwich               selection &function=[&file=]
    GET  /api/diff                   base selection + comparison (from2/until2/selector2)
    GET  /api/pprof                  selection -> merged profile as gzipped pprof
    GET  /api/stats                  uploads accepted/rejected, series overflow, connections

A *selection* is ``service``, ``type``, ``from``, ``until`` (unix seconds) and ``selector``
(``{label="value",...}``); see :mod:`middleware.serve.query`.

Security: with a token configured (``--token`` / ``MW_SERVE_TOKEN``; mandatory when listening on
a non-loopback address), every route but ``/healthz`` needs it, as ``Authorization: Bearer
<token>`` or as the password of HTTP basic auth (any user name) — which is what a browser
prompts for, so the page keeps working. Tokens are compared in constant time. "Loopback" is
decided on the address the server actually binds: the host is resolved once the way the C
library reads addresses (``127.1``, ``0x7f.1``, ``2130706433`` are 127.0.0.1; names through the
resolver) and that numeric address is bound, so the check and the socket cannot disagree.

Connections. A slow or idle client cannot hold a thread forever, and their number is bounded:

* every read and write on a connection times out after ``request_timeout`` seconds
  (``MW_SERVE_REQUEST_TIMEOUT``, default 30);
* a request's line and headers must be complete within ``request_timeout`` of the moment the
  connection starts waiting for them (accepted, or the previous answer sent: this is also the
  keep-alive idle limit), and its body within ``request_timeout`` plus one second per 64 KiB;
  the server closes a connection past its deadline (headers or a body trickled a byte at a
  time cannot keep it open);
* at most ``max_connections`` connections are open at once (``MW_SERVE_MAX_CONNECTIONS``,
  default 256, one thread each). A new connection beyond that takes the place of the one that
  has waited longest for its request or body; when every connection is busy computing an
  answer, the new one gets ``503`` with ``Retry-After``.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from middleware.serve.importer import Importer
from middleware.serve.ingest import INT64_MAX, IngestError, IngestLimits, Upload, decode_push, decode_upload
from middleware.serve.query import QueryEngine, QueryError, parse_seconds, parse_selection, parse_step
from middleware.serve.store import Store, StoreClosed

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
]

TOKEN_ENV = "MW_SERVE_TOKEN"
REQUEST_TIMEOUT_ENV = "MW_SERVE_REQUEST_TIMEOUT"
MAX_CONNECTIONS_ENV = "MW_SERVE_MAX_CONNECTIONS"
STATIC_DIR = Path(__file__).with_name("static")
_REPORTERS_DIR = Path(__file__).resolve().parent.parent / "reporters"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
# The page loads only its own files: no inline script, no other origin, no framing.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'; base-uri 'none'"
# A body beyond the limit is read and thrown away up to this much, so that the client sees our
# 413 instead of a connection reset; anything bigger is cut off.
_DRAIN_LIMIT = 64 * 1024 * 1024
# A body may take request_timeout plus one second per this many bytes.
_MIN_BODY_RATE = 64 * 1024


class ConfigError(ValueError):
    """The server cannot start with this configuration (message says why)."""


def _env_number(name: str, default: float, lo: float, hi: float) -> float:
    """A numeric setting from the environment; a bad value is logged and the default used."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # also false for nan
        log.warning("ignoring %s=%r: expected a number within %g..%g; using %g", name, raw, lo, hi, default)
        return default
    return value


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 4040
    data_dir: str = "mw-serve-data"
    token: str | None = None
    import_dirs: list[str] = field(default_factory=list)
    import_interval: float = 10.0
    limits: IngestLimits = field(default_factory=IngestLimits)
    #: Seconds: each read/write, and the deadline for a request's headers (see module doc).
    request_timeout: float = field(default_factory=lambda: _env_number(REQUEST_TIMEOUT_ENV, 30.0, 0.1, 3600.0))
    #: Connections open at once (one thread each).
    max_connections: int = field(default_factory=lambda: int(_env_number(MAX_CONNECTIONS_ENV, 256, 1, 100_000)))


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


# Phases of a connection (see _Conn).
_WAITING = "waiting"  # for a request line and headers (includes keep-alive idle time)
_BODY = "body"  # reading a request body
_BUSY = "busy"  # answering (no deadline: the server's own work; writes time out by themselves)


class _Conn:
    """One open connection: its socket, phase and deadline (guarded by the server's lock)."""

    __slots__ = ("sock", "phase", "since", "deadline", "closed")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.phase = _WAITING
        self.since = time.monotonic()
        self.deadline = deadline
        self.closed = False


_BUSY_BODY = b"server busy: too many open connections; retry\n"
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True
    app: "ServeApp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: dict[socket.socket, _Conn] = {}
        self._conns_lock = threading.Lock()
        self.timed_out = 0
        self.evicted = 0
        self.refused = 0
        super().__init__(*args, **kwargs)

    # -- connection accounting ---------------------------------------------------------------
    # The accept thread registers a connection before its thread starts and refuses or evicts
    # when full; handler threads move their connection between phases; the serve_forever loop
    # (service_actions) closes connections past their deadline. Sockets are only shut down
    # (never closed) by others than their own thread, and only while registered, under the lock,
    # so a file descriptor number reused by a new connection is never touched.

    def process_request(self, request: Any, client_address: Any) -> None:
        config = self.app.config
        now = time.monotonic()
        with self._conns_lock:
            if len(self._conns) >= config.max_connections and not self._evict_one_locked():
                self.refused += 1
                refused = self.refused
            else:
                self._conns[request] = _Conn(request, now + config.request_timeout)
                refused = 0
        if refused:
            if refused & (refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...: bounded log volume
                log.warning(
                    "refused a connection from %s with 503: all %d connections busy (%d refused so far)",
                    client_address[0], config.max_connections, refused,
                )
            try:
                request.settimeout(0)
                request.send(_BUSY_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _evict_one_locked(self) -> bool:
        """Shut the connection that has waited longest for its request (else its body) down."""
        victims = [c for c in self._conns.values() if not c.closed and c.phase != _BUSY]
        if not victims:
            return False
        victim = min(victims, key=lambda c: (c.phase != _WAITING, c.since))
        self._shut_locked(victim)
        del self._conns[victim.sock]
        self.evicted += 1
        return True

    def _shut_locked(self, conn: _Conn) -> None:
        conn.closed = True
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def set_phase(self, sock: socket.socket, phase: str, seconds: float | None = None) -> bool:
        """Move a connection to ``phase`` with a deadline ``seconds`` from now (None: none);
        False if it was shut down meanwhile (timed out or evicted)."""
        now = time.monotonic()
        with self._conns_lock:
            conn = self._conns.get(sock)
            if conn is None or conn.closed:
                return False
            conn.phase = phase
            conn.since = now
            conn.deadline = now + seconds if seconds is not None else float("inf")
            return True

    def service_actions(self) -> None:
        """Between polls of the accept loop: close connections past their deadline."""
        super().service_actions()
        now = time.monotonic()
        with self._conns_lock:
            for conn in self._conns.values():
                if not conn.closed and conn.phase != _BUSY and now >= conn.deadline:
                    log.debug("closing a connection that exceeded its %s deadline", conn.phase)
                    self._shut_locked(conn)
                    self.timed_out += 1

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            for conn in self._conns.values():
                if not conn.closed:
                    self._shut_locked(conn)

    def connection_phases(self) -> dict[str, int]:
        """Open connections per phase (waiting for a request, reading a body, busy)."""
        out = {_WAITING: 0, _BODY: 0, _BUSY: 0}
        with self._conns_lock:
            for conn in self._conns.values():
                if not conn.closed:
                    out[conn.phase] += 1
        return out

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client going away mid-request (browser closed, agent killed) is routine.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("error while serving %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "middleware-serve/0.1"

    # -- plumbing ----------------------------------------------------------------------------

    def setup(self) -> None:
        self.timeout = self.server.app.config.request_timeout
        super().setup()

    def handle_one_request(self) -> None:
        # Waiting for the next request line and headers: they must all arrive before the deadline.
        self.server.set_phase(self.request, _WAITING, self.server.app.config.request_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if not self.server.set_phase(self.request, _BUSY):
            # Shut down while its headers were still arriving: what was read is not a request.
            self.close_connection = True
            return False
        return ok

    def _body_phase(self, length: int) -> None:
        """Reading ``length`` body bytes: allowed request_timeout plus 1 s per 64 KiB."""
        self.server.set_phase(self.request, _BODY, self.server.app.config.request_timeout + length / _MIN_BODY_RATE)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8", headers)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, body, "application/json", headers)

    # -- auth --------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.server.app.config.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            given = decoded.partition(":")[2]
        return hmac.compare_digest(given.encode(), token.encode())

    def _deny(self) -> None:
        self.close_connection = True
        self._text(
            HTTPStatus.UNAUTHORIZED,
            "unauthorized: this server needs its token (Authorization: Bearer <token>, "
            "or basic auth with the token as password)",
            {"WWW-Authenticate": 'Basic realm="middleware serve", charset="UTF-8"'},
        )

    def handle_expect_100(self) -> bool:
        # Refuse before the client sends the body (curl waits for "100 Continue").
        if urlsplit(self.path).path != "/healthz" and not self._authorized():
            self._deny()
            return False
        length = self.headers.get("Content-Length")
        limit = self.server.app.config.limits.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            self.close_connection = True
            self._text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds the limit of {limit} bytes")
            return False
        return super().handle_expect_100()

    # -- body --------------------------------------------------------------------------------

    def _read_body(self, limit: int) -> bytes:
        encoding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            if encoding != "chunked":
                self.close_connection = True
                raise IngestError(HTTPStatus.NOT_IMPLEMENTED, f"unsupported Transfer-Encoding {encoding!r}")
            return self._read_chunked(limit)
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise IngestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if not raw.strip().isdigit():
            self.close_connection = True
            raise IngestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw!r}")
        length = int(raw)
        if length > limit:
            self._drain(length)
            raise IngestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds the limit of {limit} bytes")
        self._body_phase(length)
        try:
            data = self.rfile.read(length)
        finally:
            self.server.set_phase(self.request, _BUSY)
        if len(data) < length:
            self.close_connection = True
            raise IngestError(HTTPStatus.BAD_REQUEST, f"incomplete body: got {len(data)} of {length} bytes")
        return data

    def _drain(self, length: int) -> None:
        self.close_connection = True
        if length > _DRAIN_LIMIT:
            return
        self._body_phase(length)
        remaining = length
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
        finally:
            self.server.set_phase(self.request, _BUSY)

    def _read_chunked(self, limit: int) -> bytes:
        self._body_phase(limit)
        try:
            return self._read_chunked_body(limit)
        finally:
            self.server.set_phase(self.request, _BUSY)

    def _read_chunked_body(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise IngestError(HTTPStatus.BAD_REQUEST, "bad chunked body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            if len(out) + size > limit:
                self.close_connection = True
                raise IngestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds the limit of {limit} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                self.close_connection = True
                raise IngestError(HTTPStatus.BAD_REQUEST, "incomplete chunked body")
            out += chunk
            self.rfile.readline(1024)

    # -- dispatch ----------------------------------------------------------------------------

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz" or url.path in _GET_ROUTES or url.path == "/" or url.path.startswith("/static/"):
            self.close_connection = True
            self._text(HTTPStatus.METHOD_NOT_ALLOWED, f"{url.path} only answers GET", {"Allow": "GET"})
            return
        if url.path not in (_INGEST, _PUSH):
            self.close_connection = True
            self._text(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path}")
            return
        if not self._authorized():
            length = (self.headers.get("Content-Length") or "").strip()
            self._drain(int(length) if length.isdigit() else 0)
            self._deny()
            return
        self._ingest(url.query, push=url.path == _PUSH)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._text(HTTPStatus.OK, "ok")
            return
        if not self._authorized():
            self._deny()
            return
        if url.path in (_INGEST, _PUSH):
            self._text(HTTPStatus.METHOD_NOT_ALLOWED, f"{url.path} only answers POST", {"Allow": "POST"})
            return
        if url.path in ("/", "/index.html"):
            self._static(STATIC_DIR / "index.html")
            return
        if url.path.startswith("/static/"):
            self._static_asset(url.path[len("/static/") :])
            return
        route = _GET_ROUTES.get(url.path)
        if route is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {url.path}"})
            return
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            route(self, params)
        except QueryError as exc:
            self._json(exc.status, {"error": exc.message})
        except StoreClosed:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "server is shutting down"})
        except (ConnectionError, TimeoutError):
            raise  # the client went away or stalled while reading the answer: handle_error
        except Exception as exc:
            log.exception("query %s failed", self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc!r}"})

    do_HEAD = do_GET

    # -- ingest ------------------------------------------------------------------------------

    def _ingest(self, query: str, push: bool = False) -> None:
        app = self.server.app
        uploads: list[Upload]
        try:
            body = self._read_body(app.config.limits.max_body_bytes)
            if push:
                uploads = decode_push(self.headers, body, app.config.limits)  # type: ignore[arg-type]
            else:
                uploads = [decode_upload(query, self.headers, body, app.config.limits)]  # type: ignore[arg-type]
        except IngestError as exc:
            app.rejected += 1
            log.info("rejected upload from %s: %s %s", self.client_address[0], exc.status, exc.message)
            if push:  # Connect protocol error body
                self._json(exc.status, {"code": _connect_code(exc.status), "message": exc.message})
            else:
                self._text(exc.status, exc.message)
            return
        try:
            ids = app.store.add_many(uploads, source="push" if push else "ingest")
        except StoreClosed:
            self.close_connection = True
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down; retry", {"Retry-After": "5"})
            return
        except Exception as exc:
            log.exception("storing an upload failed")
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"could not store the profile ({exc}); retry", {"Retry-After": "1"})
            return
        app.accepted += len(ids)
        overflow_samples = sum(u.overflow_samples for u in uploads)
        overflow_series = sum(u.overflow_series for u in uploads)
        if push:
            # An empty push.v1.PushResponse, in the encoding of the request.
            if (self.headers.get("Content-Type") or "").lower().startswith("application/json"):
                self._send(HTTPStatus.OK, b"{}", "application/json")
            else:
                self._send(HTTPStatus.OK, b"", "application/proto")
        else:
            answer: dict[str, Any] = {"id": ids[0]}
            if overflow_series:
                # Stored, but these label sets went to the service's overflow series (store doc).
                answer["series_overflow"] = {
                    "series": overflow_series,
                    "samples": overflow_samples,
                    "limit": app.store.max_series_per_service,
                }
            self._json(HTTPStatus.OK, answer)

    # -- static ------------------------------------------------------------------------------

    def _static_asset(self, name: str) -> None:
        if "/" in name or name.startswith(".") or not name:
            self._text(HTTPStatus.NOT_FOUND, "not found")
            return
        path = STATIC_DIR / name
        if not path.is_file():
            # The flame graph script is the reporters' own, shared with `middleware flamegraph`.
            candidate = _REPORTERS_DIR / name
            if name.startswith("flamegraph.") and name.endswith((".js", ".css")) and candidate.is_file():
                path = candidate
        self._static(path)

    def _static(self, path: Path) -> None:
        try:
            body = path.read_bytes()
        except OSError:
            self._text(HTTPStatus.NOT_FOUND, "not found")
            return
        ctype = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        self._send(HTTPStatus.OK, body, ctype, {"Content-Security-Policy": _CSP} if path.suffix == ".html" else None)

    # -- query routes ------------------------------------------------------------------------

    def api_stats(self, params: dict[str, str]) -> None:
        self._json(HTTPStatus.OK, self.server.app.stats())

    def api_services(self, params: dict[str, str]) -> None:
        self._json(HTTPStatus.OK, {"services": self.server.app.engine.services()})

    def api_profile_types(self, params: dict[str, str]) -> None:
        service = _need(params, "service")
        self._json(HTTPStatus.OK, {"service": service, "types": self.server.app.engine.profile_types(service)})

    def _range(self, params: dict[str, str]) -> tuple[int | None, int | None]:
        f = parse_seconds(params["from"], "from") if params.get("from") else None
        u = parse_seconds(params["until"], "until") if params.get("until") else None
        return f, u

    def api_label_names(self, params: dict[str, str]) -> None:
        service = _need(params, "service")
        f, u = self._range(params)
        names = self.server.app.engine.label_names(service, f, u, params.get("type") or None)
        self._json(HTTPStatus.OK, {"service": service, "names": names})

    def api_label_values(self, params: dict[str, str]) -> None:
        service = _need(params, "service")
        name = _need(params, "name")
        f, u = self._range(params)
        values = self.server.app.engine.label_values(service, name, f, u, params.get("type") or None)
        self._json(HTTPStatus.OK, {"service": service, "name": name, "values": values})

    def api_timeline(self, params: dict[str, str]) -> None:
        sel = parse_selection(params)
        step = parse_step(params["step"]) if params.get("step") else None
        self._json(HTTPStatus.OK, self.server.app.engine.timeline(sel, step))

    def api_profile(self, params: dict[str, str]) -> None:
        self._json(HTTPStatus.OK, self.server.app.engine.profile_json(parse_selection(params)))

    def api_sandwich(self, params: dict[str, str]) -> None:
        sel = parse_selection(params)
        function = _need(params, "function")
        self._json(HTTPStatus.OK, self.server.app.engine.sandwich_json(sel, function, params.get("file")))

    def api_diff(self, params: dict[str, str]) -> None:
        base = parse_selection(params)
        comparison = parse_selection(params, suffix="2")
        if comparison.service != base.service or comparison.type_id != base.type_id:
            raise QueryError("a diff compares one service and profile type (service2/type2 must match)")
        self._json(HTTPStatus.OK, self.server.app.engine.diff_json(base, comparison))

    def api_pprof(self, params: dict[str, str]) -> None:
        from middleware.pprof import encode_pprof

        sel = parse_selection(params)
        merged = self.server.app.engine.merge(sel).profile
        for smp in merged.samples:  # pprof values are int64; a sum over many profiles may not fit
            if smp.values[0] > INT64_MAX:
                smp.values = (INT64_MAX,)
        filename = f"{sel.service}-{sel.from_ns // 1_000_000_000}-{sel.until_ns // 1_000_000_000}.pb.gz"
        self._send(
            HTTPStatus.OK,
            encode_pprof(merged),
            "application/octet-stream",
            {"Content-Disposition": f'attachment; filename="{filename}"'},
        )


_INGEST = "/ingest"
_PUSH = "/push.v1.PusherService/Push"


def _connect_code(status: int) -> str:
    return {400: "invalid_argument", 401: "unauthenticated", 413: "resource_exhausted", 415: "invalid_argument"}.get(
        status, "unknown"
    )


def _need(params: dict[str, str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise QueryError(f"missing '{name}'")
    return value


_GET_ROUTES: dict[str, Callable[[_Handler, dict[str, str]], None]] = {
    "/api/services": _Handler.api_services,
    "/api/profile_types": _Handler.api_profile_types,
    "/api/label_names": _Handler.api_label_names,
    "/api/label_values": _Handler.api_label_values,
    "/api/timeline": _Handler.api_timeline,
    "/api/profile": _Handler.api_profile,
    "/api/sandwich": _Handler.api_sandwich,
    "/api/diff": _Handler.api_diff,
    "/api/pprof": _Handler.api_pprof,
    "/api/stats": _Handler.api_stats,
}


class ServeApp:
    """The collector: store + importer + HTTP server. Use :meth:`start`/:meth:`stop` (tests) or
    :meth:`serve_forever` (the command)."""

    def __init__(self, config: ServeConfig) -> None:
        family, address = check_config(config)
        self.config = config
        self.store = Store(config.data_dir, max_series_per_service=config.limits.max_series_per_service)
        self.engine = QueryEngine(self.store)
        self.importer = Importer(self.store, config.import_dirs, limits=config.limits, interval=config.import_interval)
        self.accepted = 0
        self.rejected = 0
        server_cls = _Server6 if family == socket.AF_INET6 else _Server
        try:
            # The numeric address the loopback check looked at, not the name again.
            self.httpd = server_cls((address, config.port), _Handler)
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
            "connections": {
                "open": sum(phases.values()),
                "max": self.config.max_connections,
                "waiting": phases[_WAITING],
                "reading_body": phases[_BODY],
                "busy": phases[_BUSY],
                "timed_out": httpd.timed_out,
                "evicted": httpd.evicted,
                "refused_busy": httpd.refused,
            },
        }

    def start(self) -> "ServeApp":
        """Serve in a background thread (returns at once)."""
        self.importer.start()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="mw-serve-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` is called from another thread or a signal."""
        self.importer.start()
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
        self.httpd.close_all_connections()
        self.httpd.server_close()
        self.store.close()

    def __enter__(self) -> "ServeApp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def token_from_env(explicit: str | None) -> str | None:
    """The token: ``--token`` beats ``MW_SERVE_TOKEN``; empty means none."""
    token = explicit if explicit is not None else os.environ.get(TOKEN_ENV)
    return token or None
