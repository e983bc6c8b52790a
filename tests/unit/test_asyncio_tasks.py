"""middleware.asyncio_tasks in process: what it tells the sampler, and what it says when it cannot.

- The frames under a loop's tasks are the thread's frames up to the first coroutine's.
- An asyncio without its C Task (or whose layout is not understood) turns task stacks off with one
  visible warning, and is not probed again at every loop start.
- The loop's selector puts the thread's label slot back to no labels before it waits.
- A loop the sampler cannot follow (its table full) is said once.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import types
from typing import Any

import pytest

from middleware import asyncio_tasks
from middleware import labels as mw_labels

pytestmark = pytest.mark.unit


def test_the_frames_under_a_loop_stop_at_the_first_coroutine() -> None:
    seen: list[list[str]] = []

    async def handler() -> None:
        seen.append([code.co_name for code, _ in asyncio_tasks._base_frames(sys._getframe())])

    def runner() -> None:
        asyncio.run(handler())

    runner()
    names = seen[0]
    assert names[0] != "handler" and "runner" in names, names  # innermost first, no coroutine
    assert "test_the_frames_under_a_loop_stop_at_the_first_coroutine" in names


def test_an_asyncio_without_its_c_task_turns_task_stacks_off_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake = types.ModuleType("asyncio.tasks")

    class Task:  # a pure-Python Task: the sampler cannot read it
        pass

    fake.Task = Task  # type: ignore[attr-defined]
    fake._CTask = None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "asyncio.tasks", fake)
    monkeypatch.setattr(asyncio_tasks, "_set_up", False)
    monkeypatch.setattr(asyncio_tasks, "_failed", False)
    monkeypatch.setenv("MW_PROFILING_QUIET", "1")
    calls: list[Any] = []
    native = types.SimpleNamespace(tasks_setup=lambda *a, **k: calls.append(a) or True)
    with caplog.at_level(logging.WARNING, logger="middleware"):
        assert asyncio_tasks._setup(native) is False
        assert asyncio_tasks._setup(native) is False  # not tried again
    warnings = [r.getMessage() for r in caplog.records if "task stacks are off" in r.getMessage()]
    assert len(warnings) == 1 and "without its C Task" in warnings[0], warnings
    assert calls == []


def test_the_loops_selector_clears_the_label_slot_before_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[object] = []
    monkeypatch.setattr(mw_labels, "_set_slot",
                        lambda state, pairs, lid=None: (events.append(pairs), state.__setitem__("pairs", pairs)))
    loop = asyncio.new_event_loop()
    try:
        mw_labels.clear_labels_when_idle(loop)
        mw_labels.clear_labels_when_idle(loop)  # idempotent

        async def labelled() -> None:
            with mw_labels.labels(endpoint="/x"):
                await asyncio.sleep(0.01)  # the loop waits in its selector meanwhile
                events.append("resumed")

        loop.run_until_complete(labelled())
    finally:
        loop.close()
        mw_labels._applied.__dict__.pop("pairs", None)
    # pushed, then put back to none by the selector while the task still waited in its labels block
    pushed = events.index((("endpoint", "/x"),))
    assert () in events[pushed:events.index("resumed")], events


def test_a_loop_the_sampler_cannot_follow_is_said_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    native = types.SimpleNamespace(tasks_loop=lambda tid, loop, frames: False)
    monkeypatch.setattr(asyncio_tasks, "_native", lambda: native)
    monkeypatch.setattr(asyncio_tasks, "_setup", lambda n: True)
    monkeypatch.setenv("MW_PROFILING_QUIET", "1")
    with caplog.at_level(logging.WARNING, logger="middleware"):
        asyncio_tasks._register(object(), sys._getframe())
    assert any("more event loops run at once" in r.getMessage() for r in caplog.records), caplog.records
