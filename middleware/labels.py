"""User and framework labels attached to samples (``endpoint``, ``span_id`` ...).

The active labels live in a :class:`contextvars.ContextVar`, so they are right under threads and
asyncio alike. The sampler thread cannot read Python objects, so every change of the active
label set is also pushed down to a native per-thread slot (an interned label-set id): samples
taken while the labels are active carry them.

Under asyncio several tasks share a thread, and a task may be suspended inside a ``labels``
block while another runs. :func:`install_asyncio_hook` (called by the tracker) wraps the event
loop's callback runner (``asyncio.events.Handle._run``) so that every step of every task first
pushes *that task's* label set down to the native slot (only when it differs from what the slot
holds, so the common case costs one context-variable lookup).
"""
from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["labels", "push_labels", "pop_labels", "current_labels", "install_asyncio_hook"]

_current: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "middleware_labels", default=()
)
_ids: dict[tuple[tuple[str, str], ...], int] = {}
_RESERVED = {"thread_name", "pid"}


_native_mod: Any | None = None
_native_tried = False


def _native() -> Any | None:
    """The extension module, imported once (None when it is not built: labels stay pure context)."""
    global _native_mod, _native_tried
    if not _native_tried:
        try:
            from middleware import _native as n
        except ImportError:
            n = None
        _native_mod, _native_tried = n, True
    return _native_mod


def _labelset_id(pairs: tuple[tuple[str, str], ...]) -> int:
    if not pairs:
        return 0
    lid = _ids.get(pairs)
    if lid is None:
        n = _native()
        lid = int(n.labelset(pairs)) if n is not None else 0
        if lid == 0 and n is not None:
            logger.debug("middleware: label registry full; samples of %r carry no labels", pairs)
        _ids[pairs] = lid
    return lid


_applied = threading.local()  # the label set last pushed to this thread's native slot


def _apply(pairs: tuple[tuple[str, str], ...]) -> None:
    if getattr(_applied, "pairs", None) == pairs:
        return  # the native slot already holds this set
    n = _native()
    if n is not None:
        n.set_thread_labelset(threading.get_native_id(), _labelset_id(pairs))
    _applied.pairs = pairs


def install_asyncio_hook() -> bool:
    """Makes each asyncio callback (task step) run with its own context's labels. Idempotent."""
    try:
        from asyncio import events
    except ImportError:  # pragma: no cover - asyncio is in the stdlib
        return False
    handle = events.Handle
    if getattr(handle._run, "_mw_wrapped", False):
        return True
    original = handle._run

    def _run(self: Any) -> None:
        ctx = getattr(self, "_context", None)
        if ctx is not None:
            pairs = ctx.get(_current, ())
            if getattr(_applied, "pairs", ()) != pairs:
                _apply(pairs)
        original(self)

    _run._mw_wrapped = True  # type: ignore[attr-defined]
    handle._run = _run  # type: ignore[method-assign]
    return True


def current_labels() -> dict[str, str]:
    """The labels active in the current context."""
    return dict(_current.get())


_merge_cache: dict[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, object], ...]], tuple[tuple[str, str], ...]] = {}
_MERGE_CACHE_MAX = 4096


def _merged(current: tuple[tuple[str, str], ...], mapping: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
    merged = dict(current)
    for k, v in mapping.items():
        if k in _RESERVED:
            logger.warning("middleware: label %r is reserved and ignored", k)
            continue
        merged[str(k)] = str(v)
    return tuple(sorted(merged.items()))


def push_labels(mapping: Mapping[str, object]) -> contextvars.Token[tuple[tuple[str, str], ...]]:
    """Adds labels (merged over the active ones) and returns a token for :func:`pop_labels`."""
    current = _current.get()
    try:
        key = (current, tuple(mapping.items()))
        pairs = _merge_cache.get(key)
    except TypeError:  # unhashable label value: merge without the cache
        key, pairs = None, None
    if pairs is None:
        pairs = _merged(current, mapping)
        if key is not None and len(_merge_cache) < _MERGE_CACHE_MAX:
            _merge_cache[key] = pairs
    token = _current.set(pairs)
    _apply(pairs)
    return token


def pop_labels(token: contextvars.Token[tuple[tuple[str, str], ...]]) -> None:
    """Restores the labels that were active before the matching :func:`push_labels`."""
    try:
        _current.reset(token)
    except ValueError:  # token from another context (e.g. a different asyncio task)
        logger.debug("middleware: labels token used in another context")
    _apply(_current.get())


@contextmanager
def labels(**kv: object) -> Iterator[None]:
    """``with labels(endpoint="/x"): ...`` — samples taken inside carry these labels."""
    token = push_labels(kv)
    try:
        yield
    finally:
        pop_labels(token)
