"""The routes of ``python -m middleware serve``: ingest, query API, web page.

Routes::

    POST /ingest                     the Pyroscope ingest API (docs/protocol.md)
    POST /push.v1.PusherService/Push the newer push API (application/proto or application/json)
    POST /v1development/profiles     OTLP profiles export (middleware.serve.otlp; docs/protocol.md)
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
    GET  /api/spans                  ?trace_id= (or ?span_id=) the spans of a trace whose samples are
                                     stored: span id, name, service, pid, first/last window, totals
    GET  /api/stats                  uploads accepted/rejected, series overflow, storage (span kept,
                                     size, retention), connections
    GET  /api/regressions            ?service=[&type=] each version against the one before it
                                     (middleware.serve.regressions)

A *selection* is ``service``, ``type``, ``from``, ``until`` (unix seconds) and ``selector``
(``{label="value",...}``), or the samples of one request or trace: ``span_id`` (16 lowercase hex
digits) or ``trace_id`` (32), with which ``service`` may be left out and the range defaults to
all the data (a malformed id is a 400, an unknown one an empty answer); see
:mod:`middleware.serve.query`. Uploads are decoded by
:mod:`middleware.serve.ingest` and stored by :mod:`middleware.serve.store`, whose single writer
thread serialises the SQLite writes with group commit. Connections, authentication and request
bodies are :class:`middleware.serve.httpd.BaseHandler`'s.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from middleware.serve.httpd import BaseHandler
from middleware.serve.ingest import INT64_MAX, IngestError, Upload, decode_push, decode_upload
from middleware.serve.query import QueryError, parse_seconds, parse_selection, parse_step
from middleware.serve.store import StoreClosed

log = logging.getLogger(__name__)

__all__ = ["Handler", "GET_ROUTES", "STATIC_DIR"]

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


class Handler(BaseHandler):
    """Answers the routes above (see the module doc)."""

    # -- dispatch ----------------------------------------------------------------------------

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz" or url.path in GET_ROUTES or url.path == "/" or url.path.startswith("/static/"):
            self.close_connection = True
            self._text(HTTPStatus.METHOD_NOT_ALLOWED, f"{url.path} only answers GET", {"Allow": "GET"})
            return
        if url.path == "/v1development/profiles":  # OTLP profiles export: middleware.serve.otlp
            from middleware.serve.otlp import handle_otlp_export

            return handle_otlp_export(self)
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
        route = GET_ROUTES.get(url.path)
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
        ids = self._store(uploads, "push" if push else "ingest", "an upload", "the profile")
        if ids is None:
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

    def _store(self, uploads: list[Upload], source: str, what: str, noun: str) -> list[int] | None:
        """Stores decoded uploads; on failure answers the client (503 to retry, 507 on a full
        disk, said once) and returns None. ``what``/``noun`` name them in the log and the answer."""
        app = self.server.app
        try:
            return app.store.add_many(uploads, source=source)
        except StoreClosed:
            self.close_connection = True
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down; retry", {"Retry-After": "5"})
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc).lower():  # SQLITE_FULL: "database or disk is full"
                log.exception("storing %s failed", what)
                self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"could not store {noun} ({exc}); retry",
                           {"Retry-After": "1"})
                return None
            app.rejected += len(uploads)
            if not app.disk_full_warned:
                app.disk_full_warned = True
                log.warning("the store's disk is full (%s): uploads are answered 507 until there is room", exc)
            self._text(HTTPStatus.INSUFFICIENT_STORAGE, "the collector's disk is full; retry later",
                       {"Retry-After": "60"})
        except Exception as exc:
            log.exception("storing %s failed", what)
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"could not store {noun} ({exc}); retry", {"Retry-After": "1"})
        return None

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

    def api_regressions(self, params: dict[str, str]) -> None:
        """The regression detector's findings for a service: each version against the one before
        (``type``: a profile type id, default the CPU type when the service has one)."""
        service = _need(params, "service")
        types = self.server.app.store.profile_types(service)
        cpu = [t for t in types if t.startswith("process_cpu:")]
        type_id = params.get("type") or (cpu or types or [""])[0]
        if type_id and type_id not in types:
            raise QueryError(f"service {service!r} has no profile type {type_id!r}")
        if not type_id:
            self._json(HTTPStatus.OK, {"service": service, "type": None, "comparisons": []})
            return
        self._json(HTTPStatus.OK, self.server.app.regressions.snapshot(service, type_id))

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

    def api_spans(self, params: dict[str, str]) -> None:
        engine = self.server.app.engine
        self._json(HTTPStatus.OK, engine.spans(params.get("span_id") or None, params.get("trace_id") or None))

    def api_pprof(self, params: dict[str, str]) -> None:
        from middleware.pprof import encode_pprof

        sel = parse_selection(params)
        merged = self.server.app.engine.merge(sel).profile
        for smp in merged.samples:  # pprof values are int64; a sum over many profiles may not fit
            if smp.values[0] > INT64_MAX:
                smp.values = (INT64_MAX,)
        if sel.spanned:
            filename = f"{sel.service or 'trace'}-{sel.span_id or sel.trace_id}.pb.gz"
        else:
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


GET_ROUTES: dict[str, Callable[[Handler, dict[str, str]], None]] = {
    "/api/services": Handler.api_services,
    "/api/profile_types": Handler.api_profile_types,
    "/api/label_names": Handler.api_label_names,
    "/api/label_values": Handler.api_label_values,
    "/api/timeline": Handler.api_timeline,
    "/api/profile": Handler.api_profile,
    "/api/sandwich": Handler.api_sandwich,
    "/api/diff": Handler.api_diff,
    "/api/pprof": Handler.api_pprof,
    "/api/spans": Handler.api_spans,
    "/api/stats": Handler.api_stats,
    "/api/regressions": Handler.api_regressions,
}
