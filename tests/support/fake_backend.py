"""A recording, switchable stand-in for a Pyroscope-compatible backend (loopback only).

GIVEN a ``FakeBackend`` (a context manager), tests point the uploader at ``backend.url`` and
switch how it answers at any time:

* ``healthy()``                 200 "ok" to every upload
* ``status(code, retry_after)`` that status (e.g. 500, 401, 429 with ``Retry-After``)
* ``hang()``                    read the request, then never answer (until switched away)
* ``refuse()``                  close the listening socket and every open connection, so new
                                connections are refused; any other mode re-opens the same port
* ``garbage()``                 answer with bytes that are not HTTP, then close
* ``script(*responses)``        one-shot answers served before the current mode

The key -> tenant exchange is served on ``/auth`` (``backend.auth_url``), configured with
``auth(status, body)`` or ``auth_script(...)``. Every request is recorded (``requests``,
``ingests()``, ``auths()``) with its arrival time, so tests can check paths, query parameters,
headers, bodies and delays. ``FakeBackend(tls=(certfile, keyfile))`` serves https instead.
"""
from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FakeBackend", "Recorded", "Response", "AUTH_OK_BODY"]

AUTH_OK_BODY = b'{"success": true, "data": {"project_uid": "tenant42"}}'
GARBAGE = b"\x00\x17\xff not an HTTP response \x01\x02\r\n\r\n\x00\x00"
HANG_LIMIT_S = 30.0  # a hung handler gives up after this, so no test can wedge the process


@dataclass(frozen=True)
class Response:
    """One answer: kind is "status", "hang" or "garbage"."""

    kind: str = "status"
    status: int = 200
    body: bytes = b"ok"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Recorded:
    """One request as the backend saw it."""

    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    raw_query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    t: float  # time.monotonic() when the body had been read
    answered: str = ""  # "200", "500", "hang", "garbage", ...

    def q(self, name: str) -> str | None:
        """The single value of query parameter ``name`` (None if absent)."""
        v = self.query.get(name)
        return v[0] if v else None


@dataclass
class _State:
    mode: Response = field(default_factory=Response)
    script: list[Response] = field(default_factory=list)
    auth: Response = field(default_factory=lambda: Response(body=AUTH_OK_BODY))
    auth_script: list[Response] = field(default_factory=list)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: FakeBackend


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.backend._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.backend._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._answer(Response(status=404, body=b"no"), None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urllib.parse.urlsplit(self.path)
        rec = Recorded(
            method="POST",
            path=parts.path,
            query=urllib.parse.parse_qs(parts.query, keep_blank_values=True),
            raw_query=parts.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            t=time.monotonic(),
        )
        resp = self.server.backend._choose(parts.path)
        self.server.backend._record(rec)
        self._answer(resp, rec)

    def _answer(self, resp: Response, rec: Recorded | None) -> None:
        backend = self.server.backend
        if resp.kind == "hang":
            if rec:
                rec.answered = "hang"
            backend._release.wait(HANG_LIMIT_S)
            self.close_connection = True
            return
        if resp.kind == "garbage":
            if rec:
                rec.answered = "garbage"
            self.wfile.write(GARBAGE)
            self.wfile.flush()
            self.close_connection = True
            return
        if rec:
            rec.answered = str(resp.status)
        self.send_response(resp.status)
        for k, v in resp.headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        self.wfile.write(resp.body)


class FakeBackend:
    """A recording HTTP server on 127.0.0.1 whose behaviour tests can switch."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._state = _State()
        self._release = threading.Event()
        self._conns: set[socket.socket] = set()
        self.requests: list[Recorded] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._listen()

    # ---------------------------------------------------------------- life
    def _listen(self) -> None:
        srv = _Server(("127.0.0.1", self.port), _Handler)
        srv.backend = self
        if self._tls is not None:  # the handshake runs in accept(); a client that refuses it is dropped
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self._tls)
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self.port = srv.server_address[1]
        self._server = srv
        self._thread = threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-backend", daemon=True
        )
        self._thread.start()

    def _unlisten(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # keep-alive connections would otherwise still be served
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._release.set()
        self._unlisten()

    def __enter__(self) -> FakeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/auth"

    # ---------------------------------------------------------------- modes
    def _set(self, mode: Response) -> None:
        if self._server is None:
            self._listen()
        with self._lock:
            self._state.mode = mode
        if mode.kind != "hang":
            self._release.set()  # let hung handlers go
        else:
            self._release.clear()

    def healthy(self) -> None:
        self._set(Response())

    def status(self, code: int, retry_after: str | int | None = None, body: bytes = b"error") -> None:
        headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
        self._set(Response(status=code, body=body, headers=headers))

    def hang(self) -> None:
        self._set(Response(kind="hang"))

    def garbage(self) -> None:
        self._set(Response(kind="garbage"))

    def refuse(self) -> None:
        self._release.set()
        self._unlisten()

    def script(self, *responses: Response) -> None:
        with self._lock:
            self._state.script.extend(responses)

    def auth(self, status: int = 200, body: bytes = AUTH_OK_BODY) -> None:
        with self._lock:
            self._state.auth = Response(status=status, body=body)

    def auth_script(self, *responses: Response) -> None:
        with self._lock:
            self._state.auth_script.extend(responses)

    # ---------------------------------------------------------------- records
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _choose(self, path: str) -> Response:
        with self._lock:
            st = self._state
            if path == "/auth":
                return st.auth_script.pop(0) if st.auth_script else st.auth
            return st.script.pop(0) if st.script else st.mode

    def _record(self, rec: Recorded) -> None:
        with self._cv:
            self.requests.append(rec)
            self._cv.notify_all()

    def ingests(self) -> list[Recorded]:
        """Upload requests (everything but /auth), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path != "/auth"]

    def auths(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == "/auth"]

    def wait_for(self, pred: Callable[[FakeBackend], bool], timeout: float = 5.0) -> bool:
        """Waits until pred(self) is true (re-checked on every request and every 50 ms)."""
        end = time.monotonic() + timeout
        while True:
            if pred(self):
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            with self._cv:
                self._cv.wait(min(left, 0.05))

    def wait_ingests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        self.wait_for(lambda b: len(b.ingests()) >= n, timeout)
        return self.ingests()
