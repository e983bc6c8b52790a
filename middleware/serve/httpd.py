"""The HTTP plumbing of ``python -m middleware serve``: connections, authentication, bodies.

Built on the standard library's :class:`http.server.ThreadingHTTPServer` (one thread per
connection, HTTP/1.1 keep-alive so agents reuse their connection). A local collector receives a
few uploads per agent per 10 s and a handful of UI queries; a thread per connection is plenty,
and it keeps ``serve`` free of dependencies. :class:`Server` bounds and times out the
connections, :class:`BaseHandler` answers, authenticates and reads request bodies; what each
route does is :mod:`middleware.serve.routes`, the server's configuration and lifecycle
:mod:`middleware.serve.server`.

Security: with a token configured (``--token`` / ``MW_SERVE_TOKEN``; mandatory when listening on
a non-loopback address), every route but ``/healthz`` needs it, as ``Authorization: Bearer
<token>`` or as the password of HTTP basic auth (any user name) — which is what a browser
prompts for, so the page keeps working. Tokens are compared in constant time.

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
import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from middleware.serve.ingest import IngestError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from middleware.serve.server import ServeApp

log = logging.getLogger(__name__)

__all__ = ["Server", "Server6", "BaseHandler", "WAITING", "BODY", "BUSY"]

# A body beyond the limit is read and thrown away up to this much, so that the client sees our
# 413 instead of a connection reset; anything bigger is cut off.
_DRAIN_LIMIT = 64 * 1024 * 1024
# A body may take request_timeout plus one second per this many bytes.
_MIN_BODY_RATE = 64 * 1024

# Phases of a connection (see _Conn).
WAITING = "waiting"  # for a request line and headers (includes keep-alive idle time)
BODY = "body"  # reading a request body
BUSY = "busy"  # answering (no deadline: the server's own work; writes time out by themselves)


class _Conn:
    """One open connection: its socket, phase and deadline (guarded by the server's lock)."""

    __slots__ = ("sock", "phase", "since", "deadline", "closed")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.phase = WAITING
        self.since = time.monotonic()
        self.deadline = deadline
        self.closed = False


_BUSY_BODY = b"server busy: too many open connections; retry\n"
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class Server(ThreadingHTTPServer):
    """The listening socket and its connections (bounded, each with a deadline; module doc).

    ``app`` (the :class:`middleware.serve.server.ServeApp`) is set right after construction.
    """

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True
    app: ServeApp

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
        victims = [c for c in self._conns.values() if not c.closed and c.phase != BUSY]
        if not victims:
            return False
        victim = min(victims, key=lambda c: (c.phase != WAITING, c.since))
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
                if not conn.closed and conn.phase != BUSY and now >= conn.deadline:
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
        out = {WAITING: 0, BODY: 0, BUSY: 0}
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


class Server6(Server):
    """:class:`Server` on an IPv6 address."""

    address_family = socket.AF_INET6


class BaseHandler(BaseHTTPRequestHandler):
    """One connection's requests: deadlines per phase, answers, authentication, bodies.

    The routes are a subclass's (:class:`middleware.serve.routes.Handler`).
    """

    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "middleware-serve/0.1"

    # -- plumbing ----------------------------------------------------------------------------

    def setup(self) -> None:
        # typeshed declares it a ClassVar; socketserver reads it per instance (self.timeout)
        self.timeout = self.server.app.config.request_timeout  # type: ignore[misc]
        super().setup()

    def handle_one_request(self) -> None:
        # Waiting for the next request line and headers: they must all arrive before the deadline.
        self.server.set_phase(self.request, WAITING, self.server.app.config.request_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if not self.server.set_phase(self.request, BUSY):
            # Shut down while its headers were still arriving: what was read is not a request.
            self.close_connection = True
            return False
        return ok

    def _body_phase(self, length: int) -> None:
        """Reading ``length`` body bytes: allowed request_timeout plus 1 s per 64 KiB."""
        self.server.set_phase(self.request, BODY, self.server.app.config.request_timeout + length / _MIN_BODY_RATE)

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
            self._text(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds the limit of {limit} bytes"
            )
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
            raise IngestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds the limit of {limit} bytes"
            )
        self._body_phase(length)
        try:
            data = self.rfile.read(length)
        finally:
            self.server.set_phase(self.request, BUSY)
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
            self.server.set_phase(self.request, BUSY)

    def _read_chunked(self, limit: int) -> bytes:
        self._body_phase(limit)
        try:
            return self._read_chunked_body(limit)
        finally:
            self.server.set_phase(self.request, BUSY)

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
