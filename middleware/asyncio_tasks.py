"""Asyncio task stacks: the sampler also reads each event loop's waiting tasks.

A thread running an event loop shows, at any instant, only the task running then; a request
awaiting a database sits on no thread's stack, so without this the wall profile of an async
service is mostly the loop's ``select``. The sampler (``csrc/mw_tasks.c``) reads, without the
GIL, the task set asyncio keeps (a WeakSet of every task), and gives each task of a followed loop
that is not running a wall-time sample: its await chain (``handler > helper > sleep``) under the
chains of the tasks awaiting it (``await task``, ``asyncio.gather``, ``asyncio.wait``), over the
frames its thread had when the loop started, with the task's own labels (read from the task's context) and a
``task`` label holding its name (asyncio's numbered names as one value, ``Task``). The running
task is on its thread's stack, so its samples (CPU and wall) are the thread's own; the sampler
finds which task that is (from the outermost coroutine on the stack: ``_current_tasks``) and gives
them the task's name and its parents' chains in place of the loop's callback frames.

What this module does, with the GIL: teaches the sampler the layout of asyncio's C ``Task`` once
asyncio is loaded (a task made for the purpose, never run), and tells it which loop runs in which
thread: ``asyncio.events._set_running_loop`` (what every loop calls when it starts and stops
running) is wrapped, and so is the package's re-export of it. A loop already running where the
tracker starts is registered then. A loop none of this sees (uvloop keeps its own reference to
``_set_running_loop``, so a uvloop imported before the tracker starts; a loop already running in
another thread) is found by the sampler from its samples (``_native.tasks_stats()``:
``task_loops_found``).
Tasks of other Task types (pure-Python tasks, eager tasks of 3.12+ until they first suspend) are
not read: counted in ``stats()`` (``tasks_other_types``).
"""
from __future__ import annotations

import logging
import sys
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

_CO_COROUTINE = 0x0080
_CO_ITERABLE_COROUTINE = 0x0100
_CO_ASYNC_GENERATOR = 0x0200
_ASYNC_FLAGS = _CO_COROUTINE | _CO_ITERABLE_COROUTINE | _CO_ASYNC_GENERATOR
_BASE_MAX = 48

_enabled = False
_set_up = False
_failed = False  # the layout was not the expected one: not tried again


def _native() -> Any | None:
    from middleware.labels import _native as native

    return native()


def _base_frames(frame: FrameType | None) -> list[tuple[Any, int]]:
    """(code, instruction index) of frame and its callers, innermost first, from the outermost
    coroutine frame's caller down (a loop's tasks sit over what runs the loop)."""
    chain: list[FrameType] = []
    while frame is not None:
        chain.append(frame)
        frame = frame.f_back
    # outermost first: keep frames until the first coroutine's
    kept: list[FrameType] = []
    for f in reversed(chain):
        if f.f_code.co_flags & _ASYNC_FLAGS:
            break
        kept.append(f)
    kept.reverse()
    return [(f.f_code, max(f.f_lasti, 0) // 2) for f in kept[:_BASE_MAX]]


class _ProbeLoop:
    """Enough of a loop for a Task to be made (it is never run)."""

    def get_debug(self) -> bool:
        return False

    def call_soon(self, *args: Any, **kwargs: Any) -> None:
        return None


def _setup(native: Any) -> bool:
    """Teaches the sampler the C Task's layout and where the tasks are. Once."""
    global _set_up, _failed
    if _set_up or _failed:
        return _set_up
    import contextvars

    from middleware import labels

    tasks = sys.modules.get("asyncio.tasks")
    if tasks is None:
        return False
    _failed = True  # until it succeeds
    task_type = getattr(tasks, "_CTask", None)
    if task_type is None or tasks.Task is not task_type:
        _off("asyncio runs without its C Task")
        return False
    weak = getattr(tasks, "_scheduled_tasks", None)
    if weak is None:
        weak = getattr(tasks, "_all_tasks", None)
    data = getattr(weak, "data", None)
    if not isinstance(data, set):
        _off("asyncio's task set is not where it is expected")
        return False

    async def probe() -> None:  # never run
        return None

    coro = probe()
    name = "middleware-task-probe"
    loop = _ProbeLoop()
    try:
        task = task_type(coro, loop=loop, name=name)
    except Exception as e:  # a Task that needs more of a loop: no task stacks
        coro.close()
        _off(f"a task could not be made to learn its layout ({type(e).__name__}: {e})")
        return False
    try:
        one = contextvars.Context()
        one.run(labels._current.set, ())
        many = contextvars.Context()
        probe_vars: list[contextvars.ContextVar[int]] = [
            contextvars.ContextVar(f"middleware_probe_{i}") for i in range(64)]
        for v in probe_vars:
            many.run(v.set, 1)
        ok = bool(native.tasks_setup(
            task, coro, loop, name, data, labels._current, one, many,
            steps_type=labels._LabelledSteps, steps_slot=labels._LabelledSteps.__dict__["_coro"],
            joins=_join_callbacks(tasks), groups=_group_codes(), release=_release_waiter(tasks),
            current=_current_tasks(tasks), loop_codes=_loop_codes()))
    finally:
        task._log_destroy_pending = False
        coro.close()
        del task
    if not ok:
        _off("asyncio's Task layout is not the expected one")
        return False
    _set_up, _failed = True, False
    return True


def _off(why: str) -> None:
    from middleware.config import visible_warning

    visible_warning(logger, "middleware: asyncio task stacks are off (%s): the wall time of waiting "
                    "tasks is not in the profile (the running task's is)", why)


def _join_callbacks(tasks: Any) -> tuple[tuple[Any, int], ...]:
    """The done-callbacks asyncio.gather and asyncio.wait put on each task they await, as (code,
    index in its closure of the future the awaiting task awaits: gather's ``outer``, wait's
    ``waiter``): how such a task's parent is found. A helper not shaped so is left out (its tasks
    are then not put under their parent)."""
    found = []
    for helper, callback, cell in (("gather", "_done_callback", "outer"), ("_wait", "_on_completion", "waiter")):
        code = getattr(getattr(tasks, helper, None), "__code__", None)
        for const in getattr(code, "co_consts", ()):
            if getattr(const, "co_name", None) == callback and cell in const.co_freevars:
                found.append((const, const.co_freevars.index(cell)))
                break
        else:
            logger.debug("asyncio.%s has no %s callback: its tasks are not put under their parent", helper,
                         callback)
    return tuple(found)


def _release_waiter(tasks: Any) -> tuple[Any, Any] | None:
    """(functools.partial, asyncio.tasks._release_waiter): asyncio.wait_for (3.10/3.11) puts such a
    partial on the task it waits for, bound to the future the waiting task awaits. None when
    asyncio has no such function."""
    import functools
    import types

    release = getattr(tasks, "_release_waiter", None)
    return (functools.partial, release) if isinstance(release, types.FunctionType) else None


def _current_tasks(tasks: Any) -> dict[Any, Any] | None:
    """asyncio's dict of the task each running loop runs now (3.10 to 3.13: ``_current_tasks``,
    the C module's): how the sampler finds which task a thread's stack is running, for its name and
    its parents. None when absent (the running task's samples are then the thread's alone)."""
    current = getattr(tasks, "_current_tasks", None)
    return current if type(current) is dict else None


def _loop_codes() -> tuple[Any, ...]:
    """The code of asyncio's own frames between a running task's coroutine and the loop's run
    (``Handle._run``, ``BaseEventLoop._run_once``): left out of the frames under a loop found from
    a thread's sample (a loop whose start was not seen)."""
    events, base = sys.modules.get("asyncio.events"), sys.modules.get("asyncio.base_events")
    found = (getattr(getattr(getattr(events, "Handle", None), "_run", None), "__code__", None),
             getattr(getattr(getattr(base, "BaseEventLoop", None), "_run_once", None), "__code__", None))
    return tuple(c for c in found if c is not None)


def _group_codes() -> tuple[Any, tuple[Any, ...]] | None:
    """asyncio.TaskGroup's (3.11+) done-callback on its tasks and the coroutines in which the task
    of the ``async with`` waits for them (``__aexit__``; 3.13: also ``_aexit``, where the wait is),
    as code objects: how a group's task is put under the task waiting for it. None when there is
    no TaskGroup or it is not shaped so."""
    group = getattr(sys.modules.get("asyncio.taskgroups"), "TaskGroup", None)
    done = getattr(getattr(group, "_on_task_done", None), "__code__", None)
    waits = tuple(code for name in ("__aexit__", "_aexit")
                  if (code := getattr(getattr(group, name, None), "__code__", None)) is not None
                  and code.co_varnames[:1] == ("self",))
    if done is None or not waits:
        if group is not None:
            logger.debug("asyncio.TaskGroup is not shaped as expected: its tasks are not put under their owner")
        return None
    return done, waits


def _register(loop: Any, frame: FrameType | None) -> None:
    if loop is not None:
        from middleware.labels import clear_labels_when_idle

        clear_labels_when_idle(loop)
    native = _native()
    if native is None or not _setup(native):
        return
    tid = threading.get_native_id()
    if loop is None:
        native.tasks_loop(tid, None, ())
    elif not native.tasks_loop(tid, loop, _base_frames(frame)):
        from middleware.config import visible_warning

        visible_warning(logger, "middleware: more event loops run at once than the sampler follows (64): "
                        "the waiting tasks of the others are not in the profile (tasks_stats: task_loops_refused)")


def _wrap_set_running_loop(module: Any) -> None:
    original = getattr(module, "_set_running_loop", None)
    if original is None or getattr(original, "_mw_wrapped", False):
        return

    def _set_running_loop(loop: Any) -> None:
        original(loop)
        try:
            frame = sys._getframe(1) if loop is not None else None
            if frame is not None and frame.f_code.co_name == "_run_forever_setup":
                frame = frame.f_back  # 3.13: a helper of run_forever, gone once the loop runs
            _register(loop, frame)
        except Exception:  # the app's loop must start whatever happens here
            logger.debug("middleware: event loop not registered for task stacks", exc_info=True)

    _set_running_loop._mw_wrapped = True  # type: ignore[attr-defined]
    _set_running_loop.__wrapped__ = original  # type: ignore[attr-defined]
    module._set_running_loop = _set_running_loop


def _on_asyncio(events: Any) -> None:
    _wrap_set_running_loop(events)
    package = sys.modules.get("asyncio")
    if package is not None and getattr(package, "_set_running_loop", None) is not None:
        _wrap_set_running_loop(package)
    loop = events._get_running_loop()
    if loop is not None:  # started inside a running loop (e.g. an app imported by uvicorn)
        _register(loop, sys._getframe(1))


def enable() -> None:
    """Follows the event loops of this process from now on (those started later, and one running
    in this thread now). Idempotent; asyncio is never imported by this."""
    global _enabled
    if _enabled:
        return
    _enabled = True
    native = _native()
    if native is not None:
        from middleware import labels

        # every label set pushed from now on can be found from a task's context
        labels._task_values = native.tasks_label_value
    from middleware.integrations._post_import import when_imported

    when_imported("asyncio.events", _on_asyncio_safely)
    # set up once the package is whole (a loop may run whose start no wrapper sees: found from
    # the sampler's samples, which needs the layouts learnt)
    when_imported("asyncio", _setup_safely)


def _setup_safely(_package: Any) -> None:
    native = _native()
    try:
        if native is not None:
            _setup(native)
    except Exception:
        logger.debug("middleware: asyncio task stacks not set up", exc_info=True)


def _on_asyncio_safely(events: Any) -> None:
    try:
        _on_asyncio(events)
    except Exception:
        logger.debug("middleware: asyncio task stacks not set up", exc_info=True)


def after_fork_in_child() -> None:
    """A forked child's loop table starts empty: the loop running in this thread (if any) is
    registered again."""
    events = sys.modules.get("asyncio.events")
    if not _enabled or events is None:
        return
    loop = events._get_running_loop()
    if loop is not None:
        _register(loop, sys._getframe(1))

