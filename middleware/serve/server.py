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

A *selection* is ``service``, ``type``, ``from``, ``until`` (unix seconds) and ``selector``
(``{label="value",...}``); see :mod:`middleware.serve.query`.

Security: with a token configured (``--token`` / ``MW_SERVE_TOKEN``; mandatory when listening on
a non-loopback address), every route but ``/healthz`` needs it, as ``Authorization: Bearer
<token>`` or as the password of HTTP basic auth (any user name) — which is what a browser
prompts for, so the page keeps working. Tokens are compared in constant time.
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
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from middleware.serve.importer import Importer
from middleware.serve.ingest import IngestError, IngestLimits, Upload, decode_push, decode_upload
from middleware.serve.query import QueryEngine, QueryError, parse_selection
from middleware.serve.store import Store, StoreClosed

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "ServeApp", "ConfigError", "is_loopback", "TOKEN_ENV"]

TOKEN_ENV = "MW_SERVE_TOKEN"
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


class ConfigError(ValueError):
    """The server cannot start with this configuration (message says why)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 4040
    data_dir: str = "mw-serve-data"
    token: str | None = None
    import_dirs: list[str] = field(default_factory=list)
    import_interval: float = 10.0
    limits: IngestLimits = field(default_factory=IngestLimits)
    request_timeout: float = 30.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) only listens on the loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: ServeConfig) -> None:
    """Refuse configurations that would expose profiles or crash later (raises ConfigError)."""
    if not is_loopback(config.host) and not config.token:
        raise ConfigError(
            f"refusing to listen on {config.host!r} without a token: anything but loopback needs "
            f"--token or {TOKEN_ENV} (uploads and the page then need it)"
        )
    if config.token is not None and len(config.token) < 8:
        raise ConfigError("the token must be at least 8 characters long")
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"bad port {config.port}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True
    app: "ServeApp"

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
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise IngestError(HTTPStatus.BAD_REQUEST, f"incomplete body: got {len(data)} of {length} bytes")
        return data

    def _drain(self, length: int) -> None:
        self.close_connection = True
        if length > _DRAIN_LIMIT:
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)

    def _read_chunked(self, limit: int) -> bytes:
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
        if push:
            # An empty push.v1.PushResponse, in the encoding of the request.
            if (self.headers.get("Content-Type") or "").lower().startswith("application/json"):
                self._send(HTTPStatus.OK, b"{}", "application/json")
            else:
                self._send(HTTPStatus.OK, b"", "application/proto")
        else:
            self._json(HTTPStatus.OK, {"id": ids[0]})

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

    def api_services(self, params: dict[str, str]) -> None:
        self._json(HTTPStatus.OK, {"services": self.server.app.engine.services()})

    def api_profile_types(self, params: dict[str, str]) -> None:
        service = _need(params, "service")
        self._json(HTTPStatus.OK, {"service": service, "types": self.server.app.engine.profile_types(service)})

    def _range(self, params: dict[str, str]) -> tuple[int | None, int | None]:
        from middleware.serve.query import parse_seconds

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
        step: float | None = None
        if params.get("step"):
            try:
                step = float(params["step"])
            except ValueError:
                raise QueryError(f"bad 'step' {params['step']!r}: expected seconds") from None
            if not step > 0:
                raise QueryError("bad 'step': must be positive")
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
}


class ServeApp:
    """The collector: store + importer + HTTP server. Use :meth:`start`/:meth:`stop` (tests) or
    :meth:`serve_forever` (the command)."""

    def __init__(self, config: ServeConfig) -> None:
        check_config(config)
        self.config = config
        self.store = Store(config.data_dir)
        self.engine = QueryEngine(self.store)
        self.importer = Importer(self.store, config.import_dirs, limits=config.limits, interval=config.import_interval)
        self.accepted = 0
        self.rejected = 0
        server_cls = _Server6 if ":" in config.host else _Server
        try:
            self.httpd = server_cls((config.host.strip("[]"), config.port), _Handler)
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
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

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
