"""OpenTelemetry: samples taken while a span is active carry its request's span.

When the app uses ``opentelemetry-api`` (we never import it ourselves: a post-import hook waits
for the app to), every sample taken while a span is current — CPU and wall alike, in threads and
in asyncio tasks — carries the labels ``span_id`` (the *local root* span of the request: 16
lowercase hex digits) and ``span_name`` (that span's name), and the root span gets the attribute
``pyroscope.profile.id`` (its span id), so that a tracing UI can go from the trace to the profile
of exactly that request (Grafana's span profiles follow the same convention). In threads the
attribute is set when the span stops being current, and only when a sample carried its labels:
a request too short to be sampled gets no link to an empty profile (and costs no attribute). In
threads running an event loop it is set when the span becomes current: ASGI instrumentation ends
its server span before it stops being current, when no attribute can be set any more. Each
profile also records the trace of each span id it holds (``mw:spans`` comments), so a trace id
finds its spans' samples too.

Why the local root and not the innermost span: a request's samples then share one id, the one a
trace view starts from, and the label changes once per request instead of at every child span
(each change costs a label-set switch; child spans in hot loops would make it the dominant cost).
The stack itself shows where in the request the time went.

How: OpenTelemetry makes a span current by ``opentelemetry.context.attach`` and ends that by
``detach`` (``start_as_current_span``, ``use_span`` and every instrumentation go through them).
Both are wrapped: attaching a context whose span is a recording local root (no parent, or a
remote one) pushes the span labels (:func:`middleware.labels.push_span`, so they follow the
context into tasks and thread pools like any label), and detaching that token pops them. Attaching
a child span changes nothing: its root's labels are already active in that context. This runs at
every traced request, so with the extension module the wrappers are C objects
(``csrc/mw_module_otel.c``) that do the common case themselves (a thread with no running event
loop, labels already interned) and call the functions below for the rest.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any

from middleware import labels as mw_labels

logger = logging.getLogger(__name__)

__all__ = ["install", "PROFILE_ID_ATTRIBUTE"]

#: The root span's attribute naming its profile (its span id), as Grafana Pyroscope expects.
PROFILE_ID_ATTRIBUTE = "pyroscope.profile.id"

# id(OpenTelemetry's token) -> (that token, what _push_root returned), for the Python hooks (no
# extension module). A context attached and never detached (an app bug) would leave its entry:
# bounded.
_pushed: dict[int, tuple[Any, Any]] = {}
_PUSHED_MAX = 65536
_span_key: Any = None


def _span_key_now() -> Any:
    """OpenTelemetry's context key of the current span, once its trace API is loaded (else None)."""
    global _span_key
    if _span_key is None:
        propagation = sys.modules.get("opentelemetry.trace.propagation")
        if propagation is not None:
            _span_key = propagation._SPAN_KEY
    return _span_key


def _push_root(context: Any) -> tuple[Any, None, None] | None:
    """Pushes the span labels of ``context``'s current span when it is a recording local root span
    and sets its ``pyroscope.profile.id``; returns (the labels token, None, None: nothing left to
    link), else None. The general path: the native hooks take it when their fast path does not
    apply (same rules)."""
    key = _span_key_now()
    if key is None:
        return None
    span: Any = context.get(key) if context is not None else None
    if span is None:
        return None
    sc = span.get_span_context()
    current = mw_labels.current_span()
    if current is not None and current.span_int == sc.span_id:
        return None  # the same span made current again (an instrumentation's nested use_span)
    parent: Any = getattr(span, "parent", False)  # SDK spans have it (None for a root)
    if parent is False or (parent is not None and not parent.is_remote) or not span.is_recording() \
            or not sc.is_valid:
        return None  # not a span of the SDK's, a child span (its root's labels hold), not sampled
    span_hex = format(sc.span_id, "016x")
    token = mw_labels.push_span(mw_labels.SpanId(span_hex, format(sc.trace_id, "032x"), sc.span_id),
                                str(getattr(span, "name", "")))
    try:
        span.set_attribute(PROFILE_ID_ATTRIBUTE, span_hex)
    except Exception:  # a span implementation that refuses attributes: the labels still hold
        logger.debug("middleware: could not set %s", PROFILE_ID_ATTRIBUTE, exc_info=True)
    return token, None, None


def install(context_module: Any) -> bool:
    """Wraps ``context_module.attach``/``detach`` (``opentelemetry.context``). Idempotent."""
    attach, detach = context_module.attach, context_module.detach
    if getattr(attach, "_mw_wrapped", False):
        return True
    n = mw_labels._native()
    if n is not None:  # the per-request path in C (csrc/mw_module_otel.c), same rules
        context_module.attach, context_module.detach = n.otel_hooks(
            attach, detach, slow_push=_push_root, pop_labels=mw_labels.pop_labels,
            apply=mw_labels._apply, current=mw_labels._current, ids=mw_labels._ids,
            applied=mw_labels._applied, span_id_type=mw_labels.SpanId,
            labels_globals=vars(mw_labels), span_key=_span_key_now, attribute=PROFILE_ID_ATTRIBUTE)
        return True

    @functools.wraps(attach)
    def mw_attach(context: Any) -> Any:
        token = attach(context)
        try:
            ours = _push_root(context)
            if ours is not None:
                if len(_pushed) >= _PUSHED_MAX:
                    _pushed.pop(next(iter(_pushed)), None)
                _pushed[id(token)] = (token, ours)
        except Exception:  # profiling must never break the app's tracing
            logger.debug("middleware: span labels not pushed", exc_info=True)
        return token

    @functools.wraps(detach)
    def mw_detach(token: Any) -> None:
        entry = _pushed.pop(id(token), None)
        try:
            detach(token)
        finally:
            if entry is not None and entry[0] is token:
                mw_labels.pop_labels(entry[1][0])

    mw_attach._mw_wrapped = True  # type: ignore[attr-defined]
    context_module.attach = mw_attach
    context_module.detach = mw_detach
    return True
