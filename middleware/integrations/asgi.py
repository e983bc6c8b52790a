"""ASGI glue: every request's samples carry ``endpoint=<route path template>``.

Starlette (and so FastAPI) are instrumented without touching the app: the ``handle`` method of
their route classes (``Route``, ``WebSocketRoute``, FastAPI's ``APIRoute``) is wrapped so that the
matched route runs -- its endpoint, dependencies, background work awaited in it, and the work it
hands to a thread pool (:mod:`middleware.labels` carries labels into anyio's and asyncio's thread
pools) -- under ``endpoint=<template>``, e.g. ``/items/{item_id}``: one label value per route,
not per URL. A ``Mount`` prefixes the routes below it with its own template (``/api`` +
``/items/{item_id}``). The labels live in a context variable, so requests interleaving on one
event loop each keep their own (asyncio's loop; see :mod:`middleware.labels` for loops whose task
switches cannot be followed, such as uvloop).

Any other ASGI app: wrap it in :class:`MwAsgiMiddleware`, which labels each HTTP and WebSocket
request ``endpoint=<path>`` (the raw path: there is no generic way to know a route template; a
Starlette route below it replaces it with its template).

Any error in here is logged once and swallowed: profiling must never break a request.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from middleware.config import exc_text, visible_warning
from middleware.labels import count_request, pop_labels, push_labels

__all__ = ["MwAsgiMiddleware", "install_starlette", "install_fastapi", "LABEL"]

logger = logging.getLogger(__name__)

#: The label key set on every request.
LABEL = "endpoint"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]

_lock = threading.Lock()
_wrapped: set[type] = set()
_warned = False
#: The templates of the Mounts the current request went through, joined.
_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("middleware_asgi_prefix", default="")


def _warn(exc: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        visible_warning(logger, "middleware: labelling an ASGI request failed (%s); its samples carry no "
                        "endpoint", exc_text(exc))


def _push(endpoint: str) -> contextvars.Token[tuple[tuple[str, str], ...]] | None:
    try:
        token = push_labels({LABEL: endpoint})
        count_request(LABEL, endpoint)
        return token
    except Exception as exc:  # never break the request
        _warn(exc)
        return None


def _pop(token: contextvars.Token[tuple[tuple[str, str], ...]] | None) -> None:
    if token is None:
        return
    try:
        pop_labels(token)
    except Exception as exc:
        _warn(exc)


def _wrap_route_handle(cls: type) -> None:
    """Wraps ``cls.handle`` (if the class defines its own) to run under the route's template."""
    original = cls.__dict__.get("handle")
    if original is None or getattr(original, "_mw_asgi", False):
        return

    async def handle(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        token = _push(_prefix.get() + str(getattr(self, "path", "") or scope.get("path", "")))
        try:
            await original(self, scope, receive, send)
        finally:
            _pop(token)

    handle._mw_asgi = True  # type: ignore[attr-defined]
    handle.__wrapped__ = original  # type: ignore[attr-defined]
    handle.__doc__ = original.__doc__
    cls.handle = handle  # type: ignore[attr-defined]
    _wrapped.add(cls)


def _wrap_mount_handle(cls: type) -> None:
    """Wraps ``Mount.handle``: the routes below run with the mount's template as prefix."""
    original = cls.__dict__.get("handle")
    if original is None or getattr(original, "_mw_asgi", False):
        return

    async def handle(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        token = _prefix.set(_prefix.get() + str(getattr(self, "path", "") or ""))
        try:
            await original(self, scope, receive, send)
        finally:
            _prefix.reset(token)

    handle._mw_asgi = True  # type: ignore[attr-defined]
    handle.__wrapped__ = original  # type: ignore[attr-defined]
    cls.handle = handle  # type: ignore[attr-defined]
    _wrapped.add(cls)


def install_starlette(routing: Any) -> bool:
    """Instrument ``starlette.routing`` (idempotent). False when it does not look like Starlette's."""
    with _lock:
        route, ws_route, mount = (getattr(routing, n, None) for n in ("Route", "WebSocketRoute", "Mount"))
        if not all(isinstance(c, type) and "handle" in c.__dict__ for c in (route, ws_route, mount)):
            logger.debug("middleware: starlette.routing has no Route/WebSocketRoute/Mount.handle; not instrumented")
            return False
        _wrap_route_handle(route)  # type: ignore[arg-type]
        _wrap_route_handle(ws_route)  # type: ignore[arg-type]
        _wrap_mount_handle(mount)  # type: ignore[arg-type]
        return True


def install_fastapi(routing: Any) -> bool:
    """Instrument ``fastapi.routing``'s route classes that override ``handle`` (idempotent)."""
    with _lock:
        found = False
        for name in ("APIRoute", "APIWebSocketRoute"):
            cls = getattr(routing, name, None)
            if isinstance(cls, type):
                _wrap_route_handle(cls)
                found = True
        return found


class MwAsgiMiddleware:
    """Labels every HTTP and WebSocket request of an ASGI app ``endpoint=<path>``.

    ``app = MwAsgiMiddleware(app)``. Other scopes (lifespan) pass through unlabelled. Under a
    Starlette/FastAPI router the matched route's template replaces the path (automatic, see the
    module doc).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = _push(str(scope.get("path", "")))
        try:
            await self.app(scope, receive, send)
        finally:
            _pop(token)
