"""Asyncio workloads for the task-stack tests (tests/native/test_task_stacks.py), each run in a
fresh interpreter: ``python asyncio_workloads.py NAME [args]`` prints a JSON report with the truth
measured inside the workload and the profile's rows (stack root first, labels, cpu_ns, wall_ns).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import types
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from middleware import MwTracker  # noqa: E402
from middleware.labels import labels  # noqa: E402


def rows(tracker: MwTracker) -> list[dict[str, Any]]:
    p = tracker.snapshot()
    ci, wi = p.value_index("cpu"), p.value_index("wall")
    return [{"stack": [f.function for f in s.stack], "labels": dict(s.labels),
             "cpu_ns": s.values[ci], "wall_ns": s.values[wi]} for s in p.samples]


def report(tracker: MwTracker, **truth: Any) -> None:
    from middleware import _native
    from middleware.pprof import parse_pprof

    raw = _native.encode_snapshot()
    if os.environ.get("MW_WORKLOAD_PPROF"):  # the encoded profile, for a test that pushes it
        with open(os.environ["MW_WORKLOAD_PPROF"], "wb") as f:
            f.write(raw)
    encoded = parse_pprof(raw)  # the pprof encoder's labels
    pprof_labels = sorted({f"{k}={v}" for s in encoded.samples for k, v in s.labels if k in ("task", "thread_name")})
    tracker.stop()
    out = {"rows": rows(tracker), "stats": {**tracker.stats(), **_native.tasks_stats()},
           "pprof_labels": pprof_labels, **truth}
    if os.environ.get("MW_WORKLOAD_OUT"):  # a file: a signal during a large print to a pipe loses its tail (CPython)
        with open(os.environ["MW_WORKLOAD_OUT"], "w") as f:
            json.dump(out, f)
    else:
        json.dump(out, sys.stdout)


# --- gather: tasks with known sleep times --------------------------------------------------------
async def leaf(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def helper(seconds: float) -> None:
    await leaf(seconds)


async def handler(name: str, seconds: float) -> float:
    with labels(endpoint=f"/{name}"):
        t0 = time.perf_counter()
        await helper(seconds)
        return time.perf_counter() - t0


async def burner(seconds: float) -> float:
    """Burns CPU in slices, yielding to the loop between them (a CPU-bound task among waiters)."""
    with labels(endpoint="/burn"):
        t0 = time.thread_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            x = 0
            for i in range(20000):
                x += i
            await asyncio.sleep(0)
        return time.thread_time() - t0


def gather_workload(rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)
    sleeps = {"a": 0.4, "b": 0.8, "c": 1.6}

    async def main() -> dict[str, float]:
        tasks = {k: asyncio.ensure_future(handler(k, v)) for k, v in sleeps.items()}
        burn = asyncio.ensure_future(burner(1.0))
        for k, t in tasks.items():
            t.set_name(f"task-{k}")
        burn.set_name("task-burn")
        waited = {k: await t for k, t in tasks.items()}
        waited["burn_cpu"] = await burn
        return waited

    with labels(job="gather"):  # pushed before the loop runs: every task's context has it
        truth = asyncio.run(main())
    report(tracker, truth=truth)


# --- nested: tasks under the tasks awaiting them --------------------------------------------------
async def child_part(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def fan_out() -> None:
    await asyncio.gather(child_part(0.6), child_part(0.6))


async def direct() -> None:
    task = asyncio.ensure_future(child_part(0.6))
    await task


async def waits() -> None:
    await asyncio.wait([asyncio.ensure_future(child_part(0.6)), asyncio.ensure_future(child_part(0.6))])


async def grouped() -> None:
    async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]  # 3.11+
        group.create_task(child_part(0.6))
        group.create_task(child_part(0.6))


def nested_workload(rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)

    async def main() -> None:
        await asyncio.gather(fan_out(), direct(), waits(), *([grouped()] if hasattr(asyncio, "TaskGroup") else []))

    asyncio.run(main())
    report(tracker)


# --- offloads: asyncio.wait_for, asyncio.to_thread, loop.run_in_executor -------------------------
async def timed() -> None:
    await asyncio.wait_for(child_part(0.6), 5)  # 3.10/3.11: child_part runs in a task of its own


async def threaded() -> None:
    await asyncio.to_thread(time.sleep, 0.6)


async def executor() -> None:
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.6)


def offloads_workload(rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)

    async def main() -> None:
        await asyncio.gather(timed(), threaded(), executor())

    asyncio.run(main())
    report(tracker)


# --- running: tasks that burn CPU in short slices under their parents, one that blocks the loop --
def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def spin_slices(name: str, total: float, slice_s: float, own: dict[str, float]) -> None:
    while own[name] < total:
        t0 = time.thread_time()
        spin(slice_s)
        own[name] += time.thread_time() - t0  # this task's own CPU: the thread's is shared
        await asyncio.sleep(0)


async def crunch(name: str, total: float, slice_s: float, own: dict[str, float]) -> None:
    await spin_slices(name, total, slice_s, own)


async def fan(own: dict[str, float]) -> None:
    x = asyncio.ensure_future(crunch("crunch-x", 0.5, 0.002, own))
    y = asyncio.ensure_future(crunch("crunch-y", 0.25, 0.001, own))
    x.set_name("crunch-x")
    y.set_name("crunch-y")
    await asyncio.gather(x, y)


async def solo(own: dict[str, float]) -> None:
    z = asyncio.ensure_future(crunch("crunch-z", 0.35, 0.003, own))
    z.set_name("crunch-z")
    await z


async def blocker(own: dict[str, float]) -> None:
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    time.sleep(0.3)  # blocks the loop's thread inside the task
    own["blocker"] = time.perf_counter() - t0


def running_workload(rate: int, loop: str = "asyncio") -> None:
    # uvloop: imported before the tracker starts, so no wrapper sees its loop start (uvloop calls
    # asyncio's _set_running_loop through its own reference): the sampler finds it
    run: Any = asyncio.run
    if loop == "uvloop":
        import uvloop

        run = uvloop.run
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)
    own = {"crunch-x": 0.0, "crunch-y": 0.0, "crunch-z": 0.0, "blocker": 0.0}

    async def main() -> None:
        b = asyncio.ensure_future(blocker(own))
        b.set_name("blocker")
        await asyncio.gather(fan(own), solo(own), b)

    run(main())
    report(tracker, truth=own)


# --- burn: the sampler's cost per CPU sample, burning in tasks under parents or in a plain loop --
def burn_workload(mode: str, seconds: float, rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)
    own = {"a": 0.0, "b": 0.0}

    async def slices(name: str) -> None:  # 2 ms of CPU, then the other task's turn
        while time.perf_counter() < end:
            await spin_slices(name, own[name] + 0.002, 0.002, own)

    async def parent() -> None:
        await asyncio.gather(slices("a"), slices("b"))

    time.sleep(0.2)  # start-up settled
    s0, t0 = tracker.stats(), time.perf_counter()
    end = t0 + seconds
    if mode == "task":
        asyncio.run(parent())
    else:
        while time.perf_counter() < end:
            spin(0.002)
    s1, t1 = tracker.stats(), time.perf_counter()
    report(tracker, sampler_ns=s1["sampler_cpu_ns"] - s0["sampler_cpu_ns"],
           cpu_samples=s1["cpu_samples"] - s0["cpu_samples"], wall=t1 - t0)


# --- a generator suspended at a plain yield with a coroutine on its value stack -----------------
async def never_awaited() -> None:
    return None


@types.coroutine
def yield_with_a_coroutine_on_the_stack(coro: Any) -> Any:
    # suspended at the bare yield while `coro` waits on the value stack as an argument being built:
    # the generator awaits nothing (its task only gave the loop a turn)
    return (lambda c, _: c.close())(coro, (yield))


def plain_yield_workload(rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)

    async def victim() -> None:
        await yield_with_a_coroutine_on_the_stack(never_awaited())

    async def main() -> None:
        task = asyncio.ensure_future(victim())
        await asyncio.sleep(0)  # the victim runs to its bare yield and is scheduled again
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:  # the loop is held: the victim waits at its yield
            pass
        await task

    asyncio.run(main())
    report(tracker)


# --- stress: tasks made and cancelled at a high rate, loops opened and closed in threads ---------
def stress_workload(seconds: float, rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)
    stop = time.monotonic() + seconds
    made = [0]

    async def nap(i: int) -> None:
        with labels(endpoint=f"/n{i % 7}"):
            await asyncio.sleep(0.001 * (i % 5))

    async def churn() -> None:
        i = 0
        while time.monotonic() < stop:
            batch = [asyncio.ensure_future(nap(i + k)) for k in range(50)]
            for t in batch[::3]:
                t.cancel()
            await asyncio.gather(*batch, return_exceptions=True)
            i += 50
            made[0] += 50

    async def batch() -> None:
        await asyncio.wait_for(asyncio.gather(*(nap(k) for k in range(20))), 5)
        if hasattr(asyncio, "TaskGroup"):  # 3.11+: tasks under the task waiting in the group's exit
            async with asyncio.TaskGroup() as group:
                for k in range(20):
                    group.create_task(nap(k))

    def loop_thread() -> None:
        while time.monotonic() < stop:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(batch())
            loop.close()

    threads = [threading.Thread(target=loop_thread, name=f"loops-{k}") for k in range(2)]
    for t in threads:
        t.start()
    asyncio.run(churn())
    for t in threads:
        t.join()
    report(tracker, made=made[0])


# --- many pending tasks (the cost of the walk) ---------------------------------------------------
def pending_workload(ntasks: int, seconds: float, rate: int) -> None:
    tracker = MwTracker(sample_rate=rate, wall_rate=rate, profile_dir="none", instrument=False)

    async def main() -> float:
        blocker = asyncio.Event()
        tasks = [asyncio.ensure_future(helper_wait(blocker)) for _ in range(ntasks)]
        await asyncio.sleep(0.2)
        from middleware import _native

        c0 = tracker.stats()["sampler_cpu_ns"]
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        cpu = (tracker.stats()["sampler_cpu_ns"] - c0) / 1e9 / (time.monotonic() - t0)
        _ = _native
        blocker.set()
        await asyncio.gather(*tasks)
        return cpu

    async def helper_wait(ev: asyncio.Event) -> None:
        await ev.wait()

    share = asyncio.run(main())
    report(tracker, sampler_core_share=share)


# --- factories: tasks made by a task factory (a Task subclass; 3.12+ eager tasks) ----------------
class CountingTask(asyncio.Task):  # type: ignore[type-arg]
    """A Task subclass, as task factories make (same C layout in front, a __dict__ behind)."""

    made = 0


def factory_workload(kind: str) -> None:
    tracker = MwTracker(sample_rate=100, wall_rate=100, profile_dir="none", instrument=False)
    truth = {"task-short": 0.4, "task-long": 0.8}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "subclass":
            loop.set_task_factory(lambda loop, coro, **kw: CountingTask(coro, loop=loop, **kw))
        else:
            loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        tasks = [asyncio.create_task(handler(name[len("task-"):], s), name=name) for name, s in truth.items()]
        await asyncio.gather(*tasks)
        types = {type(t).__name__ for t in tasks}
        assert types == ({"CountingTask"} if kind == "subclass" else {"Task"}), types

    asyncio.run(main())
    report(tracker, truth=truth)


# --- many: more tasks than the walk looks at per tick, each timing its own wait --------------------
def many_workload(ntasks: int, seconds: float) -> None:
    tracker = MwTracker(sample_rate=100, wall_rate=100, profile_dir="none", instrument=False)
    waited: list[float] = []

    async def many_wait(ev: asyncio.Event) -> None:
        t0 = time.perf_counter()
        await ev.wait()
        waited.append(time.perf_counter() - t0)

    async def many_helper(ev: asyncio.Event, offset: float) -> None:
        await asyncio.sleep(offset)  # starts spread over 0.5 s: the walk's phase is not theirs
        await many_wait(ev)

    async def main() -> None:
        ev = asyncio.Event()
        tasks = [asyncio.ensure_future(many_helper(ev, 0.5 * i / ntasks)) for i in range(ntasks)]
        await asyncio.sleep(seconds)
        ev.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    report(tracker, waited=sum(waited), ntasks=ntasks)


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    if name == "gather":
        gather_workload(int(args[0]) if args else 100)
    elif name == "plain_yield":
        plain_yield_workload(int(args[0]) if args else 100)
    elif name == "nested":
        nested_workload(int(args[0]) if args else 100)
    elif name == "burn":
        burn_workload(args[0], float(args[1]), int(args[2]))
    elif name == "running":
        running_workload(int(args[0]), *args[1:])
    elif name == "offloads":
        offloads_workload(int(args[0]) if args else 100)
    elif name == "stress":
        stress_workload(float(args[0]), int(args[1]))
    elif name == "factory":
        factory_workload(args[0])
    elif name == "many":
        many_workload(int(args[0]), float(args[1]))
    elif name == "pending":
        pending_workload(int(args[0]), float(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown workload {name}")
