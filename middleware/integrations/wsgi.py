"""WSGI middleware that labels each request's samples with ``endpoint=<PATH_INFO>``.

For WSGI apps without a framework integration::

    from middleware.integrations.wsgi import MwWsgiMiddleware
    app = MwWsgiMiddleware(app)

The label is active while the app is called and while each chunk of the response body is
produced (a generator body runs after the app has returned), and it is removed in between, so a
server that interleaves requests on one thread does not mix them up.

``PATH_INFO`` has one value per URL, so for apps with parameters in the path pass
``endpoint=`` a function that maps the environ to a route name (bounded label cardinality keeps
profiles small and backends happy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from middleware.labels import count_request, pop_labels, push_labels

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
else:
    StartResponse = WSGIApplication = WSGIEnvironment = Any

__all__ = ["MwWsgiMiddleware"]

logger = logging.getLogger(__name__)


def _path_info(environ: WSGIEnvironment) -> str:
    return str(environ.get("PATH_INFO") or "/")


class MwWsgiMiddleware:
    """Wrap a WSGI app so its samples carry ``label=endpoint(environ)``."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        label: str = "endpoint",
        endpoint: Callable[[WSGIEnvironment], str] = _path_info,
    ) -> None:
        self.app = app
        self.label = label
        self.endpoint = endpoint

    def _labels(self, environ: WSGIEnvironment) -> dict[str, str]:
        try:
            return {self.label: self.endpoint(environ)}
        except Exception:
            logger.debug("middleware: endpoint() failed; request not labelled", exc_info=True)
            return {}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        labels = self._labels(environ)
        if not labels:
            return self.app(environ, start_response)
        token = push_labels(labels)
        count_request(self.label, labels[self.label])
        try:
            body = self.app(environ, start_response)
        finally:
            pop_labels(token)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(body, list) or (
            isinstance(file_wrapper, type) and isinstance(body, file_wrapper)
        ):
            # Nothing of the app runs while a list or a file (sendfile) is sent; keep the
            # server's fast paths.
            return body
        return _LabelledBody(body, labels)


class _LabelledBody:
    """A response body whose iteration and close() run under the request's labels."""

    def __init__(self, body: Iterable[bytes], labels: dict[str, str]) -> None:
        self._body = body
        self._labels = labels

    def __iter__(self) -> Iterator[bytes]:
        iterator = iter(self._body)
        while True:
            token = push_labels(self._labels)
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                pop_labels(token)
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is None:
            return
        token = push_labels(self._labels)
        try:
            close()
        finally:
            pop_labels(token)
