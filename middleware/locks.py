"""Lock-wait profiles: ``threading``'s locks replaced by profiled ones while profiling runs.

:func:`install` makes ``threading.Lock``, ``threading.RLock`` and the locks ``threading`` builds
on (``Condition``, ``Semaphore``, ``Event``, ``Barrier``; and so ``queue.Queue`` and
``concurrent.futures``) the native :class:`ProfiledLock` / :class:`ProfiledRLock`, which
behave as the stock ones and report each wait (an acquire that could not take the lock at
once) to the block profile: the waiting thread's stack, the time waited and the lock's creation
site (label ``lock=<file>:<line>``). Each window's waits are written and uploaded next to the
CPU profile as ``block:contentions:count`` and ``block:delay:nanoseconds``.

``asyncio.Lock`` and ``asyncio.Semaphore`` (so ``BoundedSemaphore`` and ``Condition``, which use
them) keep their type: their ``acquire`` is wrapped once the app imports ``asyncio.locks``; when
the lock cannot be taken at once, the time until it is taken (or the wait is cancelled) is
recorded with the stack at that moment (the waiting task's await chain, under the event loop's
frames) and ``lock=<file>:<line>`` where the lock was made (outside asyncio). An acquire that
does not wait costs one coroutine call more.

Covered: locks made through ``threading`` and ``asyncio`` after :func:`install` (at
``MwTracker()``). Not covered: ``threading``'s locks once gevent (or eventlet) has patched it
(they are cooperative locks, left as they are: said once on stderr), locks made before it (a
module-level ``threading.Lock()`` of a module imported earlier), locks made through
``_thread.allocate_lock`` directly, C-level locks (``queue.SimpleQueue``, the import lock, the
GIL itself) and ``multiprocessing`` locks.
:func:`uninstall` puts the stock types and methods back for new locks; profiled locks already
made keep working and stop reporting.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["install", "uninstall", "installed"]

# threading's attributes that make locks, and what they were before install().
_PATCHED = ("Lock", "_allocate_lock", "_CRLock")
_saved: dict[str, Any] = {}
# asyncio's lock classes wrapped, with their own __init__ and acquire.
_saved_asyncio: dict[type, tuple[Callable[..., Any], Callable[..., Any]]] = {}
_asyncio_hooked = False  # the post-import callback for asyncio.locks is registered (it runs once)

# Standard-library files whose frames do not name a lock's creation site: a Condition's waiter
# lock is named after the code that waits, a Queue's mutex after the code that made the Queue.
_STDLIB_SYNC_FILES = (
    "threading.py",
    "queue.py",
    os.path.join("concurrent", "futures", "_base.py"),
    os.path.join("concurrent", "futures", "thread.py"),
    os.path.join("concurrent", "futures", "process.py"),
)


def _skip_files() -> list[str]:
    stdlib = os.path.dirname(threading.__file__ or "")
    return [os.path.join(stdlib, name) for name in _STDLIB_SYNC_FILES]


def _wrap_asyncio_locks(module: Any, native: Any) -> None:
    """Once ``asyncio.locks`` is imported (by the app: the tracker never imports asyncio)."""
    if not _saved:
        return  # uninstalled meanwhile
    for cls in (module.Lock, module.Semaphore):
        if cls not in _saved_asyncio:
            _wrap_asyncio(cls, native, {module.__file__})


def _wrap_asyncio(cls: type, native: Any, own_files: set[str]) -> None:
    orig_init: Callable[..., None] = cls.__init__  # type: ignore[misc]
    orig_acquire: Callable[..., Any] = cls.acquire  # type: ignore[attr-defined]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        try:
            f = sys._getframe(1)
        except ValueError:  # made from C, no Python caller
            return
        while f.f_back is not None and f.f_code.co_filename in own_files:
            f = f.f_back
        self._mw_site = (f.f_code.co_filename, f.f_lineno or 0)

    async def acquire(self: Any) -> Any:
        if not self.locked():
            return await orig_acquire(self)
        t0 = time.monotonic_ns()
        try:
            return await orig_acquire(self)
        finally:
            file, line = getattr(self, "_mw_site", ("unknown", 0))
            native.lock_waited(time.monotonic_ns() - t0, file, line, 1)  # 1: this wrapper's frame

    __init__.__wrapped__ = orig_init  # type: ignore[attr-defined]
    acquire.__wrapped__ = orig_acquire  # type: ignore[attr-defined]
    _saved_asyncio[cls] = (orig_init, orig_acquire)
    cls.__init__ = __init__  # type: ignore[misc]
    cls.acquire = acquire  # type: ignore[attr-defined]



def installed() -> bool:
    """Whether ``threading`` makes profiled locks now."""
    return bool(_saved)


def _foreign_locks() -> str | None:
    """The module whose locks ``threading`` makes, when they are not the interpreter's own: gevent
    (``monkey.patch_all()``) and eventlet put cooperative locks there, and an OS lock in their
    place blocks the whole thread — every greenlet, the hub included — when a greenlet waits for
    a lock another one holds across a switch (a hang). None for the interpreter's own."""
    try:
        module = type(threading._allocate_lock()).__module__  # type: ignore[attr-defined]
    except Exception:
        return "unknown"
    return None if module == "_thread" else module


def install(native: Any, rate_ns: int) -> None:
    """Records lock waits (sampled by ``rate_ns``, see ``MW_PROFILING_LOCK_RATE``) and makes
    ``threading`` create profiled locks, unless its locks are another library's (gevent's after
    its monkey-patching: they stay as they are). Idempotent; call with the GIL (any thread)."""
    native.locks_enable(int(rate_ns), _skip_files())
    if _saved:
        return
    foreign = _foreign_locks()
    if foreign is not None:
        from middleware.config import visible_warning

        visible_warning(
            logger, "middleware: threading's locks are %s's (monkey-patched): they are left as they are and "
            "their waits are not in the lock-wait profile", foreign.split(".")[0])
        return
    for name in _PATCHED:
        _saved[name] = getattr(threading, name, None)
    threading.Lock = native.ProfiledLock
    threading._allocate_lock = native.ProfiledLock  # type: ignore[attr-defined]
    threading._CRLock = native.ProfiledRLock  # type: ignore[attr-defined]
    global _asyncio_hooked
    if not _asyncio_hooked:
        from middleware.integrations._post_import import when_imported

        _asyncio_hooked = True
        when_imported("asyncio.locks", lambda module: _wrap_asyncio_locks(module, native))
    elif "asyncio.locks" in sys.modules:
        _wrap_asyncio_locks(sys.modules["asyncio.locks"], native)
    logger.debug("middleware: threading's locks are profiled (rate %d ns)", rate_ns)


def uninstall(native: Any) -> None:
    """Stops recording and restores ``threading``'s own lock types for new locks."""
    native.locks_disable()
    if not _saved:
        return
    for name, value in _saved.items():
        if getattr(threading, name, None) in (native.ProfiledLock, native.ProfiledRLock):
            setattr(threading, name, value)
    _saved.clear()
    for cls, (orig_init, orig_acquire) in _saved_asyncio.items():
        cls.__init__ = orig_init  # type: ignore[misc]
        cls.acquire = orig_acquire  # type: ignore[attr-defined]
    _saved_asyncio.clear()
