"""Labels under an event loop that is not asyncio's own (uvloop): the task factory the labels
install makes every step of every task hold that task's label set in the thread's native slot,
and only during the step.

GIVEN a uvloop loop followed by the labels' task factory (as the tracker arranges for loops that
``uvloop.new_event_loop`` makes, or at the first label pushed)
WHEN tasks with different labels interleave at every await (sleep(0), a cancelled wait, an
exception, a loop callback between their steps)
THEN at each step the slot holds the running task's labels, between steps what it held before,
the loop's own task factory still makes the tasks, and the task's repr, stack and result are
those of its coroutine.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from middleware import labels as mw_labels

pytestmark = pytest.mark.unit
uvloop = pytest.importorskip("uvloop")


def slot() -> tuple[tuple[str, str], ...]:
    """The label set last written to this thread's native slot."""
    return getattr(mw_labels._applied, "pairs", ())


def test_each_step_holds_its_own_tasks_labels_and_only_during_the_step() -> None:
    loop = uvloop.new_event_loop()
    seen: dict[str, list[Any]] = {"a": [], "b": [], "between": []}

    async def job(name: str) -> str:
        with mw_labels.labels(job=name):
            for _ in range(5):
                seen[name].append(slot())
                loop.call_soon(lambda: seen["between"].append(slot()))
                await asyncio.sleep(0)
        return name

    async def main() -> list[str]:
        return list(await asyncio.gather(job("a"), job("b")))

    try:
        assert mw_labels._follow_task_steps(loop)
        assert mw_labels._follow_task_steps(loop)  # once only
        assert loop.run_until_complete(main()) == ["a", "b"]
    finally:
        loop.close()
    assert seen["a"] == [(("job", "a"),)] * 5 and seen["b"] == [(("job", "b"),)] * 5, seen
    assert seen["between"] and set(seen["between"]) == {()}, seen["between"]
    assert slot() == ()


def test_cancellation_exceptions_repr_and_the_loops_own_factory_pass_through() -> None:
    loop = uvloop.new_event_loop()
    made: list[Any] = []

    def own_factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
        task = asyncio.Task(coro, loop=loop, **{k: v for k, v in kwargs.items() if v is not None})
        made.append(task)
        return task

    loop.set_task_factory(own_factory)
    slots_at_cancel: list[Any] = []

    async def waits() -> None:
        with mw_labels.labels(job="waits"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                slots_at_cancel.append(slot())
                raise

    async def fails() -> None:
        with mw_labels.labels(job="fails"):
            await asyncio.sleep(0)
            raise ValueError("boom")

    async def main() -> None:
        w = asyncio.ensure_future(waits())
        await asyncio.sleep(0)
        assert "waits" in repr(w) and w.get_stack(), repr(w)
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        with pytest.raises(ValueError, match="boom"):
            await asyncio.ensure_future(fails())

    try:
        assert mw_labels._follow_task_steps(loop)
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert slots_at_cancel == [(("job", "waits"),)]
    assert len(made) == 3  # main and its two tasks: the loop's own factory made them all
    assert slot() == ()


def test_uvloop_new_event_loop_is_wrapped_to_follow_its_loops() -> None:
    mw_labels._wrap_uvloop(uvloop)
    loop = uvloop.new_event_loop()
    try:
        assert getattr(loop.get_task_factory(), "_mw_labels", False)
    finally:
        loop.close()


def test_uvloop_run_in_executor_and_to_thread_carry_the_labels_to_thread_pools_only() -> None:
    import concurrent.futures as cf
    import threading

    mw_labels._wrap_uvloop(uvloop)
    loop = uvloop.new_event_loop()
    in_worker: list[Any] = []

    def probe() -> None:
        in_worker.append((threading.current_thread() is not threading.main_thread(), slot(),
                          mw_labels.current_labels()))

    class Inline(cf.Executor):
        """Not a thread pool (as a process pool): its functions must reach it unwrapped."""

        def __init__(self) -> None:
            self.got: list[Any] = []

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
            self.got.append(fn)
            f: cf.Future[Any] = cf.Future()
            f.set_result(None)
            return f

    inline = Inline()

    async def main() -> None:
        with mw_labels.labels(job="offload"):
            await loop.run_in_executor(None, probe)  # uvloop's own default: a thread pool
            await asyncio.to_thread(probe)
            await loop.run_in_executor(inline, probe)
            loop.set_default_executor(inline)
            await loop.run_in_executor(None, probe)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert in_worker == [(True, (("job", "offload"),), {"job": "offload"})] * 2, in_worker
    assert inline.got == [probe, probe]
