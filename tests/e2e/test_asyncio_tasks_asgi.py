"""The wall time of an async service goes to the requests that wait, in their own await chains.

GIVEN a FastAPI app under uvicorn (asyncio's loop, and uvloop) in a child process whose only
profiler code is ``MwTracker()``: an endpoint that awaits ``asyncio.sleep(0.2)`` through a helper
chain, one that gathers three sub-tasks sleeping 0.05/0.1/0.15 s, and one that burns CPU in slices
WHEN 50 client threads send interleaved requests
THEN the waiting requests' wall time (each handler's own perf_counter, summed: the truth) is in the
wall profile under their own endpoint label and their own await chain (``wait_route > wait_helper >
wait_leaf > sleep``; the gathered sub-tasks under ``fan_part > sleep``), at least 95% of it and not
much more; the loop's ``select`` carries no request's label; the CPU endpoint's CPU carries its label.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

from support.asgi_child import run_child

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


CHILD = r"""
import asyncio, faulthandler, json, sys, time
faulthandler.enable()  # a crash says where in the test's output
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from middleware import MwTracker
from support.asgi_child import drive, serve_in_thread, spin

tracker = MwTracker(sample_rate=200, profile_dir="none", native=False, upload=False)
from fastapi import FastAPI

app = FastAPI()
truth = {{"wait": 0.0, "fan": 0.0, "fan_parts": 0.0}}


async def wait_leaf():
    await asyncio.sleep(0.2)


async def wait_helper():
    await wait_leaf()


@app.get("/wait/{{n}}")
async def wait_route(n: int):
    t0 = time.perf_counter()
    await wait_helper()
    truth["wait"] += time.perf_counter() - t0
    return {{}}


async def fan_part(seconds):
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    truth["fan_parts"] += time.perf_counter() - t0


@app.get("/fan/{{n}}")
async def fan_route(n: int):
    t0 = time.perf_counter()
    await asyncio.gather(fan_part(0.05), fan_part(0.1), fan_part(0.15))
    truth["fan"] += time.perf_counter() - t0
    return {{}}


@app.get("/burn/{{n}}")
async def burn_route(n: int):
    for _ in range(4):
        spin(0.002)
        await asyncio.sleep(0)
    return {{}}


server, server_thread, port = serve_in_thread(app, {loop!r})
tracker.snapshot(reset=True)
# 6 rounds: a task's wall is estimated from a rotating slice of the task set (see README), off
# by up to a round of the set at each task's start and end; summed over 300 requests of each route
# the estimate's spread is ~1.1% (wait) and ~1.4% (gathered parts), over 150 it was 1.4-1.9% and
# a run in ~50 fell below the 95% asserted
errors = drive(port, ["/wait/{{}}", "/fan/{{}}", "/burn/{{}}"], clients=50, rounds=6, timeout=60)
profile = tracker.snapshot()
server.should_exit = True
server_thread.join(timeout=20)
from middleware import _native
ci, wi = profile.value_index("cpu"), profile.value_index("wall")
rows = [{{"stack": [f.function for f in s.stack], "labels": dict(s.labels), "cpu": s.values[ci], "wall": s.values[wi]}}
        for s in profile.samples]
with open({out!r}, "w") as f:  # a file: a signal during a large print to a pipe loses its tail (CPython)
    json.dump({{"rows": rows, "truth": truth, "errors": errors, "stats": _native.tasks_stats()}}, f)
tracker.stop()
"""


def tail(stack: list[str], names: list[str]) -> bool:
    """The stack ends with these functions (qualified names compared by their last part)."""
    short = [f.rsplit(".", 1)[-1] for f in stack]
    return short[-len(names):] == names


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("asgi_tasks")
    result = tmp / "result.json"
    run_child(CHILD, request.param, tmp, timeout=180, out=str(result))
    out: dict[str, Any] = json.loads(result.read_text())
    assert out["errors"] == []
    return out


def wall_of(served: dict[str, Any], endpoint: str, chain: list[str]) -> tuple[float, float]:
    """Wall seconds labelled ``endpoint`` in task samples whose stack ends with ``chain``, and wall
    seconds labelled ``endpoint`` in all task samples."""
    own = every = 0
    for r in served["rows"]:
        if r["labels"].get("endpoint") != endpoint or "task" not in r["labels"]:
            continue
        every += r["wall"]
        if tail(r["stack"], chain):
            own += r["wall"]
    return own / 1e9, every / 1e9


def test_waiting_requests_wall_is_under_their_label_and_await_chain(served: dict[str, Any]) -> None:
    truth = served["truth"]["wait"]
    own, every = wall_of(served, "/wait/{n}", ["wait_route", "wait_helper", "wait_leaf", "sleep"])
    assert own >= 0.95 * truth, (own, every, truth, served["stats"])
    assert every <= 1.15 * truth, (own, every, truth)


def test_gathered_sub_tasks_wall_is_under_the_requests_label(served: dict[str, Any]) -> None:
    parts = served["truth"]["fan_parts"]
    own, _ = wall_of(served, "/fan/{n}", ["fan_part", "sleep"])
    assert 0.95 * parts <= own <= 1.15 * parts, (own, parts, served["stats"])
    fan = served["truth"]["fan"]
    waiting, _ = wall_of(served, "/fan/{n}", ["fan_route"])  # the request's task, awaiting the gather
    assert 0.95 * fan <= waiting <= 1.15 * fan, (waiting, fan)


def test_the_loops_select_carries_no_requests_label(served: dict[str, Any]) -> None:
    # not the waiting; a sample in the instant the loop enters its select may (see the native
    # test of the same)
    select = [r for r in served["rows"]
              if r["stack"] and r["stack"][-1].rsplit(".", 1)[-1] in ("select", "poll", "epoll")]
    labelled = sum(r["wall"] for r in select if "endpoint" in r["labels"])
    assert labelled <= 0.02 * sum(r["wall"] for r in select), select


def test_the_cpu_endpoints_cpu_carries_its_label(served: dict[str, Any]) -> None:
    cpu = {}
    for r in served["rows"]:
        if "spin" in {f.rsplit(".", 1)[-1] for f in r["stack"]}:
            ep = r["labels"].get("endpoint", "")
            cpu[ep] = cpu.get(ep, 0) + r["cpu"]
    total = sum(cpu.values())
    assert total > 0.6e9, cpu  # 300 requests x 8 ms
    assert cpu.get("/burn/{n}", 0) >= 0.99 * total, cpu
