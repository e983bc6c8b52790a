"""Framework glue: label every request's samples with its endpoint, with no code in the app.

:func:`install_all` is called by :class:`middleware.MwTracker` when it starts. It is cheap and
idempotent, and it never imports a framework the application has not imported: for each
supported framework it registers a post-import hook (:mod:`._post_import`) that instruments the
framework as soon as the application imports it, or right away if it already has.

Supported:

- Flask: every request is labelled ``endpoint=<url rule>``, e.g. ``/calculate2/<int:number>``
  (:mod:`middleware.integrations.flask`).
- Any WSGI app: wrap it in :class:`middleware.integrations.wsgi.MwWsgiMiddleware`, which labels
  ``endpoint=<PATH_INFO>`` (explicit, since there is no generic way to find a WSGI app).
- Starlette and FastAPI: every request is labelled ``endpoint=<route path template>``, e.g.
  ``/items/{item_id}`` (:mod:`middleware.integrations.asgi`); any other ASGI app: wrap it in
  :class:`middleware.integrations.asgi.MwAsgiMiddleware` (``endpoint=<path>``).
- OpenTelemetry: samples taken while a span is current carry ``span_id``/``span_name`` of the
  request's local root span, which gets ``pyroscope.profile.id`` (:mod:`middleware.integrations.otel`).
"""

from __future__ import annotations

import logging
import threading
import types
from typing import Any

from ._post_import import when_imported

__all__ = ["install_all", "installed", "MwWsgiMiddleware", "MwAsgiMiddleware"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_requested = False
_installed: set[str] = set()


def install_all(tracker: object | None = None) -> None:
    """Instrument every supported framework, now or when the app imports it.

    ``tracker`` is the :class:`~middleware.MwTracker` that asked: its ``config.span_links``
    (``MW_PROFILING_SPAN_LINKS``) says whether OpenTelemetry spans label samples (the labels go
    through :mod:`middleware.labels`, which is process-wide). Safe to call any number of times
    from any thread.
    """
    global _requested
    with _lock:
        if _requested:
            return
        _requested = True
    when_imported("flask", _install_flask)
    when_imported("starlette.routing", _install_starlette)
    when_imported("fastapi.routing", _install_fastapi)
    if getattr(getattr(tracker, "config", None), "span_links", True):
        when_imported("opentelemetry.context", _install_otel)


def installed() -> frozenset[str]:
    """Names of the frameworks instrumented so far, e.g. ``frozenset({"flask"})``."""
    with _lock:
        return frozenset(_installed)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing this package (which the tracker does at start) stays cheap.
    if name == "MwWsgiMiddleware":
        from .wsgi import MwWsgiMiddleware

        return MwWsgiMiddleware
    if name == "MwAsgiMiddleware":
        from .asgi import MwAsgiMiddleware

        return MwAsgiMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mark_installed(name: str, message: str) -> None:
    """Record ``name`` in :func:`installed` and log ``message`` (what its requests now carry)."""
    with _lock:
        _installed.add(name)
    logger.debug(message)


def _install_flask(module: types.ModuleType) -> None:
    from . import flask as mw_flask

    if mw_flask.install():
        _mark_installed("flask", "middleware: Flask requests are labelled with their endpoint")


def _install_starlette(module: types.ModuleType) -> None:
    from . import asgi

    if asgi.install_starlette(module):
        _mark_installed("starlette", "middleware: Starlette requests are labelled with their route template")


def _install_fastapi(module: types.ModuleType) -> None:
    from . import asgi

    if asgi.install_fastapi(module):
        _mark_installed("fastapi", "middleware: FastAPI requests are labelled with their route template")


def _install_otel(module: types.ModuleType) -> None:
    from . import otel

    if otel.install(module):
        _mark_installed("opentelemetry", "middleware: samples of traced requests carry their root span's id")
