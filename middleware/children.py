"""Child processes of a profiled process: profiled from their start, flushed before they end.

``multiprocessing`` (and ``concurrent.futures.ProcessPoolExecutor``, built on it) ends its
children in ways that skip ``atexit``, where a process writes its last profile:

- every child started by fork or forkserver leaves through ``os._exit`` once
  ``Process._bootstrap`` returns (after the target, ``util._exit_function`` and the join of its
  threads);
- ``Pool.terminate()`` (also ``with Pool() as pool:``'s exit and the pool's finalizer) ends the
  workers with SIGTERM, whose default action ends a process on the spot.

And spawn and forkserver children start a fresh interpreter (or fork one that never profiled),
so nothing restarts the sampler in them the way ``os.register_at_fork`` does for fork children.

:func:`install` (run once per profiled process, when ``multiprocessing.process`` is imported)
wraps two methods of ``multiprocessing.process.BaseProcess``:

``start`` (in the parent)
    attaches a small object holding the profiler's resolved configuration to the process object.
    Spawn and forkserver pickle the process object to the child; unpickling that object starts
    the tracker there with the parent's settings (store, upload, rate, ...), before the child's
    target (or ``run``) runs. Fork children ignore it: the at-fork hook restarts their profiler.

``_bootstrap`` (in the child)
    after the original returns (target done, finalizers run, non-daemon threads joined), stops
    the profiler, which exports the last window and drains the uploader, bounded by
    :data:`EXIT_FLUSH_TIMEOUT_S`. A pool worker additionally gets a SIGTERM handler, armed only
    while it sends a result, waits for its next task, or exits: it flushes, then re-raises
    SIGTERM with the default action, so the worker still dies by SIGTERM (same exit code). While
    a task runs SIGTERM keeps its default action behind the tracker's native last export
    (``csrc/mw_termflush.h``): a thread of the profiler's exports, then the worker dies of it a
    few milliseconds later, whatever the task is doing (blocked in C code too). A native guard
    sits in front of the idle worker's handler (``csrc/mw_termguard.h``): CPython runs a Python
    handler only in the main thread, between bytecodes, so a SIGTERM taken by another thread, or
    by the main thread just before it blocks on the pool's queue, would leave the worker blocked
    for ever (and ``terminate()``, which joins it); the guard redirects it to the main thread and
    re-sends it until the handler has run. The cost is five ``sigaction`` calls per task (1.65 us
    arming and disarming, 1.25 without the task's last export; a pool task's round trip is ~40 us
    here). The handler is only installed over the default
    disposition, never over the app's own. Why a handler and not a flush each time the worker
    goes idle: ``with Pool() as pool: pool.map(...)`` sends SIGTERM right after the last result,
    so only a flush that SIGTERM itself waits for loses nothing, and it costs no export per task.

A profiler started inside a child's target (not inherited, not given by the parent) registers a
``multiprocessing.util.Finalize`` that flushes at the child's ``util._exit_function``.

What cannot be flushed: a child ended by SIGKILL loses the samples since its last export
(``os._exit`` called by the app flushes first: see tracker.py). A final export that does not
finish in time is counted (``child_exit_flush_failures`` in ``tracker.stats()``), logged,
and reported once on stderr (``MW_PROFILING_QUIET=1`` silences it).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

try:  # the C module behind ``signal``: its calls take ~0.4 us, the enum-converting wrappers ~5 us
    import _signal as _sig  # type: ignore[import-not-found]  # typeshed has no _signal: signal's C half
except ImportError:  # pragma: no cover - every CPython has it
    _sig = signal

if TYPE_CHECKING:
    from middleware.config import ProfilerConfig

logger = logging.getLogger(__name__)

__all__ = ["install", "stats", "EXIT_FLUSH_TIMEOUT_S"]

#: Bound of a child's final export (and upload drain) on its way out, normal exit or SIGTERM.
EXIT_FLUSH_TIMEOUT_S = 5.0

_SIGTERM = int(signal.SIGTERM)
_SIG_DFL = _sig.SIG_DFL

_lock = threading.Lock()
_installed = False
_in_bootstrap = False  # this process is a child running the wrapped BaseProcess._bootstrap
_armed = False  # the SIGTERM handler of an idle pool worker is installed
_counts: dict[str, int] = {}


def _reset_counts() -> None:
    _counts.update(
        children_profiled=0,  # spawn/forkserver children this process handed its profiling to
        child_exit_flushes=0,  # this process, a child, exported its last window on its way out
        child_terminate_flushes=0,  # ... of which on SIGTERM while idle (pool workers)
        child_exit_flush_failures=0,  # ... that did not finish within EXIT_FLUSH_TIMEOUT_S
        child_start_failures=0,  # the parent's profiling could not start in this child
    )


_reset_counts()


def stats() -> dict[str, int]:
    """This process's counters (a forked child starts from zero)."""
    return dict(_counts)


def _after_fork_in_child() -> None:
    global _lock, _in_bootstrap, _armed, _flushing, _terminate_pending
    _lock = threading.Lock()
    _in_bootstrap = _armed = _flushing = _terminate_pending = False
    _reset_counts()
    try:  # a process forked by an idle pool worker does not keep the worker's SIGTERM handler
        if _sig.getsignal(_SIGTERM) is _on_sigterm:
            _sig.signal(_SIGTERM, _SIG_DFL)
    except (ValueError, OSError):
        pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn(msg: str, *args: object) -> None:
    """A loss the user must see: logged, and on stderr once unless the app's logging shows our
    records or ``MW_PROFILING_QUIET`` is set (:func:`middleware.config.visible_warning`)."""
    from middleware.config import visible_warning

    visible_warning(logger, msg, *args)


# -- installation -------------------------------------------------------------------------------------
def install() -> None:
    """Wraps ``BaseProcess.start`` and ``BaseProcess._bootstrap`` (once; fork children inherit
    the wrapped class). Imports ``multiprocessing.process`` only if the app has (the tracker
    calls this from a post-import hook)."""
    global _installed
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is None:
        return
    with _lock:
        if _installed:
            return
        _installed = True
        base = mp_process.BaseProcess
        if not getattr(base.start, "_mw_wrapped", False):
            base.start = _wrap_start(base.start)
        if not getattr(base._bootstrap, "_mw_wrapped", False):
            base._bootstrap = _wrap_bootstrap(base._bootstrap)
    on_profiling_started()


def on_profiling_started() -> None:
    """Called by the tracker whenever profiling starts in this process. In a multiprocessing
    child whose ``_bootstrap`` is already running unwrapped (the profiler was started by the
    target itself), a finalizer flushes at the child's ``util._exit_function``."""
    mp_process = sys.modules.get("multiprocessing.process")
    util = sys.modules.get("multiprocessing.util")
    if mp_process is None or util is None or _in_bootstrap:
        return
    try:
        if mp_process.parent_process() is None:
            return
        util.Finalize(None, _final_flush, args=("exit",), exitpriority=-(1 << 30))
    except Exception:  # never break the app over this
        logger.debug("middleware: no exit finalizer in this child", exc_info=True)


def _profiler_here() -> Any:
    from middleware import tracker

    p = tracker._profiler
    if p is not None and p.running and p.pid == os.getpid():
        return p
    return None


# -- the parent side: hand the configuration to spawn/forkserver children ----------------------------
class _ChildProfiling:
    """Rides on a started process object. Pickled for a spawn/forkserver child, it unpickles
    by starting the tracker in that child with ``config``; pickled for anything else (or
    unpickled in the parent) it is inert."""

    __slots__ = ("config",)

    def __init__(self, config: ProfilerConfig | None) -> None:
        self.config = config

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        spawning = None
        try:
            from multiprocessing import context

            spawning = context.get_spawning_popen()
        except Exception:
            pass
        if spawning is None or self.config is None:
            return (_ChildProfiling, (None,))
        _counts["children_profiled"] += 1
        return (_start_in_child, (dataclasses.asdict(self.config), os.getpid()))


def _start_in_child(settings: dict[str, Any], parent_pid: int) -> _ChildProfiling:
    """Runs while a spawn/forkserver child unpickles its process object. Never raises: a child
    must start whatever happens to its profiling."""
    if os.getpid() == parent_pid:
        return _ChildProfiling(None)
    try:
        from middleware.config import ProfilerConfig
        from middleware.tracker import MwTracker

        known = {f.name for f in dataclasses.fields(ProfilerConfig)}
        config = ProfilerConfig(**{k: v for k, v in settings.items() if k in known})
        MwTracker._from_config(config)
    except Exception as exc:
        _counts["child_start_failures"] += 1
        logger.debug("middleware: profiling the child failed", exc_info=True)
        _warn("middleware: could not profile child process %d: %s; it runs unprofiled",
              os.getpid(), exc)
    return _ChildProfiling(None)


def _wrap_start(original: Any) -> Any:
    def start(self: Any) -> Any:
        p = _profiler_here()
        if p is not None:
            try:
                self._mw_profiling = _ChildProfiling(p.config)
            except Exception:  # a process class with __slots__: its children are not profiled
                pass
        return original(self)

    start._mw_wrapped = True  # type: ignore[attr-defined]
    start.__wrapped__ = original  # type: ignore[attr-defined]
    start.__doc__ = original.__doc__
    return start


# -- the child side: flush before leaving -------------------------------------------------------------
def _wrap_bootstrap(original: Any) -> Any:
    def _bootstrap(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _in_bootstrap
        _in_bootstrap = True
        if _profiler_here() is not None:
            _hook_pool_worker(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            _final_flush("exit")
            if _terminate_pending:
                _die_of(_SIGTERM)

    _bootstrap._mw_wrapped = True  # type: ignore[attr-defined]
    _bootstrap.__wrapped__ = original  # type: ignore[attr-defined]
    return _bootstrap


_flushing = False  # a final export is under way in this process
_terminate_pending = False  # SIGTERM came during the exit flush: the process dies of it after


def _final_flush(reason: str) -> None:
    """Stops the profiler of this process with a final export; counts and reports a failure.
    A SIGTERM that comes meanwhile waits for all of it, the report included (see _on_sigterm)."""
    global _flushing
    p = _profiler_here()
    if p is None:
        return
    _flushing = True
    try:
        try:
            ok = p.stop(EXIT_FLUSH_TIMEOUT_S)
        except Exception:
            logger.exception("middleware: final export of child process %d failed", os.getpid())
            ok = False
        _counts["child_terminate_flushes" if reason == "terminate" else "child_exit_flushes"] += 1
        if not ok:
            _counts["child_exit_flush_failures"] += 1
            _warn(
                "middleware: child process %d: its last profile was not written %s within %g s; the "
                "samples since its previous export are lost",
                os.getpid(), "on SIGTERM" if reason == "terminate" else "at exit", EXIT_FLUSH_TIMEOUT_S,
            )
    finally:
        _flushing = False


# -- pool workers: SIGTERM while idle flushes first ---------------------------------------------------
def _on_sigterm(signum: int, frame: Any) -> None:
    global _armed, _terminate_pending
    _armed = False
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the export short
    if _flushing:
        # A worker that took the pool's sentinel is already writing its last profile on its way
        # out (terminate() races with the sentinels): let that export finish, then die of it.
        _terminate_pending = True
        return
    _final_flush("terminate")
    _die_of(signum)


def _die_of(signum: int) -> None:
    """Ends the process by ``signum``'s default action, as without our handler (the parent sees
    the same exit code)."""
    signal.signal(signum, signal.SIG_DFL)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: the default action ends the process


def _arm() -> None:
    global _armed
    if _armed:
        return
    try:
        if _sig.getsignal(_SIGTERM) == _SIG_DFL:  # never over the app's own disposition
            _sig.signal(_SIGTERM, _on_sigterm)
            _armed = True
            _guard_main_thread()
    except (ValueError, OSError):  # not the main thread
        pass


def _guard_main_thread() -> None:
    """The native SIGTERM guard in front of our handler (csrc/mw_termguard.h): a SIGTERM that
    lands in another thread, or just before the main thread blocks, still wakes the main thread
    (blocked in the pool's queue) so that the handler runs and the worker dies as asked."""
    global _guard_failed
    try:
        from middleware import _native

        if _native.termguard_arm():
            return
    except Exception:  # the handler works without it, as before
        pass
    if not _guard_failed:
        _guard_failed = True
        logger.debug("middleware: no SIGTERM guard in pool worker %d", os.getpid())


_guard_failed = False


def _disarm() -> None:
    global _armed
    if not _armed:
        return
    _armed = False
    try:
        if _sig.getsignal(_SIGTERM) is _on_sigterm:
            _sig.signal(_SIGTERM, _SIG_DFL)
            _termflush_arm()  # while the task runs: the native last export (csrc/mw_termflush.h)
    except (ValueError, OSError):
        pass


def _termflush_arm() -> None:
    global _termflush
    try:
        if _termflush is None:
            from middleware import _native

            _termflush = _native.termflush_arm
        _termflush()
    except Exception:  # the default action, as before
        pass


_termflush: Any = None


def _hook_pool_worker(process: Any) -> None:
    """For a ``multiprocessing.pool`` worker (target ``multiprocessing.pool.worker``): arm the
    SIGTERM handler while the worker sends a result or waits for a task, disarm it when a task
    arrives. The worker binds ``inqueue.get`` and ``outqueue.put`` when it starts, so shadowing
    them on the instances (this process's copies) is enough."""
    pool = sys.modules.get("multiprocessing.pool")
    if pool is None or getattr(process, "_target", None) is not getattr(pool, "worker", None):
        return
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        inqueue, outqueue = process._args[0], process._args[1]
        get, put = inqueue.get, outqueue.put
    except (AttributeError, IndexError, TypeError):
        return

    def idle_get() -> Any:
        _arm()
        task = get()
        if task is not None:  # None: the sentinel, the worker leaves (and flushes, armed)
            _disarm()
        return task

    def sending_put(obj: Any) -> None:
        _arm()
        put(obj)

    try:
        inqueue.get = idle_get
        outqueue.put = sending_put
    except AttributeError:
        pass
