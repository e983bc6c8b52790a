"""Labels set in async endpoints land on their own request's samples, on asyncio's loop and on uvloop.

GIVEN a FastAPI app under uvicorn in a child process, whose ASGI middleware labels each request
``endpoint=<path>``, with two async endpoints that burn CPU in slices and yield to the loop
between slices (so the tasks of concurrent requests interleave on the loop's thread), and one
sync endpoint (run in anyio's thread pool)
WHEN client threads send interleaved concurrent requests
THEN on asyncio's loop (whose callback runner the profiler hooks) and on uvloop (whose loops get
a task factory that runs each task step under the task's labels) alike, nearly all of each async
endpoint's CPU carries its own label and never another route's, with no warning; a loop made
before the tracker started (the factory installed at the first label pushed) labels the tasks
created from then on; and the sync endpoint's work, handed to a worker thread, keeps its label.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.asgi_child import run_child

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
ASYNC_ROUTES = ("/alpha", "/beta")
SYNC_ROUTE = "/gamma"

CHILD = r"""
import asyncio, json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from middleware import MwTracker
from middleware.labels import labels
from support.asgi_child import EndpointLabels, cpu_by_route_label, drive, serve_in_thread, spin

tracker = MwTracker(sample_rate=400, profile_dir="none", instrument=False, native=False, upload=False)
from fastapi import FastAPI

SLICE_S = 0.002
SLICES = 6


async def work_alpha():
    for _ in range(SLICES):
        spin(SLICE_S)
        await asyncio.sleep(0)  # another request's task runs here


async def work_beta():
    for _ in range(SLICES):
        spin(SLICE_S)
        await asyncio.sleep(0)


def work_gamma():
    spin(SLICE_S * SLICES)


app = FastAPI()


@app.get("/alpha")
async def alpha():
    await work_alpha()
    return {{}}


@app.get("/beta")
async def beta():
    await work_beta()
    return {{}}


@app.get("/gamma")
def gamma():
    work_gamma()
    return {{}}


server, server_thread, port = serve_in_thread(EndpointLabels(app, labels), {loop!r})
tracker.snapshot(reset=True)
errors = drive(port, {routes!r}, clients=6, rounds=15)
profile = tracker.snapshot()
server.should_exit = True
server_thread.join(timeout=20)
by_route, _ = cpu_by_route_label(profile, {routes!r})
print(json.dumps({{"by_route": by_route, "errors": errors}}))
tracker.stop()
"""


def _run(loop: str, tmp: Path) -> tuple[dict[str, Any], str]:
    r = run_child(CHILD, loop, tmp, timeout=60, routes=ASYNC_ROUTES + (SYNC_ROUTE,))
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.fixture(scope="module")
def asyncio_loop(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return _run("asyncio", tmp_path_factory.mktemp("asyncio"))


@pytest.fixture(scope="module")
def uvloop_loop(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    pytest.importorskip("uvloop")
    return _run("uvloop", tmp_path_factory.mktemp("uvloop"))


def _shares(result: dict[str, Any], route: str) -> tuple[dict[str, int], int]:
    shares = result["by_route"][route]
    seen = sum(shares.values())
    assert seen > 0.1e9, (route, shares)  # ~6 clients x 15 rounds x 12 ms of CPU burnt in the route
    return shares, seen


def _assert_cpu_carries_its_own_label(result: dict[str, Any], route: str) -> None:
    """Every request answered; at least 99% of the route's CPU carries its label, the rest none."""
    assert result["errors"] == []
    shares, seen = _shares(result, route)
    assert shares.get(route, 0) >= 0.99 * seen, (route, shares)
    assert set(shares) <= {route, ""}, (route, shares)


@pytest.mark.parametrize("route", ASYNC_ROUTES)
def test_asyncio_tasks_cpu_carries_its_own_request_label(asyncio_loop, route: str) -> None:
    result, _ = asyncio_loop
    _assert_cpu_carries_its_own_label(result, route)


@pytest.mark.parametrize("route", ASYNC_ROUTES)
def test_uvloop_tasks_cpu_carries_its_own_request_label(uvloop_loop, route: str) -> None:
    result, stderr = uvloop_loop
    _assert_cpu_carries_its_own_label(result, route)
    assert "task switches the profiler cannot follow" not in stderr, stderr[-3000:]


def test_a_uvloop_loop_made_before_the_tracker_labels_the_tasks_created_after_the_first_label(
        tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    script = tmp_path / "early_loop.py"
    script.write_text(EARLY_LOOP.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    shares = json.loads(r.stdout.strip().splitlines()[-1])
    # the first task (created before any label: not followed) stays unlabelled, never mislabelled
    assert set(shares["first"]) <= {""}, shares
    for name in ("one", "two"):
        assert shares[name].get(name, 0) >= 0.99 * sum(shares[name].values()) > 0, shares
    assert "task switches the profiler cannot follow" not in r.stderr, r.stderr[-3000:]


EARLY_LOOP = r"""
import asyncio, json, sys, time
sys.path.insert(0, {root!r})
import uvloop
loop = uvloop.new_event_loop()  # before the tracker: its new_event_loop is not wrapped yet
from middleware import MwTracker
from middleware.labels import labels

tracker = MwTracker(sample_rate=400, profile_dir="none", instrument=False, native=False, upload=False)


def spin(seconds):
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        sum(i * i for i in range(200))


async def work_first():
    with labels(job="first"):
        for _ in range(20):
            spin(0.002)
            await asyncio.sleep(0)


async def work_one():
    for _ in range(40):
        spin(0.002)
        await asyncio.sleep(0)


async def work_two():
    for _ in range(40):
        spin(0.002)
        await asyncio.sleep(0)


async def labelled(name, work):
    with labels(job=name):
        await work()


async def main():
    await work_first()  # pushes the first label: the loop gets the task factory
    await asyncio.gather(*[labelled(n, w) for _ in range(3) for n, w in (("one", work_one), ("two", work_two))])


tracker.snapshot(reset=True)
loop.run_until_complete(main())
profile = tracker.snapshot()
out = {{"first": {{}}, "one": {{}}, "two": {{}}}}
i = profile.value_index("cpu")
for s in profile.samples:
    fns = {{f.function for f in s.stack}}
    for name in out:
        if "work_" + name in fns and s.values[i]:
            key = s.label("job") or ""
            out[name][key] = out[name].get(key, 0) + s.values[i]
print(json.dumps(out))
tracker.stop()
"""


def test_uvloop_sync_endpoint_work_keeps_its_label_in_the_thread_pool(uvloop_loop) -> None:
    result, _ = uvloop_loop
    shares, seen = _shares(result, SYNC_ROUTE)
    assert shares.get(SYNC_ROUTE, 0) >= 0.95 * seen, shares
    assert set(shares) <= {SYNC_ROUTE, ""}, shares
