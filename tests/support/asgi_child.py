"""Helpers of the child processes that serve an ASGI app under uvicorn and drive it with client
threads (tests/e2e/test_labels_*.py, tests/e2e/test_asyncio_tasks_asgi.py), and the tests' way of
running such a child (``run_child``).

The children import it (uvicorn and httpx are test dependencies; the test modules skip
themselves without them)."""
from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_child(template: str, loop: str, tmp: Path, timeout: float, **fields: Any) -> subprocess.CompletedProcess[str]:
    """Runs the child script ``template`` (formatted with ``root``, ``tests``, ``loop`` and
    ``fields``) in ``tmp``, serving on event loop ``loop`` (a test needing uvloop is skipped
    without it); the child must exit 0."""
    if loop == "uvloop":
        import pytest

        pytest.importorskip("uvloop")
    script = tmp / "app.py"
    script.write_text(template.format(root=str(ROOT), tests=str(ROOT / "tests"), loop=loop, **fields))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, cwd=str(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


class EndpointLabels:
    """What a framework integration does: labels each HTTP request ``endpoint=<path>`` (except
    the paths in ``unlabelled``)."""

    def __init__(self, inner: Any, labels: Callable[..., Any], unlabelled: Sequence[str] = ()) -> None:
        self.inner, self.labels, self.unlabelled = inner, labels, set(unlabelled)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.unlabelled:
            return await self.inner(scope, receive, send)
        with self.labels(endpoint=scope["path"]):
            await self.inner(scope, receive, send)


def serve_in_thread(app: Any, loop: str) -> tuple[Any, threading.Thread, int]:
    """uvicorn (h11, event loop ``loop``) serving ``app`` on a free loopback port in a thread:
    (server, its thread, port), once it has started."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, loop=loop, http="h11", lifespan="off", log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    return server, thread, sock.getsockname()[1]


def spin(seconds: float) -> None:
    """Burns ``seconds`` of this thread's CPU."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        sum(i * i for i in range(200))


def drive(port: int, routes: Sequence[str], clients: int, rounds: int, timeout: float = 30) -> list[tuple[str, int]]:
    """``clients`` threads each GET every route ``rounds`` times, in a shuffled order each round (a
    ``{}`` in a route is a random number 0-99, new for each request); returns the (route, status)
    of every answer that was not 200."""
    import httpx

    errors: list[tuple[str, int]] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as c:
            for _ in range(rounds):
                order = [r.format(rng.randrange(100)) if "{}" in r else r for r in routes]
                rng.shuffle(order)
                for route in order:
                    r = c.get(route)
                    if r.status_code != 200:
                        errors.append((route, r.status_code))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def cpu_by_route_label(profile: Any, routes: Sequence[str]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """route -> endpoint label ("" for none) -> CPU ns of the samples in the route's work function
    (``work_<route name>``); and endpoint label -> CPU ns of all its samples."""
    ci = profile.value_index("cpu")
    by_route: dict[str, dict[str, int]] = {r: {} for r in routes}
    labelled: dict[str, int] = {}
    for s in profile.samples:
        ep = s.label("endpoint") or ""
        if ep:
            labelled[ep] = labelled.get(ep, 0) + s.values[ci]
        names = {f.function for f in s.stack}
        for r in routes:
            if "work_" + r[1:] in names:
                by_route[r][ep] = by_route[r].get(ep, 0) + s.values[ci]
    return by_route, labelled
