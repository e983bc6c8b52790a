"""Asyncio task stacks: the wall time of tasks waiting on an event loop, each in its own await chain
under its own labels, against the truth measured inside the workload
(tests/targets/asyncio_workloads.py, each in a fresh interpreter).

Bands: at 100 Hz a task that waits 0.4 s gets ~40 samples, each standing for its tick's wall time
(measured), so a task's wall is within a few ticks of the truth; shares within 5 points.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.sampler
ROOT = Path(__file__).resolve().parents[2]


def run_asyncio(name: str, *args: str, timeout: float = 180, env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "asyncio_workloads.py"), name, *args],
                              capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              env={**os.environ, **(env or {}), "MW_WORKLOAD_OUT": str(result)})
        assert proc.returncode == 0, f"asyncio workload {name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
        out: dict[str, Any] = json.loads(result.read_text())
        return out


def row_text(r: dict[str, Any]) -> str:
    """A row in full (a dict as an assertion's message is cut at a few hundred characters)."""
    return f"stack {' > '.join(r['stack'])}; labels {r['labels']}; cpu {r['cpu_ns']} ns; wall {r['wall_ns']} ns"


@pytest.fixture(scope="module")
def gathered() -> dict[str, Any]:
    return run_asyncio("gather", "100")


def test_each_waiting_task_gets_its_own_wall_time_in_its_await_chain(gathered: dict[str, Any]) -> None:
    truth = gathered["truth"]
    wall: dict[str, int] = defaultdict(int)
    own: dict[str, int] = defaultdict(int)
    for r in gathered["rows"]:
        task = r["labels"].get("task", "")
        if not task.startswith("task-") or task == "task-burn":
            continue
        k = task[len("task-"):]
        wall[k] += r["wall_ns"]
        if r["labels"].get("endpoint") == f"/{k}" and r["stack"][-4:] == ["handler", "helper", "leaf", "sleep"]:
            own[k] += r["wall_ns"]
    for k in ("a", "b", "c"):
        assert wall[k] / 1e9 == pytest.approx(truth[k], rel=0.15, abs=0.05), (k, dict(wall), truth)
        # the request's waiting time sits under its own label and its own await chain
        assert own[k] >= 0.95 * wall[k], (k, own[k], wall[k])
    total, true_total = sum(wall.values()), sum(truth[k] for k in "abc")
    for k in "abc":
        assert abs(wall[k] / total - truth[k] / true_total) <= 0.05, (k, dict(wall), truth)


@pytest.fixture(scope="module")
def gathered_by_ticks() -> dict[str, Any]:
    """The same workload with every sample taken by the sampler's ticks (no CPU timer): each read
    of the running thread races the labels its loop pushes and pops around every task step."""
    return run_asyncio("gather", "100", env={"MW_PROFILING_CPU_TIMER": "off"})


@pytest.mark.parametrize("run", ["gathered", "gathered_by_ticks"])
def test_task_samples_carry_no_cpu_and_no_other_tasks_labels(run: str, request: pytest.FixtureRequest) -> None:
    # (read after the stack, the labels of a thread whose loop had switched tasks meanwhile left
    # the burning task's samples with no label at all: in about half the runs by ticks)
    gathered = request.getfixturevalue(run)
    burn_cpu = gathered["truth"]["burn_cpu"] * 1e9
    for r in gathered["rows"]:
        task = r["labels"].get("task")
        if task is None:
            continue
        if r["cpu_ns"]:
            # CPU goes to the running task only, on its thread's stack: the burner's (the other
            # tasks run for microseconds between their waits)
            assert task == "task-burn" and "burner" in r["stack"] or r["cpu_ns"] <= 0.03 * burn_cpu, row_text(r)
        assert r["labels"].get("job") == "gather", row_text(r)  # a label pushed before the loop started
        endpoint = r["labels"].get("endpoint")
        if task.startswith("task-") and endpoint is not None:
            assert endpoint == "/" + task[len("task-"):], row_text(r)


def test_the_running_task_keeps_its_cpu_on_its_threads_stack(gathered: dict[str, Any]) -> None:
    rows = [r for r in gathered["rows"] if "burner" in r["stack"] and r["labels"].get("endpoint") == "/burn"]
    burned = sum(r["cpu_ns"] for r in rows)
    truth = gathered["truth"]["burn_cpu"]
    assert burned / 1e9 == pytest.approx(truth, rel=0.2), (burned, truth)
    # under the running task's name, its coroutine straight over the frames that run the loop
    # (or over main, once main awaits it), as its waiting samples are: the loop's own frames
    # between them (_run_once, Handle._run) are not the task's callers
    named = sum(r["cpu_ns"] for r in rows if r["labels"].get("task") == "task-burn")
    assert named >= 0.99 * burned, [(r["labels"].get("task"), r["stack"][-5:], r["cpu_ns"]) for r in rows]
    for r in rows:
        under = r["stack"][r["stack"].index("burner") - 1]
        assert under.endswith(("run_forever", "main")), r["stack"]
    stats = gathered["stats"]
    assert stats["tasks_ready"] == 1 and stats["task_samples"] > 0, stats
    assert stats["tasks_unreadable"] == 0 and stats["task_labels_missed"] == 0, stats


def test_a_task_label_holds_the_tasks_name_and_asyncios_numbered_names_are_one_value(
        gathered: dict[str, Any]) -> None:
    tasks = {r["labels"]["task"] for r in gathered["rows"] if "task" in r["labels"]}
    # the main task of asyncio.run is "Task-1": numbered names are one value (a series each
    # would make one series per request in a backend)
    # (the burner waits only between its slices: it may have no sample of its own)
    assert {"task-a", "task-b", "task-c", "Task"} <= tasks <= {"task-a", "task-b", "task-c", "task-burn", "Task"}, tasks
    # the pprof encoder splits the sample's thread into thread_name and task the same way
    encoded = set(gathered["pprof_labels"])
    assert {f"task={t}" for t in tasks} <= encoded, encoded
    other = [row_text(r) for r in gathered["rows"] if r["labels"].get("thread_name") != "MainThread"]
    assert {x for x in encoded if x.startswith("thread_name=")} == {"thread_name=MainThread"}, f"{encoded} {other}"


def test_the_loop_waiting_in_select_carries_no_tasks_labels(gathered: dict[str, Any]) -> None:
    # The slot is put back to no labels as the loop enters its select, in a wrapper of the
    # selector's select: only a sample taken in the wrapper's check may still carry the last
    # task's labels (the burner yields with sleep(0): the loop passes there thousands of times a
    # second, a tick or two of its 1 s lands in it), never one of the selector waiting.
    rows = [r for r in gathered["rows"] if r["stack"] and r["stack"][-1].endswith("select")]
    check = [r for r in rows if r["stack"][-1].endswith("<locals>.select")]
    select = [r for r in rows if r not in check]
    assert select, "the loop thread's own samples are missing"
    labelled = sum(r["wall_ns"] for r in select if "endpoint" in r["labels"])
    assert labelled <= 0.02 * sum(r["wall_ns"] for r in select), select
    in_check = sum(r["wall_ns"] for r in check if "endpoint" in r["labels"])
    assert in_check <= 0.05 * gathered["truth"]["burn_cpu"] * 1e9, check


def test_a_task_sits_under_the_tasks_awaiting_it() -> None:
    # GIVEN main gathering fan_out (which gathers two child_part tasks), direct (which awaits a
    # child_part task it made), waits (asyncio.wait of two child_part tasks) and, 3.11+, grouped
    # (an asyncio.TaskGroup of two child_part tasks): each child_part waits 0.6 s
    out = run_asyncio("nested", "100")
    parents = ("fan_out", "direct", "waits", "grouped")
    groups = sys.version_info >= (3, 11)  # asyncio.TaskGroup
    under: dict[str, int] = defaultdict(int)
    for r in out["rows"]:
        short = [f.split(".")[-1] for f in r["stack"]]
        if short[-2:] != ["child_part", "sleep"]:
            continue
        at = max((i for i, f in enumerate(short[:-2]) if f in parents), default=-1)
        under[f"{short[at - 1]}>{short[at]}" if at > 0 else "alone"] += r["wall_ns"]
    total = sum(under.values())
    # THEN the children's 0.6 s each of waiting (5, and 7 with the task group) sit under their
    # parents, themselves under main
    children = 7 if groups else 5
    assert total / 1e9 == pytest.approx(0.6 * children, rel=0.15), dict(under)
    assert under["main>fan_out"] / total == pytest.approx(2 / children, abs=0.05), dict(under)
    assert under["main>direct"] / total == pytest.approx(1 / children, abs=0.05), dict(under)
    assert under["main>waits"] / total == pytest.approx(2 / children, abs=0.05), dict(under)
    if groups:
        assert under["main>grouped"] / total == pytest.approx(2 / children, abs=0.05), dict(under)
    assert out["stats"]["task_torn"] <= 2, out["stats"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_running_task_has_its_name_and_its_parents_and_its_own_cpu(loop: str) -> None:
    # GIVEN three tasks burning CPU in slices of 1, 2 and 3 ms on one loop, yielding between
    # slices (each measures its own CPU: the thread's is shared), two gathered by fan and one
    # awaited by solo, both gathered by main; and a task blocking the loop's thread in
    # time.sleep for 0.3 s; at 1 kHz (some 1,100 CPU samples); uvloop imported before the
    # tracker starts (its loop's start is seen by no wrapper: found from the samples)
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    out = run_asyncio("running", "1000", loop)
    truth = out["truth"]
    cpu: dict[str, int] = defaultdict(int)
    spliced: dict[str, int] = defaultdict(int)
    blocked = 0
    for r in out["rows"]:
        short = [f.split(".")[-1] for f in r["stack"]]
        task = r["labels"].get("task", "")
        if "crunch" in short:
            cpu[task] += r["cpu_ns"]
            at = short.index("crunch")
            parent = "fan" if task in ("crunch-x", "crunch-y") else "solo"
            if short[at - 2:at] == ["main", parent] and "_run_once" not in short:
                spliced[task] += r["cpu_ns"]
        if task == "blocker" and short[-2:] == ["main", "blocker"]:
            blocked += r["wall_ns"]
    crunch = ("crunch-x", "crunch-y", "crunch-z")
    # THEN each task's CPU is under its own name, as much as it used
    for k in crunch:
        assert cpu[k] / 1e9 == pytest.approx(truth[k], rel=0.12, abs=0.02), (k, dict(cpu), truth)
    total, true_total = sum(cpu[k] for k in crunch), sum(truth[k] for k in crunch)
    assert sum(cpu.values()) <= total * 1.02, dict(cpu)  # hardly any of it unnamed
    for k in crunch:
        assert abs(cpu[k] / total - truth[k] / true_total) <= 0.05, (k, dict(cpu), truth)
    # under the tasks awaiting it (its thread's stack holds only the loop below it)
    for k in crunch:
        assert spliced[k] >= 0.97 * cpu[k], (k, dict(spliced), dict(cpu))
    # and the time a running task holds the thread (not on CPU) is its own, under its parent
    assert blocked / 1e9 == pytest.approx(truth["blocker"], rel=0.1), (blocked, truth)
    if loop == "uvloop":
        assert out["stats"]["task_loops_found"] == 1, out["stats"]
    # the waiting tasks' wall time is there too: each crunch task waits for its turn while the
    # two others run (and all three while the blocker holds the thread); in the rows of their
    # `sleep` frames, which may hold a CPU sample too (a step ending at its yield was on CPU there:
    # a row with one such sample and a task's whole second of waiting was once left out)
    waiting = sum(r["wall_ns"] for r in out["rows"] if r["labels"].get("task", "").startswith("crunch")
                  and "sleep" in [f.split(".")[-1] for f in r["stack"]])
    assert waiting / 1e9 >= 1.5 * true_total, (waiting, truth)


def test_wait_for_and_thread_offloads_wait_in_their_task_under_its_parent() -> None:
    # GIVEN main gathering timed (asyncio.wait_for of child_part, which waits 0.6 s: in 3.10/3.11
    # wait_for runs it in a task of its own), threaded (asyncio.to_thread of a 0.6 s sleep) and
    # executor (loop.run_in_executor of a 0.6 s sleep)
    out = run_asyncio("offloads", "100")
    wall: dict[str, int] = defaultdict(int)
    for r in out["rows"]:
        short = [f.split(".")[-1] for f in r["stack"]]
        if "task" not in r["labels"] or "main" not in short:
            continue
        under = short[short.index("main") + 1:]
        if under[:1] == ["timed"] and short[-2:] == ["child_part", "sleep"]:
            wall["timed"] += r["wall_ns"]
        elif under[:1] == ["threaded"] and short[-1] == "to_thread":
            wall["threaded"] += r["wall_ns"]
        elif under == ["executor"]:
            wall["executor"] += r["wall_ns"]
    # THEN each one's 0.6 s of waiting is in its await chain, under main (for wait_for, the task it
    # made sits under the task waiting for it)
    for name in ("timed", "threaded", "executor"):
        assert wall[name] / 1e9 == pytest.approx(0.6, rel=0.15), (name, dict(wall), out["stats"])


def test_more_tasks_than_a_tick_looks_at_still_get_their_wall_time() -> None:
    # GIVEN 1,000 tasks each waiting ~2.5 s on an event (timed by each task), at 100 Hz: far more
    # tasks than the walk looks at per tick (MW_TASK_VISITS_SEC = 1,000 a second, 10 a tick)
    out = run_asyncio("many", "1000", "3")
    stats = out["stats"]
    waiting = sum(r["wall_ns"] for r in out["rows"]
                  if "task" in r["labels"] and [f.split(".")[-1] for f in r["stack"]][-2:] == ["many_wait", "wait"])
    # THEN each tick read a slice (about 10 tasks), yet the slices' estimate of the time the tasks
    # spent waiting matches what they timed: each task met stands for the ticks since it was met
    assert stats["task_partial_ticks"] >= 0.8 * stats["ticks"], stats
    assert stats["task_samples"] <= 20 * stats["ticks"], stats
    assert waiting / 1e9 == pytest.approx(out["waited"], rel=0.1), (waiting / 1e9, out["waited"], stats)


@pytest.mark.parametrize("kind", [
    "subclass",
    pytest.param("eager", marks=pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks: 3.12+")),
])
def test_tasks_a_task_factory_makes_get_their_wall_time(kind: str) -> None:
    # GIVEN a loop whose task factory makes a Task subclass (or, 3.12+, eager tasks: run at once
    # until they first wait), and two named tasks waiting 0.4 s and 0.8 s
    out = run_asyncio("factory", kind)
    wall: dict[str, int] = defaultdict(int)
    for r in out["rows"]:
        if [f.split(".")[-1] for f in r["stack"]][-3:] == ["helper", "leaf", "sleep"]:
            wall[r["labels"].get("task", "")] += r["wall_ns"]
    # THEN each task's wait is in its await chain under its name, as for the loop's own tasks
    for name, seconds in out["truth"].items():
        assert wall[name] / 1e9 == pytest.approx(seconds, rel=0.15, abs=0.05), (name, dict(wall), out["stats"])
    assert out["stats"]["tasks_other_types"] == 0, out["stats"]


def test_a_generator_at_a_plain_yield_awaits_nothing() -> None:
    # GIVEN a task whose generator-based coroutine is suspended for 1 s at a bare `yield` with a
    # coroutine object on its value stack (an argument being built), not awaiting it
    out = run_asyncio("plain_yield", "100")
    victim = [r for r in out["rows"] if "task" in r["labels"] and any(f.endswith("victim") for f in r["stack"])]
    # THEN its samples end in the generator: the coroutine on the stack is not taken for an awaitable
    assert sum(r["wall_ns"] for r in victim) > 0.5e9, out["stats"]
    for r in victim:
        assert not any(f.endswith("never_awaited") for f in r["stack"]), r
        assert r["stack"][-1].endswith("yield_with_a_coroutine_on_the_stack"), r


def test_tasks_made_and_cancelled_fast_in_loops_of_many_threads_at_1khz() -> None:
    seconds = os.environ.get("MW_STRESS_SECONDS", "8")
    out = run_asyncio("stress", seconds, "1000", timeout=180 + 2 * float(seconds))
    stats = out["stats"]
    assert out["made"] > 1000 and stats["task_samples"] > 100, stats
    for r in out["rows"]:
        endpoint = r["labels"].get("endpoint")
        if r["labels"].get("task") and endpoint is not None:
            # a task labelled /n<k> waits in nap: its chain is nap's (never another coroutine's)
            assert endpoint.startswith("/n") and any(f.split(".")[-1] == "nap" for f in r["stack"]), (
                f"{' > '.join(r['stack'])} {r['labels']} wall={r['wall_ns']} cpu={r['cpu_ns']} {stats}")
        if "task" in r["labels"]:
            assert r["labels"]["task"] == "Task", r  # unnamed tasks: asyncio's numbered names
