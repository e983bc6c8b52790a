"""Run a callback once a module has been imported, whether that already happened or not.

The tracker is usually started by two lines at the top of the user's app, and the framework may be
imported after them (``from middleware import MwTracker; tracker = MwTracker()`` and only then
``from flask import Flask``). To instrument the framework without importing it ourselves, we put
a finder at the front of ``sys.meta_path`` that only answers for the module names we wait for.
When one of them is imported it asks the other finders for the real spec, then wraps that spec's
loader so that, right after the module's code has run, our callbacks run with the module. The
finder removes itself from ``sys.meta_path`` when nothing is pending any more, so the steady state
costs nothing.

The loader is wrapped by shadowing ``exec_module`` on the loader *instance* (path-based loaders
are created per module), which keeps ``module.__loader__`` the real loader and ``isinstance``
checks on it intact. Loaders that are classes or module-level singletons are wrapped in a
delegating proxy instead.

The finder and the proxy implement the import protocols (``find_spec`` / ``invalidate_caches``,
``create_module`` / ``exec_module``) without deriving from :mod:`importlib.abc`, whose import
(``importlib.resources``, ``tempfile``, ...) would cost the tracker's start-up a few
milliseconds; the import system only needs the methods.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from middleware.config import exc_text, visible_warning

if TYPE_CHECKING:
    import importlib.abc
    import importlib.machinery

logger = logging.getLogger(__name__)

Callback = Callable[[types.ModuleType], None]

_lock = threading.RLock()
_pending: dict[str, list[Callback]] = {}
_guard = threading.local()


def when_imported(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` is imported; right now if it already is.

    Each registered callback runs at most once. Exceptions from callbacks are logged, never
    raised into the importing code.
    """
    with _lock:
        _pending.setdefault(name, []).append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        module = sys.modules.get(name)
    if module is not None:
        _fire(name, module)


def pending() -> list[str]:
    """Names of the modules still waited for (for tests and debugging)."""
    with _lock:
        return sorted(_pending)


def cancel(name: str) -> None:
    """Forget the callbacks waiting for ``name`` (for tests)."""
    with _lock:
        _pending.pop(name, None)
        _remove_finder_if_idle()


def _remove_finder_if_idle() -> None:
    if not _pending and _FINDER in sys.meta_path:
        try:
            sys.meta_path.remove(_FINDER)
        except ValueError:  # removed concurrently
            pass


def _fire(name: str, module: types.ModuleType) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
        _remove_finder_if_idle()
    for callback in callbacks:
        try:
            callback(module)
        except Exception as exc:  # never break the user's import over instrumentation
            logger.debug("middleware: instrumenting %s failed", name, exc_info=True)
            visible_warning(logger, "middleware: instrumenting %s failed (%s); it runs as it would unprofiled",
                            name, exc_text(exc))


class _PostImportFinder:
    """Meta-path finder that only answers for module names with pending callbacks."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        with _lock:
            if fullname not in _pending:
                return None
        if getattr(_guard, "active", False):
            return None
        _guard.active = True
        try:
            spec = _find_spec_elsewhere(self, fullname, path, target)
        finally:
            _guard.active = False
        if spec is None or spec.loader is None:
            return spec
        _wrap_loader(spec, fullname)
        return spec

    def invalidate_caches(self) -> None:
        return None


def _find_spec_elsewhere(
    me: object,
    fullname: str,
    path: Sequence[str] | None,
    target: types.ModuleType | None,
) -> importlib.machinery.ModuleSpec | None:
    for finder in list(sys.meta_path):
        if finder is me:
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec: importlib.machinery.ModuleSpec | None = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _wrap_loader(spec: importlib.machinery.ModuleSpec, fullname: str) -> None:
    loader = spec.loader
    original = getattr(loader, "exec_module", None)
    if original is None:  # legacy load_module()-only loader: leave it alone
        return

    def exec_module(module: types.ModuleType) -> None:
        try:
            original(module)
        finally:
            if patched_instance:
                try:
                    del loader.__dict__["exec_module"]
                except (KeyError, AttributeError):
                    pass
        _fire(fullname, module)

    patched_instance = not isinstance(loader, (type, types.ModuleType)) and hasattr(
        loader, "__dict__"
    )
    if patched_instance:
        loader.__dict__["exec_module"] = exec_module
    else:
        # The proxy is a Loader by delegation (__getattr__), not by inheritance.
        spec.loader = cast("importlib.abc.Loader", _LoaderProxy(loader, exec_module))


class _LoaderProxy:
    """Delegates everything to ``inner`` except ``exec_module``."""

    def __init__(self, inner: Any, exec_module: Callback) -> None:
        self._inner = inner
        self._exec_module = exec_module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: types.ModuleType) -> None:
        self._exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_FINDER = _PostImportFinder()


def _reinit_lock_in_child() -> None:
    # A fork while another thread held the lock (mid-import) must not deadlock the child's imports.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reinit_lock_in_child)
