"""MwTracker: continuous profiling of the whole process.

``tracker = MwTracker()`` starts the native sampler once per process (a second tracker reuses
it), names the process's threads for the sampler, starts the exporter (local store by default,
or upload to a Pyroscope-compatible backend), instruments web frameworks, and arranges for
profiling to go on in child processes (forked gunicorn workers; multiprocessing children of every
start method, see :mod:`middleware.children`) and to flush at exit.

Nothing here runs on the sampling path: the sampler and exporter are native threads that never
take the GIL. Python only configures, labels and reports.

Start-up stays cheap: what only some processes need is imported when it is needed (asyncio's
label hook is installed when the app has imported asyncio and pushes labels, the package
version for the uploader's user agent only when a backend is configured, the profile model at
the first ``snapshot()``).
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, NoReturn

from middleware import asyncio_tasks
from middleware.config import (
    ProfilerConfig,
    exc_text,
    memory_duty_run,
    resolve_config,
    resolve_upload_config,
    visible_warning,
)
from middleware.labels import enable_asyncio_hook
from middleware.labels import labels as _labels_cm

if TYPE_CHECKING:
    from middleware.profile import Profile

logger = logging.getLogger(__name__)

__all__ = ["MwTracker"]

EXIT_FLUSH_TIMEOUT_S = 5.0


def _native_module() -> Any:
    from middleware import _native

    return _native


def _interpreter_unsupported() -> bool:
    """True (said once, see :mod:`middleware`) on an interpreter whose layouts the sampler does
    not know: a tracker there does nothing and loads no native code, however it was imported."""
    import middleware  # initialised before any tracker is made

    if middleware.python_supported():
        return False
    middleware._say_unsupported()
    return True


class _ProcessProfiler:
    """The one profiler of this process (re-created in forked children)."""

    def __init__(self, config: ProfilerConfig) -> None:
        self.config = config
        self.pid = os.getpid()
        self.running = False
        self.exporting = False
        self.uploading = False
        self.upload_config: Any = None
        self.lock = threading.RLock()

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        n = _native_module()
        cfg = self.config
        with self.lock:
            if self.running:
                return
            from middleware import servers  # uWSGI workers, billiard (Celery) pool processes

            servers.install()  # before the sampler reads this process's thread states
            # names first: the sampler's first tick may come before this thread runs again, and a
            # sample of a thread not named yet is filed under thread-<tid> (a label value of its own)
            _install_thread_naming()
            n.start(rate_hz=cfg.sample_rate, max_depth=cfg.max_depth, wall_hz=cfg.wall_rate)
            self.running = True
            self.pid = os.getpid()
            _warn_once_without_pause(n)
            _children_profiling_started()
            enable_asyncio_hook()
            asyncio_tasks.enable()
            self._start_upload(n)
            self._start_export(n)
            try:  # a SIGTERM with its default action exports the last window before it ends us
                n.termflush_arm()
            except OSError as exc:  # SIGTERM then ends the process as before, its last window unsaved
                visible_warning(logger, "middleware: no thread for the last export on SIGTERM (%s); a SIGTERM ends "
                                "process %d without its last window", exc.strerror or exc, os.getpid())
            if cfg.locks:
                from middleware import locks

                try:
                    locks.install(n, cfg.lock_rate)
                except Exception as exc:  # the CPU profile goes on without lock waits
                    visible_warning(logger, "middleware: lock-wait profiling could not start (%s); "
                                    "process %d profiles CPU only", exc_text(exc), os.getpid())
            if cfg.memory:
                try:
                    n.memory_enable(rate_bytes=cfg.memory_rate, duty_run=memory_duty_run(cfg.memory_duty))
                except Exception as exc:  # the CPU profile goes on without memory profiles
                    visible_warning(logger, "middleware: memory profiling could not start (%s); "
                                    "process %d has no memory profiles", exc_text(exc), os.getpid())
            if cfg.native:
                n.unwind_enable(bool(cfg.native_show_internal))
        if logger.isEnabledFor(logging.INFO):  # the mode may wait for the sampler's first probe (10-22 ms)
            logger.info(
                "middleware: profiling pid %d at %d Hz (service %s, store %s); CPU samples from %s",
                self.pid, cfg.sample_rate, cfg.service_name, cfg.profile_dir or "off",
                _CPU_TIMER_MODES.get(int(n.stats().get("cpu_timer_mode", 0)), "sampler ticks"),
            )

    def _start_upload(self, n: Any) -> None:
        if not self.config.upload:
            return
        try:  # None when there is nowhere to upload
            ucfg = resolve_upload_config(
                service_name=self.config.service_name, sample_rate=self.config.sample_rate,
                tags=self.config.tags, resource_attributes=self.config.resource_attributes,
            )
        except Exception as exc:  # configuration must never break the app
            logger.debug("middleware: resolving the upload settings failed", exc_info=True)
            visible_warning(logger, "middleware: bad upload configuration (%s); profiles stay local",
                            exc_text(exc))
            return
        if ucfg is None:
            return
        from dataclasses import asdict

        try:  # loads the uploader module, middleware._upload (libcurl), the first time
            n.upload_start(**asdict(ucfg))
        except ImportError as exc:  # the native side also says it once on stderr
            logger.error("middleware: %s; profiles are not uploaded (local store: %s)", exc,
                         self.config.profile_dir or "off")
            return
        self.upload_config = ucfg
        self.uploading = True

    def _start_export(self, n: Any) -> None:
        cfg = self.config
        profile_dir = cfg.profile_dir
        if self.uploading and not cfg.profile_dir_set:
            profile_dir = None  # a backend is configured and no local store was asked for
        if profile_dir:
            try:
                os.makedirs(profile_dir, exist_ok=True)
            except OSError as exc:
                visible_warning(
                    logger, "middleware: cannot create the profile directory %s (%s); profiles of process %d "
                    "are not stored while it cannot be created (set MW_PROFILE_DIR to a writable directory, "
                    "or to none)", profile_dir, exc.strerror or exc, os.getpid(),
                )
        from middleware.version import service_version, version_labels

        n.export_start(
            interval_s=float(cfg.upload_interval),
            service=cfg.service_name,
            profile_dir=profile_dir,
            store_max_bytes=int(cfg.store_max_mb) << 20,
            upload=self.uploading,
            labels=version_labels(cfg.commit_sha, cfg.repository_url, service_version(cfg.resource_attributes)),
        )
        self.exporting = True

    def flush(self, timeout: float = 10.0) -> bool:
        n = _native_module()
        ok = True
        if self.exporting:
            ok = bool(n.export_flush(timeout))
        if self.uploading:
            n.upload_flush(timeout)
        self.drain_messages()
        return ok

    def stop(self, timeout: float = EXIT_FLUSH_TIMEOUT_S) -> bool:
        """Stops sampling, exports the last window and drains the uploader. False when the final
        export did not finish within ``timeout`` or the uploader dropped profiles at its deadline."""
        n = _native_module()
        ok = True
        with self.lock:
            if not self.running:
                return True
            if self.config.locks:
                from middleware import locks

                locks.uninstall(n)
            if self.config.memory:
                n.memory_disable()
            n.stop()
            if self.exporting:
                ok = bool(n.export_stop(timeout))
                self.exporting = False
            if self.uploading:
                dropped = _dropped_at_exit(n)
                n.upload_stop(timeout)
                ok = ok and _dropped_at_exit(n) == dropped
                self.uploading = False
            self.running = False
            self.drain_messages()
        return ok

    def drain_messages(self) -> None:
        if not self.uploading:
            return
        from middleware import upload_config

        upload_config.drain_upload_messages()

    def after_fork_in_child(self) -> None:
        """gunicorn workers: the child has no sampler thread; start a fresh one."""
        self.running = self.exporting = self.uploading = False
        self.lock = threading.RLock()
        _start_or_warn(
            self, "middleware: restarting profiling in the forked child failed",
            "middleware: could not restart profiling in forked process %d (%s); it runs unprofiled", os.getpid(),
        )


def _start_or_warn(p: _ProcessProfiler, debug: str, warning: str, *args: Any) -> bool:
    """Starts ``p``; if that raises, logs ``debug`` with the traceback and ``warning`` (its
    arguments: ``args``, then the exception's type name and the exception) visibly. Started?"""
    try:
        p.start()
        return True
    except Exception as exc:
        logger.debug(debug, exc_info=True)
        visible_warning(logger, warning, *args, exc_text(exc))
        return False


def _dropped_at_exit(n: Any) -> int:
    try:
        return int(n.upload_stats().get("dropped_at_exit", 0))
    except Exception:
        return 0


_profiler: _ProcessProfiler | None = None
_profiler_lock = threading.Lock()
_hooks_installed = False


_warned_no_pause = False


# stats()["cpu_timer_mode"] -> what takes the CPU samples (README: "CPU samples taken by the thread")
_CPU_TIMER_MODES = {
    2: "per-thread perf task-clock events",
    1: "per-thread POSIX CPU timers (perf_event_open refused: a sample comes at the kernel's next tick "
       "of the thread's running, so bursts shorter than a tick are placed less exactly; totals are unbiased)",
    0: "sampler ticks (no CPU timer: MW_PROFILING_CPU_TIMER=off or no free real-time signal)",
}


def _warn_once_without_pause(n: Any) -> None:
    """Says once per process when the sampler cannot pause a running thread (no free real-time
    signal): stacks of threads that run Python are then kept only when two reads agree."""
    global _warned_no_pause
    # at start, a signal is the sampler's exactly when it installed its pause handler (can_pause)
    if _warned_no_pause or n.sampling_signal():
        return
    _warned_no_pause = True
    visible_warning(
        logger,
        "middleware: no free real-time signal (every SIGRTMIN+6..SIGRTMAX-2 has a handler) to pause a "
        "running thread while its stack is read; stacks of threads running Python are kept only when two "
        "reads agree (tracker.stats()['unverified'] counts them)",
    )


def _install_process_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    # atexit runs the newest first: moved to the oldest place, the last export waits for every
    # callback, those registered before the tracker started too (their CPU was lost)
    atexit.register(_at_exit)
    _native_module().atexit_run_last(_at_exit)
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _install_leaving_hooks()
    _install_signal_guard()
    # multiprocessing children: profiled from their start, flushed before they end; hooked when
    # the app imports multiprocessing (never imported by us)
    from middleware.integrations._post_import import when_imported

    when_imported("multiprocessing.process", _install_children_hooks)


def _install_children_hooks(module: Any) -> None:
    from middleware import children

    children.install()


def _children_profiling_started() -> None:
    children = sys.modules.get("middleware.children")
    if children is not None and children._installed:
        children.on_profiling_started()


def _at_exit() -> None:
    p = _profiler
    if p is not None and p.running and p.pid == os.getpid():
        p.stop(EXIT_FLUSH_TIMEOUT_S)


def _install_leaving_hooks() -> None:
    """``os._exit`` ends a process without ``atexit``: a process leaving through it (a forked
    worker of a hand-made pre-fork server, a daemon's parent, an app's fast exit) lost every
    sample since its last export, silently. Wrapped, it first stops this process's profiler (the
    last window exported, the uploader drained, bounded by EXIT_FLUSH_TIMEOUT_S), then exits with
    the status it was given. Code that took ``os._exit`` before the tracker started keeps the
    original; multiprocessing's children have already stopped theirs (children.py).

    ``os.exec*`` replaces the program the same way, and worse: a CPU-timer or pause signal
    queued for the calling thread while the kernel runs ``execve`` is delivered to the new
    program, where its default action ends it (a profiled ``os.execv`` ended its new program
    with "Real-time signal 6"). Every ``os.exec*`` ends in ``execv``, ``execve`` or
    ``_execvpe`` (``execvp*``: one ``execv``/``execve`` per ``PATH`` entry): each is wrapped to
    stop the profiler first (its signals then stop, and those already queued are delivered to
    our handlers as its system calls return); when the exec fails, profiling starts again."""
    original = os._exit
    if not getattr(original, "_mw_flushes", False):

        @functools.wraps(original)
        def _exit(status: int) -> NoReturn:
            try:
                _stop_before_leaving("os._exit")
            except BaseException:  # never keep a process from exiting
                pass
            original(status)

        _exit._mw_flushes = True  # type: ignore[attr-defined]
        os._exit = _exit
    for name in ("execv", "execve", "_execvpe"):
        func = getattr(os, name, None)
        if func is not None and not getattr(func, "_mw_flushes", False):
            setattr(os, name, _stopping_before_exec(func))


def _install_signal_guard() -> None:
    """The sampler sends one real-time signal (CPU timers, pauses), the first of
    SIGRTMIN+6..SIGRTMAX-2 with no handler when it started. An app that later installs its own
    disposition for that signal would get ours: a handler of its own was called at every CPU
    sample, and ``SIG_DFL`` (code resetting every signal to its default) ended the process at the
    next one. ``signal.signal`` is wrapped: for that signal the sampler first stops sending it and
    waits (at most 0.1 s) until no thread has one pending, then the app's disposition goes in;
    the sampler goes on with its ticks only and says so once. (A disposition installed from C code
    is seen at the sampler's next tick: one or two of ours may reach a handler before; a
    ``SIG_DFL`` there can still end the process.)"""
    import signal

    original = signal.signal
    if getattr(original, "_mw_guards", False):
        return

    @functools.wraps(original)
    def signal_(signalnum: Any, handler: Any) -> Any:
        try:
            n = _native_module()
            ours = n.sampling_signal()
            # only where the call can succeed: signal.signal raises in any other thread
            if ours and int(signalnum) == ours and threading.current_thread() is threading.main_thread():
                n.release_signal(0.1)
        except Exception:  # never keep the app from setting its handler
            logger.debug("middleware: releasing the sampling signal failed", exc_info=True)
        return original(signalnum, handler)

    signal_._mw_guards = True  # type: ignore[attr-defined]
    signal.signal = signal_


def _stopping_before_exec(original: Any) -> Any:
    @functools.wraps(original)
    def exec_(*args: Any, **kw: Any) -> Any:
        try:
            p = _stop_before_leaving("os.exec")
        except Exception:  # never keep a process from exec'ing
            p = None
        try:
            return original(*args, **kw)
        except BaseException:
            if p is not None:  # the program goes on: so does its profile
                p.start()
            raise

    exec_._mw_flushes = True  # type: ignore[attr-defined]
    return exec_


def _stop_before_leaving(how: str) -> _ProcessProfiler | None:
    """Stops this process's profiler before ``how`` leaves the program; returns it when it was
    running and this call stopped it."""
    p = _profiler
    if p is None or not p.running or p.pid != os.getpid():
        return None
    owned = getattr(p.lock, "_is_owned", None)
    if owned is not None and owned():
        return None  # called from inside stop() (a signal handler): that stop goes on after us
    if not p.lock.acquire(timeout=EXIT_FLUSH_TIMEOUT_S):
        ok = False
    else:
        try:
            ok = p.stop(EXIT_FLUSH_TIMEOUT_S)
        finally:
            p.lock.release()
    if not ok:
        visible_warning(
            logger, "middleware: process %d: its last profile was not written before %s within %g s; the "
            "samples since its previous export are lost", os.getpid(), how, EXIT_FLUSH_TIMEOUT_S,
        )
    return None if p.running else p


def _forked_to_exec() -> bool:
    """True in the child subprocess forks to run a ``preexec_fn`` in before it execs (CPython runs
    the fork hooks there): nothing in it is worth profiling, and starting the profiler there cost
    every such spawn ~3.5 ms, in the parent's wait for the exec."""
    try:  # this function's caller is the hook; the hook's, the forking code (if any: C may fork)
        caller = sys._getframe(2)
    except ValueError:
        return False
    return caller.f_code.co_name == "_execute_child" and caller.f_globals.get("__name__") == "subprocess"


def _after_fork_in_child() -> None:
    p = _profiler
    if p is not None and p.running and not _forked_to_exec():
        _reregister_threads()
        p.after_fork_in_child()
        asyncio_tasks.after_fork_in_child()


# -- thread names ----------------------------------------------------------------------------------
_naming_installed = False
#: The Thread object each OS thread is named after (by native id): a rename of that object names
#: the thread again; a rename of another (a gevent greenlet's, a stale object) does not.
_named: weakref.WeakValueDictionary[int, threading.Thread] = weakref.WeakValueDictionary()


def _register_thread(t: threading.Thread) -> None:
    tid = getattr(t, "native_id", None)
    if tid:
        _native_module().set_thread_name(tid, t.name)
        _named[tid] = t


def _reregister_threads() -> None:
    _refresh_current_native_id()
    main = threading.main_thread()
    named: set[int] = set()
    # each OS thread once, the main thread's own object first: under gevent a Thread object may
    # be a greenlet, with its OS thread's native id
    for t in sorted(threading.enumerate(), key=lambda t: t is not main):
        tid = getattr(t, "native_id", None)
        if tid and tid not in named:
            named.add(tid)
            _register_thread(t)


def _in_greenlet() -> bool:
    """True when the caller runs in a greenlet other than its OS thread's main one: a
    ``threading.Thread`` started under gevent's ``monkey.patch_all()`` is such a greenlet, and
    shares its OS thread's native id (naming the OS thread after it, and forgetting that id when
    its Thread object goes, took the real thread's name and labels)."""
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return False
    try:
        return greenlet.getcurrent().parent is not None
    except Exception:
        return False


def _refresh_current_native_id() -> None:
    """After ``os.fork()`` CPython (3.10-3.13) leaves the forking thread's ``Thread`` object with
    the parent's native id: ``multiprocessing`` resets it in its children, gunicorn and plain
    ``os.fork()`` do not. Registered under the stale id, the child's main thread would be
    unnamed (``thread-<pid>``, one label value per worker). Reset it the way multiprocessing
    does (with the naming hook installed this also registers the thread)."""
    t = threading.current_thread()
    tid = threading.get_native_id()
    if getattr(t, "native_id", tid) == tid:
        return
    setter = getattr(t, "_set_native_id", None)
    if setter is not None:
        setter()


def _install_thread_naming() -> None:
    """Names every thread for the sampler: existing ones now, new ones as they start.

    New threads register themselves, from inside, as soon as they know their native id:
    ``Thread._set_native_id`` (called by ``Thread._bootstrap_inner`` before the target runs) is
    wrapped, so even a thread that lives a few milliseconds is named in its first sample, and no
    wrapper frame stays in the thread's stack. Where that private hook is missing, ``start`` is
    wrapped instead (registration then waits for the starting thread to get the GIL back). The
    name is forgotten when the Thread object goes away.
    """
    global _naming_installed
    _reregister_threads()
    if _naming_installed:
        return
    _naming_installed = True

    def register(t: threading.Thread) -> None:
        tid = getattr(t, "native_id", None)
        if tid:
            try:
                _register_thread(t)
                # not at interpreter exit: finalizers run before the last window is exported,
                # whose samples would lose their thread's name
                weakref.finalize(t, _native_module().forget_thread, tid).atexit = False
            except Exception:  # never break thread start-up
                pass

    _follow_renames()

    hook = getattr(threading.Thread, "_set_native_id", None)
    if hook is not None:
        def _set_native_id(self: threading.Thread) -> None:
            hook(self)
            if _in_greenlet():
                return  # not a thread of its own (gevent): its OS thread is named already
            register(self)
            try:  # native frames: an alternate signal stack for this thread (no-op when off)
                _native_module().thread_init()
            except Exception:
                pass

        threading.Thread._set_native_id = _set_native_id  # type: ignore[attr-defined]
    else:  # pragma: no cover - all supported CPythons have the hook
        original = threading.Thread.start

        def start(self: threading.Thread) -> None:
            original(self)
            register(self)

        threading.Thread.start = start  # type: ignore[method-assign]


def _follow_renames() -> None:
    """Wraps the setter of ``Thread.name`` (``setName`` goes through it too): a thread renamed
    while it runs (``threading.current_thread().name = "poller"``) has its samples named after its
    new name from then on, not after the name it started with."""
    prop = threading.Thread.__dict__.get("name")
    if not isinstance(prop, property) or prop.fset is None or prop.fget is None:
        return  # pragma: no cover - CPython 3.10-3.13 define it so
    fset = prop.fset

    def set_name(self: threading.Thread, name: str) -> None:
        fset(self, name)
        tid = getattr(self, "native_id", None)
        if tid and _named.get(tid) is self:
            try:
                _native_module().set_thread_name(tid, self.name)
            except Exception:  # never break the rename
                pass

    threading.Thread.name = property(prop.fget, set_name, prop.fdel, prop.__doc__)  # type: ignore[assignment]


# -- the public handle -----------------------------------------------------------------------------
class MwTracker:
    """Starts (or joins) continuous profiling of this process.

    Arguments override ``MW_*`` environment variables, which override defaults (README,
    "Configuration"). Bad values are logged and replaced by defaults; they never raise. On an
    interpreter the sampler does not know, the tracker does nothing (see :mod:`middleware`).
    """

    #: True on an interpreter the sampler does not know (nothing runs, no native code is loaded),
    #: and once profiling could not start here: the tracker's methods then do nothing.
    _unprofiled = False
    _profiler: _ProcessProfiler | None

    def __init__(
        self,
        service_name: str | None = None,
        sample_rate: int | None = None,
        upload_interval: float | None = None,
        profile_dir: str | None = None,
        native: bool | None = None,
        enabled: bool | None = None,
        **options: Any,
    ) -> None:
        if _interpreter_unsupported():
            self._stay_unprofiled()
            return
        self._attach(resolve_config(
            service_name=service_name, sample_rate=sample_rate, upload_interval=upload_interval,
            profile_dir=profile_dir, native=native, enabled=enabled, **options,
        ))

    @classmethod
    def _from_config(cls, config: ProfilerConfig) -> MwTracker:
        """A tracker with settings already resolved (a spawn/forkserver child gets its parent's)."""
        self = cls.__new__(cls)
        self._attach(config)
        return self

    def _stay_unprofiled(self) -> None:
        self._unprofiled = True
        self.config = ProfilerConfig(enabled=False)
        self._profiler = None

    def _attach(self, config: ProfilerConfig) -> None:
        global _profiler
        if _interpreter_unsupported():
            self._stay_unprofiled()
            return
        self.config = config
        if not self.config.enabled:
            logger.info("middleware: profiling disabled (MW_APM_COLLECT_PROFILING=false)")
            self._profiler = None
            return
        with _profiler_lock:
            if _profiler is not None and _profiler.running and _profiler.pid == os.getpid():
                logger.debug("middleware: profiler already running; reusing it")
            else:
                _profiler = _ProcessProfiler(self.config)
                if not _start_or_warn(
                    _profiler, "middleware: starting the profiler failed",
                    "middleware: profiling could not start (%s); the app runs unprofiled",
                ):
                    try:  # whatever did start (the sampler) stops: the app runs unprofiled indeed
                        _profiler.stop(0.5)
                    except Exception:
                        logger.debug("middleware: stopping after a failed start failed", exc_info=True)
                    _profiler = None
                    # labels(), stats(), snapshot() then do nothing: the native module may not
                    # even load (no memory to map it), and the app's calls must not fail for it
                    self._stay_unprofiled()
                    return
            self._profiler = _profiler
            if _profiler is not None:
                self.config = _profiler.config
                _install_process_hooks()
        if self._profiler is not None and self.config.instrument:
            try:
                from middleware import integrations

                integrations.install_all(self)
            except Exception as exc:
                logger.debug("middleware: framework instrumentation failed", exc_info=True)
                visible_warning(
                    logger, "middleware: framework instrumentation failed (%s); requests are not labelled, "
                    "profiling continues", exc_text(exc),
                )

    # -- control ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._profiler is not None and self._profiler.running

    def stop(self) -> None:
        """Stops profiling and flushes the last profile (store/backend)."""
        if self._profiler is not None:
            self._profiler.stop()

    def flush(self, timeout: float = 10.0) -> bool:
        """Exports the current window now (store and/or backend) and waits for it."""
        if self._profiler is None or not self._profiler.running:
            return False
        return self._profiler.flush(timeout)

    def labels(self, **kv: object) -> Any:
        """Context manager: samples taken inside carry these labels (threads and asyncio safe)."""
        if self._unprofiled:
            import contextlib

            return contextlib.nullcontext()
        return _labels_cm(**kv)

    def stats(self) -> dict[str, int]:
        """Counters: samples taken, dropped, torn reads, overflow, sampler CPU time, exports..."""
        if self._unprofiled:
            return {}
        n = _native_module()
        out: dict[str, int] = dict(n.stats())
        out.update({f"export_{k}" if not k.startswith("export") else k: v for k, v in n.export_stats().items()})
        out.update({f"upload_{k}": v for k, v in n.upload_stats().items()})
        out.update(n.unwind_stats())  # native frames: unwind_* counters
        out.update(n.locks_stats())  # lock waits: lock_* counters
        out.update({f"memory_{k}" if not k.startswith("memory") else k: v
                    for k, v in n.memory_stats().items()})  # allocations: memory_* counters
        children = sys.modules.get("middleware.children")
        if children is not None:  # child processes: handed profiling, final exports
            out.update(children.stats())
        return out

    def snapshot(self, reset: bool = False) -> Profile:
        """Everything collected since start (or the last ``reset``), as a :class:`Profile`."""
        if self._unprofiled:
            from middleware.profile import Profile

            return Profile()
        return snapshot_profile(reset=reset, rate=self.config.sample_rate)


def __getattr__(name: str) -> Any:
    # The profile model is imported at the first snapshot; these names stay reachable from here.
    if name in ("DEFAULT_SAMPLE_TYPES", "Frame", "Profile", "Sample"):
        from middleware import profile

        return getattr(profile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def snapshot_profile(reset: bool = False, rate: int = 100) -> Profile:
    """The native cumulative profile converted to the Python model (root-first stacks)."""
    from middleware.profile import DEFAULT_SAMPLE_TYPES, Frame, Profile, Sample

    n = _native_module()
    start_ns, end_ns, rows = n.snapshot(reset=reset)
    pid = str(os.getpid())
    label_cache: dict[int, tuple[tuple[str, str], ...]] = {}
    frame_cache: dict[tuple[str, str, int], Frame] = {}
    acc: dict[tuple[tuple[Frame, ...], tuple[tuple[str, str], ...]], list[int]] = {}
    for frames, thread_name, labelset, cpu_samples, cpu_ns, _wall_samples, wall_ns in rows:
        stack = tuple(
            frame_cache.setdefault(f, Frame(f[0], f[1], f[2]))
            for f in reversed(frames)
        )
        pairs = label_cache.get(labelset)
        if pairs is None:
            pairs = tuple(n.labelset_pairs(labelset)) if labelset else ()
            label_cache[labelset] = pairs
        thread_name, _, task = thread_name.partition("\x1f")  # an asyncio task's sample
        extra = {"thread_name": thread_name, "pid": pid}
        if task:
            extra["task"] = task
        lab = tuple(sorted({**dict(pairs), **extra}.items()))
        key = (stack, lab)
        v = acc.get(key)
        if v is None:
            acc[key] = [cpu_samples, cpu_ns, wall_ns]
        else:
            v[0] += cpu_samples
            v[1] += cpu_ns
            v[2] += wall_ns
    samples = [Sample(stack=s, values=tuple(v), labels=lab) for (s, lab), v in acc.items()]
    return Profile(
        sample_types=list(DEFAULT_SAMPLE_TYPES),
        samples=samples,
        time_nanos=start_ns,
        duration_nanos=max(0, end_ns - start_ns),
        period=1_000_000_000 // max(1, rate),
    )
