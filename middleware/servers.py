"""Servers that fork and end their worker processes their own way: uWSGI and billiard (Celery).

Both start workers by ``fork()`` and end them in ways that skip what profiles a forked child
(``os.register_at_fork``) or writes a process's last window (``atexit``).

uWSGI
    forks its workers in C. CPython's at-fork handlers run there only with
    ``--py-call-osafterfork`` (or ``--py-call-uwsgi-fork-hooks``), so by default a worker forked
    from a master that loaded the app (without ``--lazy-apps``) carries the master's profiler
    state without its sampler threads, and every worker's ``PyThreadState`` still holds the
    master's thread id, which is how the sampler finds a thread (CPython 3.11+). uWSGI calls
    ``uwsgi.post_fork_hook`` in every worker after the fork; ours gives the thread state its own
    id and restarts profiling there (unless the at-fork handlers did). A worker that loads the
    app itself (``--lazy-apps``) gets its thread state fixed before its sampler starts. A worker
    leaving while idle (``--max-requests``, reload, shutdown) runs ``uwsgi.atexit`` and then,
    unless ``--skip-atexit-teardown``, finalizes the interpreter (Python's ``atexit``); ours
    exports the last window from ``uwsgi.atexit``, with uWSGI's stop signals held back until it
    is written. Both hooks chain to what was set before, and ``uwsgidecorators`` (which replaces
    ``post_fork_hook`` with its own chain when imported) gets ours appended to its chain. The
    ``uwsgi`` module exists only inside uWSGI; it is looked up in ``sys.modules``, never
    imported.

    uWSGI runs neither hook where Python cannot safely run: in a worker ended while it serves a
    request (harakiri, ``--reload-mercy`` expiring, SIGINT during a request), in the master (it
    runs no Python at exit: its windows are written at each interval, what it sampled since its
    last export is lost when it stops), and with ``--skip-atexit``.

billiard (Celery's prefork pool)
    forks with ``os.fork()`` (so the at-fork handler restarts the profiler in each pool process)
    but a pool process leaves through ``os._exit()`` from ``Worker._do_exit`` (after
    ``--max-tasks-per-child`` tasks, at a warm shutdown when the pool is closed, and on SIGTERM,
    which billiard turns into ``SystemExit``), and any other billiard child through ``os._exit()``
    once ``Process._bootstrap`` returns. The last window is exported in ``Worker._do_exit``
    after the pool's ``on_exit`` callback (Celery's ``worker_process_shutdown`` signal) has run,
    and after ``_bootstrap`` for other billiard processes. Lost: a pool process ended by SIGKILL
    (Celery's hard time limit, a cold shutdown's last resort, and Celery's ``PR_SET_PDEATHSIG``
    at a warm shutdown, which kills the replacement pool processes as the billiard supervisor
    thread that forked them ends).

Final exports go through :func:`middleware.children._final_flush` (bounded, counted, a failure
said once on stderr). :func:`install` runs each time profiling starts in a process, from the
tracker, before the sampler starts.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

from middleware.config import exc_text, visible_warning

logger = logging.getLogger(__name__)

__all__ = ["install", "under_uwsgi"]

_installed = False
_installed_billiard = False


def install() -> None:
    """Called by the tracker each time profiling is about to start in a process (cheap after the
    first time). Hooks the server this process runs under: uWSGI now, billiard when the app
    imports it; imports neither. Raises ``RuntimeError`` (after saying why on stderr) in a uWSGI
    worker whose thread state cannot be made to name its own thread: the sampler would find
    none of its threads."""
    global _installed
    uwsgi = under_uwsgi()
    # a worker that loads the app itself (--lazy-apps) runs an interpreter started in the master
    # and forked without PyOS_AfterFork_Child: its thread state names the master's thread
    if uwsgi is not None and not _thread_state_names_this_thread():
        why = "its Python thread state names another process's thread"
        _warn_not_profiled(why)
        raise RuntimeError(f"uWSGI worker {os.getpid()}: {why}")
    if _installed:
        return
    _installed = True
    if uwsgi is not None:
        _install_uwsgi(uwsgi)
    from middleware.integrations._post_import import when_imported

    when_imported("billiard.pool", _install_billiard)


# -- uWSGI --------------------------------------------------------------------------------------------
def under_uwsgi() -> Any:
    """The ``uwsgi`` module when this process is a uWSGI master or worker, else None (the module is
    built into the uWSGI binary and registered before the app is loaded; importing it anywhere
    else fails, so it is only looked up)."""
    module = sys.modules.get("uwsgi")
    if module is None or not hasattr(module, "opt"):
        return None
    return module


def _chain(previous: Any, ours: Callable[[], None]) -> Callable[[], None]:
    """``ours``, then what was installed before (both run whatever the other does)."""
    if getattr(previous, "_mw_hook", False):
        return cast(Callable[[], None], previous)  # already ours (or chained to ours)
    if previous is None or not callable(previous):
        return ours

    def chained() -> None:
        try:
            ours()
        finally:
            previous()

    chained._mw_hook = True  # type: ignore[attr-defined]
    return chained


def _install_uwsgi(uwsgi: Any) -> None:
    try:
        decorators = sys.modules.get("uwsgidecorators")
        if decorators is not None and hasattr(decorators, "postfork_chain"):
            _append_to_postfork_chain(decorators)
        else:
            uwsgi.post_fork_hook = _chain(getattr(uwsgi, "post_fork_hook", None), _uwsgi_post_fork)
            from middleware.integrations._post_import import when_imported

            # it replaces uwsgi.post_fork_hook by its own chain when imported
            when_imported("uwsgidecorators", _append_to_postfork_chain)
        uwsgi.atexit = _chain(getattr(uwsgi, "atexit", None), _uwsgi_at_exit)
    except Exception as exc:  # never break the app over this
        logger.debug("middleware: could not hook uWSGI's fork and exit", exc_info=True)
        visible_warning(logger, "middleware: could not hook uWSGI's fork and exit (%s); uWSGI workers may not "
                        "be profiled", exc_text(exc))
        return
    logger.debug("middleware: uWSGI post-fork and exit hooks installed (pid %d)", os.getpid())


def _append_to_postfork_chain(decorators: Any) -> None:
    chain = getattr(decorators, "postfork_chain", None)
    if isinstance(chain, list) and _uwsgi_post_fork not in chain:
        chain.append(_uwsgi_post_fork)


def _uwsgi_post_fork() -> None:
    """In a uWSGI worker (or mule, spooler) just forked: restart the profiler it inherited, unless
    CPython's at-fork handlers already did (``--py-call-osafterfork``)."""
    from middleware import tracker

    p = tracker._profiler
    if p is None or not p.running or p.pid == os.getpid():
        return
    if not _thread_state_names_this_thread():
        # the inherited state describes the master's threads: nothing runs here
        p.running = p.exporting = p.uploading = False
        _warn_not_profiled("its Python thread state names the master's thread")
        return
    children = sys.modules.get("middleware.children")
    if children is not None:
        children._after_fork_in_child()
    tracker._after_fork_in_child()


_uwsgi_post_fork._mw_hook = True  # type: ignore[attr-defined]


def _uwsgi_at_exit() -> None:
    """A uWSGI worker leaving while idle: export the last window (``--skip-atexit-teardown`` skips
    Python's ``atexit``, where this would otherwise happen). uWSGI's stop signals wait until it is
    written: a worker ending by ``--max-requests`` while the master shuts down gets SIGINT in
    the middle of its exit, and uWSGI's handler would call ``exit()`` again."""
    from middleware import children

    with _exit_signals_blocked():
        children._final_flush("exit")


_uwsgi_at_exit._mw_hook = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def _exit_signals_blocked() -> Iterator[None]:
    """Blocks SIGHUP, SIGINT and SIGTERM in this thread for a final export (bounded by the
    export's own timeout); a signal that came meanwhile is delivered when the mask is restored,
    as it would have been a little later without us."""
    import signal

    old: Any = None
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError, ValueError):
        pass
    try:
        yield
    finally:
        if old is not None:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            except (OSError, ValueError):
                pass


#: Bytes of this thread's PyThreadState searched for ``thread_id``: the smallest PyThreadState
#: among CPython 3.11-3.13 (288 bytes, 3.12), where ``thread_id`` is at 136-152.
_TSTATE_SCAN_BYTES = 288
_PID_MAX = 1 << 22  # the kernel's largest pid_max


def _thread_state_names_this_thread() -> bool:
    """Makes this thread's ``PyThreadState`` hold its own kernel thread id after a fork that
    skipped ``PyOS_AfterFork_Child`` (uWSGI's, by default), as that function would have: the
    sampler finds a thread by the id in its thread state (CPython 3.11+), and a stale one names
    a thread of the master, so nothing of this process would be sampled.

    The field is found, not assumed: in every CPython this package supports, ``native_thread_id``
    follows ``thread_id``, this thread's ``pthread_t`` (a pointer, unchanged by fork). The word
    after the one holding our ``pthread_t`` is replaced only when it holds a thread id that is
    not a thread of this process. True when the thread state names this thread (also on 3.10,
    which has no such field: the sampler reads the id from the thread's descriptor, which fork()
    updates); False when it could not be made to.
    """
    if sys.version_info < (3, 11):
        return True
    import threading

    tid = threading.get_native_id()
    try:
        import ctypes

        # a function object of our own: ctypes.pythonapi's is shared with the app
        get_tstate = ctypes.PYFUNCTYPE(ctypes.c_void_p)(("PyThreadState_Get", ctypes.pythonapi))
        words = (ctypes.c_ulong * (_TSTATE_SCAN_BYTES // ctypes.sizeof(ctypes.c_ulong))).from_address(
            get_tstate())
        ident = threading.get_ident()
        for i in range(len(words) - 1):
            if words[i] != ident:
                continue
            native = words[i + 1]
            if native == tid:
                return True
            if 0 < native < _PID_MAX and not os.path.exists(f"/proc/self/task/{native}"):
                words[i + 1] = tid
                logger.debug("middleware: thread state of pid %d named thread %d; now %d",
                             os.getpid(), native, tid)
                return True
            return False
    except Exception:
        logger.debug("middleware: reading this thread's state failed", exc_info=True)
    return False


def _warn_not_profiled(why: str) -> None:
    visible_warning(logger, "middleware: uWSGI worker %d is not profiled: %s; run uWSGI with "
                    "--py-call-osafterfork", os.getpid(), why)


# -- billiard -----------------------------------------------------------------------------------------
def _install_billiard(pool_module: Any) -> None:
    """Wraps ``billiard.pool.Worker._do_exit`` and ``billiard.process.BaseProcess._bootstrap``."""
    global _installed_billiard
    if _installed_billiard:
        return
    _installed_billiard = True
    from middleware import children

    worker: Any = getattr(pool_module, "Worker", None)
    do_exit = getattr(worker, "_do_exit", None)
    if do_exit is not None and not getattr(do_exit, "_mw_wrapped", False):
        worker._do_exit = _wrap_do_exit(do_exit)
    process = sys.modules.get("billiard.process")
    base: Any = getattr(process, "BaseProcess", None)
    bootstrap = getattr(base, "_bootstrap", None)
    if bootstrap is not None and not getattr(bootstrap, "_mw_wrapped", False):
        base._bootstrap = children._wrap_bootstrap(bootstrap)


def _wrap_do_exit(original: Any) -> Any:
    def _do_exit(self: Any, pid: int, exitcode: Any, exc: Any = None) -> Any:
        on_exit = getattr(self, "on_exit", None)

        def on_exit_then_flush(*args: Any) -> None:
            try:
                if on_exit is not None:
                    on_exit(*args)
            finally:
                _billiard_final_flush()

        try:
            self.on_exit = on_exit_then_flush
        except AttributeError:  # cannot chain: flush first
            _billiard_final_flush()
        return original(self, pid, exitcode, exc)

    _do_exit._mw_wrapped = True  # type: ignore[attr-defined]
    _do_exit.__wrapped__ = original  # type: ignore[attr-defined]
    return _do_exit


def _billiard_final_flush() -> None:
    from middleware import children

    with _exit_signals_blocked():  # the pool's SIGTERM must not cut the export short
        children._final_flush("exit")
