"""Labels follow work handed to a thread pool: FastAPI/Starlette sync endpoints (anyio's worker
threads), ``asyncio.to_thread`` and ``loop.run_in_executor``.

GIVEN a real FastAPI app under uvicorn (stock asyncio loop, h11) in a child process (the tracker
started before the app imports its framework, or after), whose ASGI
middleware labels each request ``endpoint=<path>`` (except ``/plain``), with two sync endpoints,
an async endpoint that awaits ``asyncio.to_thread`` and one that awaits
``loop.run_in_executor(None, ...)``, each burning CPU in a worker thread and measuring that
thread's ``time.thread_time`` inside the endpoint
WHEN client threads send interleaved concurrent requests to all of them (the pools' threads
serve one route, then another)
THEN at least 95% of each route's worker CPU carries its own endpoint label, the rest none and
never another route's, the route's labelled CPU matches its measured thread time, and the
unlabelled route's work carries no label at all (the worker threads drop a request's labels when
they go back to the pool).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
ROUTES = ("/alpha", "/beta", "/gamma", "/delta", "/plain")
LABELLED = ROUTES[:4]

CHILD = r"""
import asyncio, json, sys, threading, time
sys.path.insert(0, {root!r})
from middleware import MwTracker
from middleware.labels import labels

if {tracker_first!r}:
    tracker = MwTracker(sample_rate=400, profile_dir="none", instrument=False, native=False, upload=False)
import httpx  # noqa: F401 (loaded before the tracker in the app-first run)
import uvicorn  # noqa: F401
from fastapi import FastAPI
if not {tracker_first!r}:  # asyncio and anyio are loaded when the tracker starts
    tracker = MwTracker(sample_rate=400, profile_dir="none", instrument=False, native=False, upload=False)

BURN_S = 0.012
measured = {{}}  # route -> thread CPU seconds spent in its work function
lock = threading.Lock()


def burn(route):
    t0 = time.thread_time()
    x = 0
    while time.thread_time() - t0 < BURN_S:
        for i in range(300):
            x += i * i
    spent = time.thread_time() - t0
    with lock:
        measured[route] = measured.get(route, 0.0) + spent
    return x


def work_alpha():
    return burn("/alpha")


def work_beta():
    return burn("/beta")


def work_gamma():
    return burn("/gamma")


def work_delta():
    return burn("/delta")


def work_plain():
    return burn("/plain")


app = FastAPI()


@app.get("/alpha")
def alpha():
    return {{"x": work_alpha() % 7}}


@app.get("/beta")
def beta():
    return {{"x": work_beta() % 7}}


@app.get("/plain")
def plain():
    return {{"x": work_plain() % 7}}


@app.get("/gamma")
async def gamma():
    return {{"x": (await asyncio.to_thread(work_gamma)) % 7}}


@app.get("/delta")
async def delta():
    loop = asyncio.get_running_loop()
    return {{"x": (await loop.run_in_executor(None, work_delta)) % 7}}


sys.path.insert(0, {tests!r})
from support.asgi_child import EndpointLabels, cpu_by_route_label, drive, serve_in_thread

server, server_thread, port = serve_in_thread(EndpointLabels(app, labels, unlabelled=["/plain"]), "asyncio")
ROUTES = {routes!r}
tracker.snapshot(reset=True)
with lock:
    measured.clear()
errors = drive(port, ROUTES, clients=4, rounds=12)
profile = tracker.snapshot()
server.should_exit = True
server_thread.join(timeout=20)
by_route, labelled_anywhere = cpu_by_route_label(profile, ROUTES)
print(json.dumps({{"measured_ns": {{r: int(v * 1e9) for r, v in measured.items()}}, "by_route": by_route,
                  "labelled_anywhere": labelled_anywhere, "errors": errors,
                  "stats": {{k: tracker.stats().get(k) for k in ("samples", "dropped", "unproven")}}}}))
tracker.stop()
"""


@pytest.fixture(scope="module", params=[True, False], ids=["tracker-first", "app-first"])
def result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("threadpool")
    script = tmp / "app.py"
    script.write_text(CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), routes=ROUTES,
                                   tracker_first=request.param))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50, cwd=str(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_request_was_served(result: dict[str, Any]) -> None:
    assert result["errors"] == []
    # each route burnt about 4 clients x 12 rounds x 12 ms of thread CPU
    for route in ROUTES:
        assert 0.4e9 < result["measured_ns"][route] < 1.5e9, result["measured_ns"]


@pytest.mark.parametrize("route", LABELLED)
def test_worker_cpu_carries_its_own_route_label(result: dict[str, Any], route: str) -> None:
    shares = result["by_route"][route]
    seen = sum(shares.values())
    measured = result["measured_ns"][route]
    # the profile saw the route's work (the CPU split is each thread's real CPU time)
    assert 0.85 * measured <= seen <= 1.15 * measured, (route, seen, measured, result["stats"])
    # its own label on >= 95%, the rest unlabelled, never another route's
    assert shares.get(route, 0) >= 0.95 * seen, (route, shares)
    assert set(shares) <= {route, ""}, (route, shares)
    # and everything the label covers is at least that route's own work
    assert result["labelled_anywhere"].get(route, 0) >= 0.95 * shares.get(route, 0)


def test_unlabelled_route_carries_no_label(result: dict[str, Any]) -> None:
    # workers that served labelled requests before serve /plain next: no label left behind
    shares = result["by_route"]["/plain"]
    seen = sum(shares.values())
    assert seen >= 0.85 * result["measured_ns"]["/plain"], (shares, result["measured_ns"])
    assert shares.get("", 0) == seen, shares
    assert set(result["labelled_anywhere"]) <= set(LABELLED), result["labelled_anywhere"]
