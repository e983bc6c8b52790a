"""Flask glue: every request's samples carry ``endpoint=<url rule>``.

Connected to Flask's ``request_started`` and ``request_tearing_down`` signals for every sender, so
every Flask app in the process is covered without touching the app. ``request_started`` is sent
after URL matching, just before the ``before_request`` functions; ``request_tearing_down`` after
the teardown functions, before the request context is popped. Everything in between, the view,
error handlers and teardown functions included, is labelled with the matched rule
(``/calculate2/<int:number>``, not the concrete path, so the label has one value per route).
Requests that match no rule get :data:`UNMATCHED`.

The label token lives in the request's WSGI environ, so nested requests (a test client inside a
view) each pop their own label. Any error in here is logged and swallowed: profiling must never
break a request.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from middleware.labels import count_request, pop_labels, push_labels

__all__ = ["install", "uninstall", "is_installed", "LABEL", "UNMATCHED"]

logger = logging.getLogger(__name__)

#: The label key set on every request.
LABEL = "endpoint"
#: The label value for requests that match no URL rule (404s, 405s from routing).
UNMATCHED = "<unmatched>"
_TOKEN_KEY = "middleware.flask.labels_token"

_lock = threading.Lock()
_connected = False
_request: Any = None  # flask.request, bound at install (saves an import per request)


def install() -> bool:
    """Connect the signal receivers (idempotent). Returns False if Flask has no signals."""
    global _connected, _request
    with _lock:
        if _connected:
            return True
        try:
            from flask import request, signals
        except ImportError:
            logger.debug("middleware: flask.signals not importable; Flask not instrumented")
            return False
        _request = request
        # weak=False: blinker holds receivers weakly by default.
        signals.request_started.connect(_on_request_started, weak=False)
        signals.request_tearing_down.connect(_on_request_tearing_down, weak=False)
        _connected = True
        return True


def uninstall() -> None:
    """Disconnect the receivers (for tests); requests in flight still pop their labels."""
    global _connected
    with _lock:
        if not _connected:
            return
        from flask import signals

        signals.request_started.disconnect(_on_request_started)
        signals.request_tearing_down.disconnect(_on_request_tearing_down)
        _connected = False


def is_installed() -> bool:
    """Whether the receivers are connected."""
    return _connected


# The receivers run twice per request: one proxy lookup each, then plain attribute access.
def _on_request_started(sender: Any, **extra: Any) -> None:
    try:
        request = _request._get_current_object()
        environ = request.environ
        if _TOKEN_KEY in environ:  # already labelled (signal sent twice for one request)
            return
        rule = request.url_rule
        endpoint = rule.rule if rule is not None else UNMATCHED
        environ[_TOKEN_KEY] = push_labels({LABEL: endpoint})
        count_request(LABEL, endpoint)
    except Exception:
        logger.debug("middleware: could not label a Flask request", exc_info=True)


def _on_request_tearing_down(sender: Any, **extra: Any) -> None:
    try:
        token = _request._get_current_object().environ.pop(_TOKEN_KEY, None)
        if token is not None:
            pop_labels(token)
    except Exception:
        logger.debug("middleware: could not restore labels after a Flask request", exc_info=True)
