"""User and framework labels attached to samples (``endpoint``, ``span_id`` ...).

The active labels live in a :class:`contextvars.ContextVar`, so they are right under threads and
asyncio alike. The sampler thread cannot read Python objects, so every change of the active
label set is also pushed down to a native per-thread slot (an interned label-set id): samples
taken while the labels are active carry them.

Under asyncio several tasks share a thread, and a task may be suspended inside a ``labels``
block while another runs. :func:`install_asyncio_hook` wraps the event loop's callback runner
(``asyncio.events.Handle._run``) so that every step of every task first pushes *that task's*
label set down to the native slot (only when it differs from what the slot holds, so the common
case costs one context-variable lookup).

Work handed to a thread pool runs in a thread whose native slot knows nothing of the request
that handed it over: a context variable may travel (anyio and ``asyncio.to_thread`` run the
function in a copy of the caller's context, ``loop.run_in_executor`` does not even do that), but
the slot is written only when labels are pushed. So the hand-offs themselves carry the labels:
``anyio.to_thread.run_sync`` (Starlette's ``run_in_threadpool``, i.e. FastAPI's sync endpoints
and dependencies) and ``asyncio``'s ``BaseEventLoop.run_in_executor`` on a thread pool (and so
``asyncio.to_thread``) are wrapped so that the function, in the worker thread, runs with the
label set active where it was handed over — in the context variable and in the worker's native
slot — and the worker's slot gets back what it held before when the function returns, so a
worker going back to its pool (and the next request it serves) keeps nothing of this one. With
no labels active the function is handed over unchanged. A process pool is left alone (its
functions must stay picklable). uvloop's ``Loop.run_in_executor`` is wrapped the same way (its
``set_default_executor`` watched, since uvloop does not show its default executor).

Event loops that are not asyncio's own (uvloop) run task steps without ``Handle._run``, so that
hook cannot see a task switch there. The first label pushed in such a loop's thread installs a
task factory on the loop (wrapping the loop's own factory, if any) that hands each new task a
thin wrapper of its coroutine (:class:`_LabelledSteps`): every step of the task (``send``,
``throw``) runs with the task's label set in the thread's slot and puts back what the slot held
before when it yields, whatever loop calls it. A label set pushed outside such a step (in a task
created before the factory was installed) is not written to the slot: those samples carry no
labels rather than another request's (one warning per loop type when the loop takes no task
factory). Work they hand to a thread pool through anyio keeps its labels.

Greenlets (gevent, eventlet, SQLAlchemy's async bridge) share their thread too, each in its own
context: the first label set written in a thread once greenlet is loaded installs that thread's
switch tracer (:func:`_follow_greenlets`), which puts the incoming greenlet's label set in the
slot at every switch.

The tracker does not import asyncio (or anyio) for that (tens of milliseconds and a few MiB an
app that never uses asyncio should not pay): :func:`enable_asyncio_hook` wraps what is loaded at
once; otherwise the first label pushed arranges for the rest, right away or when the app imports
it (post-import hooks). Until a label is pushed every context's label set is empty, which the
native slot already holds, so nothing is lost by waiting.

Label names. One rule, :func:`label_name_problem`, says which names are label names: the
Prometheus form :data:`LABEL_NAME_FORM` (``[a-zA-Z_][a-zA-Z0-9_]*``), at most
:data:`MAX_LABEL_NAME_LENGTH` characters, not starting with ``__`` (the server's own labels,
``__name__``). The agent keeps a pushed label only if its name passes; the others are dropped
with one warning per name, so that snapshots, stored files and uploads carry the same labels
(a Pyroscope server refuses a whole profile over one bad name). Static tags follow it (the tag
rule of :mod:`middleware.config`), and ``serve`` checks every label name it receives with it
after turning dots into underscores (:mod:`middleware.serve.labels`). The native pprof encoder
applies the same form and ``__`` prefix (``mw_pprof_label_key_ok`` in csrc/mw_pprof.h) to what
reaches it. docs/protocol.md describes the rule on the wire.
"""
from __future__ import annotations

import _thread
import contextvars
import functools
import logging
import re
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "labels", "push_labels", "pop_labels", "current_labels", "install_asyncio_hook",
    "install_asyncio_hook_when_imported", "enable_asyncio_hook", "label_name_problem",
    "LABEL_NAME_FORM", "LABEL_NAME_RE", "MAX_LABEL_NAME_LENGTH",
]

#: The form of a label name (Prometheus' data model).
LABEL_NAME_FORM = "[a-zA-Z_][a-zA-Z0-9_]*"
#: A whole string of that form.
LABEL_NAME_RE = re.compile(f"{LABEL_NAME_FORM}\\Z")
#: The longest label name (Grafana Pyroscope's default limit).
MAX_LABEL_NAME_LENGTH = 1024


def label_name_problem(name: str) -> str | None:
    """None when ``name`` is a label name the profiler writes, uploads and serves; else why not.

    The one label-name rule of the project (see the module's doc): :data:`LABEL_NAME_FORM`, at
    most :data:`MAX_LABEL_NAME_LENGTH` characters, no leading ``__``. The reasons read as the
    end of a sentence (``f"bad label name {name!r}: {problem}"``).
    """
    if not name:
        return "label names must not be empty"
    if len(name) > MAX_LABEL_NAME_LENGTH:
        return f"longer than {MAX_LABEL_NAME_LENGTH} characters"
    if not LABEL_NAME_RE.match(name):
        return f"must match {LABEL_NAME_FORM}"
    if name.startswith("__"):
        return "names starting with '__' are reserved"
    return None


_current: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "middleware_labels", default=()
)
_ids: dict[tuple[tuple[str, str], ...], int] = {}
_RESERVED = {"thread_name", "pid", "task"}
# The sampler's record of label-set ids by value object (asyncio task stacks read a waiting task's
# labels from its context): set by middleware.asyncio_tasks once the sampler reads tasks.
_task_values: Callable[[object, int], None] | None = None


_native_mod: Any | None = None
_native_tried = False


def _native() -> Any | None:
    """The extension module, imported once (None when it is not built: labels stay pure context)."""
    global _native_mod, _native_tried
    if not _native_tried:
        try:
            from middleware import _native as n
        except ImportError:
            _native_mod, _native_tried = None, True
        else:
            _native_mod, _native_tried = n, True
    return _native_mod


class SpanId(str):
    """The value of a ``span_id`` label (16 lowercase hex digits): a request's local root span.

    Span ids are per request, so the label sets that carry one are not interned for the life of
    the process like other label sets: they live in the native registry's recycled span table
    (``mw_labels_intern_span``) for as long as this object does — that is, as long as any context
    (a thread's, a task's, a copy handed to a pool) can still push them — and are released when
    it goes, by its ``_ids`` (a ``_native.SpanSets``: a dict that releases its sets when it is
    deallocated; no Python ``__del__`` runs at each request's end). ``trace_id`` (32 lowercase
    hex digits, or "") is written with the profile (``mw:spans`` comments) so the span's trace
    can be found from the profile.
    """

    __slots__ = ("trace_id", "span_int", "_ids")
    trace_id: str
    span_int: int  # the span id as a number (OpenTelemetry's SpanContext.span_id)
    _ids: dict[int, int]  # base label set's id -> this span's set over it

    def __new__(cls, span_id: str, trace_id: str = "", span_int: int | None = None) -> SpanId:
        self = super().__new__(cls, span_id)
        self.trace_id = trace_id
        self.span_int = int(span_id, 16) if span_int is None else span_int
        n = _native_mod
        self._ids = n.SpanSets() if n is not None else {}
        return self

    def labelset_id(self, pairs: tuple[tuple[str, str], ...]) -> int:
        """The native id of ``pairs`` (which hold this span id): a span set over the other labels."""
        base = tuple(p for p in pairs if p[0] != "span_id" and p[0] != "span_name")
        return self.over(_labelset_id(base), next((v for k, v in pairs if k == "span_name"), ""))

    def over(self, base_id: int, name: str) -> int:
        """The native id of this span (named ``name``) over the label set ``base_id``."""
        lid = self._ids.get(base_id)
        if lid is None:
            n = _native()
            lid = int(n.span_labelset(base_id, str(self), self.trace_id, name)) if n is not None else 0
            if lid == 0:  # the span table is full (counted): the request's other labels still hold
                lid = base_id
            elif type(self._ids) is dict and n is not None:  # made before the extension was loaded: now it releases
                self._ids = n.SpanSets(self._ids)
            self._ids[base_id] = lid
        return lid

    def __reduce__(self) -> tuple[Any, ...]:  # a plain string across processes
        return (str, (str(self),))


_SPAN_ID_RE = re.compile(r"[0-9a-f]{16}\Z")


def _span_of(pairs: tuple[tuple[str, str], ...]) -> SpanId | None:
    for k, v in pairs:
        if k == "span_id":
            return v if isinstance(v, SpanId) else None
    return None


def _labelset_id(pairs: tuple[tuple[str, str], ...]) -> int:
    if not pairs:
        return 0
    lid = _ids.get(pairs)
    if lid is None:
        span = _span_of(pairs)
        if span is not None:  # per request: never kept in _ids
            return span.labelset_id(pairs)
        n = _native()
        lid = int(n.labelset(pairs)) if n is not None else 0
        if lid == 0 and n is not None:
            logger.debug("middleware: label registry full; samples of %r carry no labels", pairs)
        _ids[pairs] = lid
    return lid


def count_request(label: str, value: str) -> None:
    """Counts one request served under ``label=value`` (e.g. ``endpoint=/calculate2/<int:n>``).

    The CPU profile of the window carries the count (a ``mw:requests`` comment), so that the
    window's cost reads per request: ``regress`` and ``serve``'s regression detector compare
    cost per request when both sides have counts. Called by the Flask, WSGI and ASGI
    integrations once per request; one dictionary lookup and a relaxed atomic add.
    """
    n = _native()
    if n is None:
        return
    lid = _labelset_id(((label, value),))
    if lid:
        n.count_request(lid)


def _os_thread_local() -> Any:
    """A thread-local object of the OS thread, even in a process where gevent or eventlet has made
    ``threading.local`` per greenlet (patched before this module is imported): the native slot
    it mirrors is the OS thread's."""
    try:
        if (monkey := sys.modules.get("gevent.monkey")) is not None:
            return monkey.get_original("_thread", "_local")()
        if (patcher := sys.modules.get("eventlet.patcher")) is not None:
            return patcher.original("_thread")._local()
    except Exception:
        logger.debug("middleware: the original thread-local type not found", exc_info=True)
    return _thread._local()


# Per OS thread: .pairs, the label set last pushed to the native slot; .depth > 0 while a step of
# a task followed by _LabelledSteps runs; .greenlets once greenlet switches are followed.
_applied = _os_thread_local()


def _unseen_loop() -> str | None:
    """The type name of the event loop running in this thread when it is not asyncio's own (whose
    task steps the hook sees), e.g. ``uvloop.Loop``; None when no loop runs or it is asyncio's."""
    events = sys.modules.get("asyncio.events")
    if events is None:
        return None
    loop = events._get_running_loop()
    if loop is None:
        return None
    base_events = sys.modules.get("asyncio.base_events")
    if base_events is not None and isinstance(loop, base_events.BaseEventLoop):
        return None
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


_warned_loops: set[str] = set()


def _set_slot(state: dict[str, Any], pairs: tuple[tuple[str, str], ...], lid: int | None = None) -> None:
    """Writes ``pairs`` (whose native id is ``lid`` when known) to this thread's native slot;
    ``state`` is ``_applied.__dict__``."""
    n = _native()
    if n is not None:
        # the calling thread's slot (its kernel id cached in C, looked up again after a fork)
        n.set_labelset_here(_labelset_id(pairs) if lid is None else lid)
    state["pairs"] = pairs
    if "greenlets" not in state and "greenlet" in sys.modules:
        _follow_greenlets(state)


_SPAN_LIDS_MAX = 256


def _follow_greenlets(state: dict[str, Any]) -> None:
    """Makes every greenlet switch in this thread put the incoming greenlet's label set in the
    thread's native slot (``state`` is ``_applied.__dict__``).

    Greenlets (gevent's, eventlet's, SQLAlchemy's async bridge) share their OS thread and each
    runs in its own context (``gr_context``; a greenlet not started yet runs in an empty one), so
    without this the slot keeps the label set of whichever greenlet wrote it last: under a gevent
    worker every request's samples carried the labels of the request that last set them. The
    tracer is the thread's (``greenlet.settrace`` is per thread), installed by the first label
    set written in a thread once greenlet is loaded; a tracer already set is called after it.
    """
    state["greenlets"] = True
    settrace = getattr(sys.modules.get("greenlet"), "settrace", None)
    if settrace is None:
        return
    current, ids, n = _current, _ids, _native()
    previous: Callable[[str, Any], Any] | None = None
    # Label sets with a span id (per request, so not in _ids) met at switches: their ids, which
    # take ~1.6 us to find again. Holding one keeps its request's span set alive until the cache
    # is emptied (when full): at most _SPAN_LIDS_MAX requests' sets, of the span table's 32,768.
    span_lids: dict[tuple[tuple[str, str], ...], int] = {}

    # Kept lean: it runs at every switch of the thread (~0.4 us with a label change, Python 3.11).
    def on_switch(event: str, args: Any) -> None:
        if event == "switch" or event == "throw":
            try:
                ctx = args[1].gr_context
                pairs = () if ctx is None else ctx.get(current, ())
                if state.get("pairs", ()) != pairs:
                    lid = ids.get(pairs) if pairs else 0
                    if lid is None:
                        lid = span_lids.get(pairs)
                        if lid is None:
                            lid = _labelset_id(pairs)
                            if len(span_lids) >= _SPAN_LIDS_MAX:
                                span_lids.clear()
                            span_lids[pairs] = lid
                    if n is not None:
                        n.set_labelset_here(lid)
                    state["pairs"] = pairs
            except Exception:  # labels must never break a switch
                logger.debug("middleware: greenlet switch not followed for labels", exc_info=True)
        if previous is not None:
            previous(event, args)

    try:
        previous = settrace(on_switch)
    except Exception:
        logger.debug("middleware: greenlet switches are not followed for labels", exc_info=True)


class _LabelledSteps:
    """A task's coroutine, each of whose steps runs with the task's labels in the thread's slot.

    Made by the task factory :func:`_follow_task_steps` installs on event loops whose task
    switches ``Handle._run`` does not see (uvloop). The task calls ``send``/``throw`` in its own
    context, so ``_current`` is the task's label set; when the step yields (or ends) the slot
    gets back what it held before. Everything else (``cr_frame``, ``cr_code``... for the task's
    repr and stack) is the wrapped coroutine's.
    """

    __slots__ = ("_coro", "__weakref__")

    def __init__(self, coro: Any) -> None:
        self._coro = coro

    # A step: the slot gets the task's label set (when it differs), and back what it held when
    # the step yields or ends. Kept lean: it runs at every step of every followed task.
    def _step(self, resume: Callable[..., Any], *args: Any) -> Any:
        pairs = _current.get()
        state = _applied.__dict__
        before = state.get("pairs", ())
        depth = state.get("depth", 0)
        state["depth"] = depth + 1
        try:
            if pairs != before:
                _set_slot(state, pairs)
            return resume(*args)
        finally:
            state["depth"] = depth
            if state.get("pairs", ()) != before:
                _set_slot(state, before)

    def send(self, value: Any) -> Any:
        return self._step(self._coro.send, value)

    def throw(self, *args: Any) -> Any:
        return self._step(self._coro.throw, *args)

    def close(self) -> Any:
        return self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> _LabelledSteps:
        return self

    def __await__(self) -> _LabelledSteps:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return repr(self._coro)


def _follow_task_steps(loop: Any = None) -> bool:
    """Installs, on ``loop`` (default: the event loop running in this thread), a task factory
    whose tasks run each step under their own labels (:class:`_LabelledSteps`), around the loop's
    own factory. True when the loop has it (now or already); False when the loop takes no task
    factory."""
    if loop is None:
        events = sys.modules.get("asyncio.events")
        loop = events._get_running_loop() if events is not None else None
    if loop is None:
        return False
    try:
        previous = loop.get_task_factory()
        if getattr(previous, "_mw_labels", False):
            return True
        import asyncio.tasks as tasks  # loaded: a loop exists

        def labelled_task_factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
            if previous is not None:
                return previous(loop, _LabelledSteps(coro), **kwargs)
            return tasks.Task(_LabelledSteps(coro), loop=loop,
                              **{k: v for k, v in kwargs.items() if v is not None})

        labelled_task_factory._mw_labels = True  # type: ignore[attr-defined]
        loop.set_task_factory(labelled_task_factory)
    except Exception:  # a loop without task factories, or one that refuses ours
        logger.debug("middleware: could not install the labels' task factory", exc_info=True)
        return False
    logger.debug("middleware: labels follow the tasks of %s created from now on", type(loop).__name__)
    return True


def _wrap_uvloop(uvloop: Any) -> None:
    """``uvloop.new_event_loop`` (what ``uvloop.run``, its policy and uvicorn call) made to give
    loops whose tasks are followed from their first (see :func:`_follow_task_steps`), and
    ``uvloop.Loop.run_in_executor`` made to carry labels to thread pools as asyncio's does."""
    loop_cls = getattr(uvloop, "Loop", None)
    if loop_cls is not None and hasattr(loop_cls, "run_in_executor"):
        try:
            _wrap_uvloop_executors(loop_cls)
        except (AttributeError, TypeError):  # a uvloop whose Loop takes no attributes
            logger.debug("middleware: uvloop's run_in_executor not wrapped", exc_info=True)
    original = getattr(uvloop, "new_event_loop", None)
    if original is None or getattr(original, "_mw_wrapped", False):
        return

    def new_event_loop(*args: Any, **kwargs: Any) -> Any:
        loop = original(*args, **kwargs)
        _follow_task_steps(loop)
        return loop

    functools.update_wrapper(new_event_loop, original)
    new_event_loop._mw_wrapped = True  # type: ignore[attr-defined]
    uvloop.new_event_loop = new_event_loop


def _apply(pairs: tuple[tuple[str, str], ...], lid: int | None = None) -> None:
    if pairs and not getattr(_applied, "depth", 0) and (loop := _unseen_loop()) is not None:
        # Tasks of this loop switch without a callback the hook sees, so a label set pushed here,
        # outside a step of a task the profiler follows, would stay in the thread's slot while
        # other tasks run: their samples would carry it. Samples of such tasks are left
        # unlabelled instead (never another request's labels); the tasks created from now on are
        # followed step by step.
        if not _follow_task_steps() and loop not in _warned_loops:
            _warned_loops.add(loop)
            from middleware.config import visible_warning

            visible_warning(
                logger, "middleware: labels set in tasks of an event loop whose task switches the profiler "
                "cannot follow (%s: it takes no task factory) are not attached to samples (they would land "
                "on other tasks' samples); work those tasks hand to a thread pool keeps them", loop)
        pairs = ()
        lid = None
    if getattr(_applied, "pairs", None) == pairs:
        return  # the native slot already holds this set
    _set_slot(_applied.__dict__, pairs, lid)


def install_asyncio_hook() -> bool:
    """Makes each asyncio callback (task step) run with its own context's labels, and work handed
    to a thread pool by ``loop.run_in_executor`` / ``asyncio.to_thread`` (and by
    ``anyio.to_thread.run_sync``, if anyio is loaded) run with the labels of the code that handed
    it over. Idempotent.

    Imports asyncio; :func:`install_asyncio_hook_when_imported` waits for the app to do so.
    """
    try:
        from asyncio import base_events, events
    except ImportError:  # pragma: no cover - asyncio is in the stdlib
        return False
    _wrap_handle_run(events)
    _wrap_run_in_executor(base_events)
    anyio_to_thread = sys.modules.get("anyio.to_thread")
    if anyio_to_thread is not None:
        _wrap_anyio_run_sync(anyio_to_thread)
    return True


def install_asyncio_hook_when_imported() -> None:
    """Installs the asyncio and thread-pool hooks now for what is loaded, and for the rest as soon
    as the app imports it (post-import hooks; asyncio and anyio are never imported by this).
    Idempotent."""
    global _asyncio_hook_state
    _asyncio_hook_state = _HOOK_ARRANGED
    from middleware.integrations._post_import import when_imported

    # each fires at once when its module is already loaded
    when_imported("asyncio.events", _wrap_handle_run)
    when_imported("asyncio.base_events", _wrap_run_in_executor)
    when_imported("anyio.to_thread", _wrap_anyio_run_sync)
    when_imported("uvloop", _wrap_uvloop)


# 0: nobody asked for the hooks; 1: asked (tracker started), what is loaded is wrapped, the rest
# arranged at the first label push; 2: installed or waiting for the app's imports.
_HOOK_OFF, _HOOK_ON_FIRST_LABEL, _HOOK_ARRANGED = 0, 1, 2
_asyncio_hook_state = _HOOK_OFF


def enable_asyncio_hook() -> None:
    """What the tracker calls at start: the asyncio and thread-pool hooks, installed now for what
    is loaded, the rest arranged by the first label push (see the module's doc). Idempotent."""
    global _asyncio_hook_state
    if _asyncio_hook_state != _HOOK_OFF:
        return
    _wrap_loaded_asyncio()
    from middleware.integrations._post_import import when_imported

    when_imported("uvloop", _wrap_uvloop)  # loops made from now on follow their tasks
    _asyncio_hook_state = _HOOK_ON_FIRST_LABEL


def _wrap_loaded_asyncio() -> bool:
    """Wraps what is loaded of asyncio (and anyio); True when asyncio's callback runner is."""
    base_events = sys.modules.get("asyncio.base_events")
    if base_events is not None and hasattr(base_events, "BaseEventLoop"):
        _wrap_run_in_executor(base_events)
    anyio_to_thread = sys.modules.get("anyio.to_thread")
    if anyio_to_thread is not None and hasattr(anyio_to_thread, "run_sync"):
        _wrap_anyio_run_sync(anyio_to_thread)
    events = sys.modules.get("asyncio.events")
    if events is None or not hasattr(events, "Handle"):
        return False
    _wrap_handle_run(events)
    return True


def _wrap_handle_run(events: Any) -> None:
    handle = events.Handle
    if getattr(handle._run, "_mw_wrapped", False):
        return
    original = handle._run

    def _run(self: Any) -> None:
        ctx = getattr(self, "_context", None)
        if ctx is not None:
            pairs = ctx.get(_current, ())
            if getattr(_applied, "pairs", ()) != pairs:
                _apply(pairs)
        original(self)

    _run._mw_wrapped = True  # type: ignore[attr-defined]
    handle._run = _run


def clear_labels_when_idle(loop: Any) -> None:
    """Makes ``loop``'s selector put the thread's native slot back to no labels before it waits:
    the slot keeps the last callback's label set after the callback (so that consecutive steps of
    one task cost nothing), and the loop's idle time must not carry a request's labels. Loops
    without a Python selector (uvloop) put the slot back after each task step instead."""
    selector: Any = getattr(loop, "_selector", None)
    original = getattr(selector, "select", None)
    if original is None or getattr(original, "_mw_wrapped", False):
        return

    def select(timeout: float | None = None) -> Any:
        if getattr(_applied, "pairs", ()):
            _apply(())
        return original(timeout)

    select._mw_wrapped = True  # type: ignore[attr-defined]
    try:
        selector.select = select
    except AttributeError:  # a selector that takes no attribute
        logger.debug("middleware: the loop's selector is not followed for labels", exc_info=True)


# -- thread pools ---------------------------------------------------------------------------------
def _carrying_labels(func: Callable[..., Any], pairs: tuple[tuple[str, str], ...]) -> Callable[..., Any]:
    """``func`` made to run, in whatever thread calls it, with the label set ``pairs`` (context
    variable and the thread's native slot); the thread's slot is restored when it returns."""

    def run_with_labels(*args: Any, **kwargs: Any) -> Any:
        before = getattr(_applied, "pairs", ())
        token = _current.set(pairs)
        _apply(pairs)
        try:
            return func(*args, **kwargs)
        finally:
            _current.reset(token)
            _apply(before)

    run_with_labels.__wrapped__ = func  # type: ignore[attr-defined]
    return run_with_labels


def _is_thread_pool(executor: Any) -> bool:
    # No ThreadPoolExecutor exists before concurrent.futures.thread is imported.
    thread = sys.modules.get("concurrent.futures.thread")
    return thread is not None and isinstance(executor, thread.ThreadPoolExecutor)


def _wrap_run_in_executor(base_events: Any) -> None:
    """``loop.run_in_executor(executor, func, *args)`` on a thread pool (``None``: the loop's
    default one, a thread pool unless the app set another kind) carries the caller's labels to
    ``func``; ``asyncio.to_thread`` goes through it too."""
    _wrap_executor_method(base_events.BaseEventLoop, lambda loop: getattr(loop, "_default_executor", None))


def _wrap_executor_method(loop_cls: Any, default_executor: Callable[[Any], Any]) -> None:
    """``loop_cls.run_in_executor`` made to carry the caller's labels to ``func`` when it runs on a
    thread pool; ``default_executor(loop)`` is the executor ``None`` stands for (None: the loop's
    own thread pool)."""
    if getattr(loop_cls.run_in_executor, "_mw_wrapped", False):
        return
    original = loop_cls.run_in_executor
    coroutines = sys.modules.get("asyncio.coroutines")

    def run_in_executor(self: Any, executor: Any, func: Any, *args: Any) -> Any:
        pairs = _current.get()
        if pairs and callable(func):
            pool = executor if executor is not None else default_executor(self)
            if (pool is None or _is_thread_pool(pool)) and not (
                coroutines is not None and (coroutines.iscoroutine(func) or coroutines.iscoroutinefunction(func))
            ):  # (asyncio refuses those in debug mode: leave them to it)
                func = _carrying_labels(func, pairs)
        return original(self, executor, func, *args)

    functools.update_wrapper(run_in_executor, original)
    run_in_executor._mw_wrapped = True  # type: ignore[attr-defined]
    loop_cls.run_in_executor = run_in_executor


#: The default executors set on uvloop loops (uvloop does not show its own): loop -> executor.
_uvloop_default_executors: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _wrap_uvloop_executors(loop_cls: Any) -> None:
    """``uvloop.Loop.run_in_executor`` carries labels like asyncio's; ``set_default_executor`` is
    watched so that a process pool set as the default is left alone."""
    original_set = loop_cls.set_default_executor
    if not getattr(original_set, "_mw_wrapped", False):
        def set_default_executor(self: Any, executor: Any) -> Any:
            result = original_set(self, executor)
            try:
                _uvloop_default_executors[self] = executor
            except TypeError:  # not weak-referenceable: treat its default as unknown
                pass
            return result

        functools.update_wrapper(set_default_executor, original_set)
        set_default_executor._mw_wrapped = True  # type: ignore[attr-defined]
        loop_cls.set_default_executor = set_default_executor
    _wrap_executor_method(loop_cls, lambda loop: _uvloop_default_executors.get(loop))


def _wrap_anyio_run_sync(to_thread: Any) -> None:
    """``anyio.to_thread.run_sync(func, *args, ...)`` (Starlette's ``run_in_threadpool``: FastAPI's
    sync endpoints and dependencies) carries the caller's labels to ``func``."""
    original = getattr(to_thread, "run_sync", None)
    if original is None or getattr(original, "_mw_wrapped", False):
        return

    async def run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
        pairs = _current.get()
        if pairs and callable(func):
            func = _carrying_labels(func, pairs)
        return await original(func, *args, **kwargs)

    functools.update_wrapper(run_sync, original)
    run_sync._mw_wrapped = True  # type: ignore[attr-defined]
    to_thread.run_sync = run_sync


def current_labels() -> dict[str, str]:
    """The labels active in the current context."""
    return dict(_current.get())


_merge_cache: dict[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, object], ...]], tuple[tuple[str, str], ...]] = {}
_MERGE_CACHE_MAX = 4096


_warned_names: set[str] = set()
_WARNED_NAMES_MAX = 256


def _say_dropped(name: str, why: str) -> None:
    """A pushed label the profile will not carry: said once per name (stderr too, by default)."""
    if name in _warned_names or len(_warned_names) >= _WARNED_NAMES_MAX:
        return
    _warned_names.add(name)
    from middleware.config import visible_warning  # config imports this module
    visible_warning(logger, "middleware: ignoring label %r: %s", name[:64], why)


def _merged(current: tuple[tuple[str, str], ...], mapping: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
    merged = dict(current)
    for k, v in mapping.items():
        name = str(k)
        if name in _RESERVED:
            _say_dropped(name, "the profiler sets this label itself")
            continue
        problem = label_name_problem(name)
        if problem is not None:
            _say_dropped(name, f"bad label name: {problem}")
            continue
        if name == "span_id" and not isinstance(v, SpanId) and _SPAN_ID_RE.match(str(v)):
            v = SpanId(str(v))  # per-request: the span table, not the process-long registry
        merged[name] = v if isinstance(v, SpanId) else str(v)
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
        if key is not None and len(_merge_cache) < _MERGE_CACHE_MAX and _span_of(pairs) is None:
            _merge_cache[key] = pairs
    return _push(pairs)


def _push(pairs: tuple[tuple[str, str], ...], lid: int | None = None) -> contextvars.Token[tuple[tuple[str, str], ...]]:
    token = _current.set(pairs)
    if _task_values is not None and pairs:
        if lid is None:
            lid = _labelset_id(pairs)  # once, for the task stacks' table and the slot
        _task_values(pairs, lid)
    _apply(pairs, lid)
    if _asyncio_hook_state == _HOOK_ON_FIRST_LABEL:
        _arrange_asyncio_hook()
    return token


def _arrange_asyncio_hook() -> None:
    try:
        install_asyncio_hook_when_imported()
    except Exception:  # labels must never break the app
        logger.debug("middleware: could not arrange the asyncio label hook", exc_info=True)


def current_span() -> SpanId | None:
    """The ``span_id`` label active in the current context, if it is a :class:`SpanId`."""
    for k, v in _current.get():
        if k == "span_id":
            return v if isinstance(v, SpanId) else None
    return None


def push_span(span_id: SpanId, span_name: str) -> contextvars.Token[tuple[tuple[str, str], ...]]:
    """:func:`push_labels` of ``span_id``/``span_name`` (the OpenTelemetry integration's, once per
    request: no name check nor merge cache, both keys are ours). One function on purpose: it runs
    at every traced request."""
    current = _current.get()
    if current:
        merged = dict(current)
        other_span = "span_id" in merged  # another span's labels: the generic path strips them
        merged["span_id"] = span_id
        merged["span_name"] = span_name
        pairs = tuple(sorted(merged.items()))
        base = -1 if other_span else _ids.get(current)
    else:
        pairs = (("span_id", span_id), ("span_name", span_name))
        base = 0
    token = _current.set(pairs)
    state = _applied.__dict__
    n = _native_mod
    if base is None or base < 0 or n is None or (not state.get("depth") and _unseen_loop() is not None):
        lid = None
        if _task_values is not None:
            lid = _labelset_id(pairs)  # once, for the task stacks' table and the slot
            _task_values(pairs, lid)
        _apply(pairs, lid)  # the general path
    else:
        lid = span_id._ids.get(base)
        if lid is None:
            lid = span_id.over(base, span_name)
        if _task_values is not None:
            _task_values(pairs, lid)
        _set_slot(state, pairs, lid)
    if _asyncio_hook_state == _HOOK_ON_FIRST_LABEL:
        _arrange_asyncio_hook()
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
