"""Requests served through the framework integrations while the tracker exports every 0.2 s,
in a fresh interpreter; what was served goes to stdout as JSON (the truth the test compares the
profiles' request counts with).

    python request_workloads.py serve STORE_DIR
        Flask (test client) on /f/<int:n> and /g, a plain WSGI app wrapped in MwWsgiMiddleware,
        a Starlette app (sync and async routes, test client) -- several hundred requests over a
        second and a half, some burning CPU and some not, so that windows with no sample and
        requests straddling windows both happen. Then a fork: the child serves its own
        requests and exits through the tracker's stop; requests the parent served before the
        fork are not the child's.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

# the checkout, for interpreters where the package is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from middleware import MwTracker  # noqa: E402


def burn(seconds: float) -> int:
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


def serve(store: str) -> dict[str, Any]:
    tracker = MwTracker(profile_dir=store, upload_interval=0.2)
    import flask
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    with warnings.catch_warnings():  # starlette's test client prefers another httpx package
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from middleware.integrations.wsgi import MwWsgiMiddleware

    app = flask.Flask("requests")

    @app.route("/f/<int:n>")
    def f(n: int) -> str:
        return str(burn(0.002) if n % 3 == 0 else n)

    @app.route("/g")
    def g() -> str:
        return "g"

    def plain(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(burn(0.001)).encode()]

    def sync_route(request: Any) -> PlainTextResponse:
        return PlainTextResponse(str(burn(0.001)))

    async def async_route(request: Any) -> PlainTextResponse:
        return PlainTextResponse(str(burn(0.001)))

    star = Starlette(routes=[Route("/s/{x}", sync_route), Route("/a/{x}", async_route)])
    served = {"/f/<int:n>": 0, "/g": 0, "/wsgi": 0, "/s/{x}": 0, "/a/{x}": 0}
    fc = app.test_client()
    from werkzeug.test import Client

    wc = Client(MwWsgiMiddleware(plain, endpoint=lambda environ: "/wsgi"))
    deadline = time.monotonic() + 1.5
    i = 0
    with TestClient(star) as sc:
        while time.monotonic() < deadline:
            i += 1
            assert fc.get(f"/f/{i}").status_code == 200
            served["/f/<int:n>"] += 1
            if i % 2 == 0:
                assert fc.get("/g").status_code == 200
                served["/g"] += 1
            if i % 3 == 0:
                wc.get("/anything")
                served["/wsgi"] += 1
            if i % 4 == 0:
                assert sc.get(f"/s/{i}").status_code == 200
                served["/s/{x}"] += 1
                assert sc.get(f"/a/{i}").status_code == 200
                served["/a/{x}"] += 1
            if i % 50 == 0:
                time.sleep(0.25)  # a window or so with no request and no sample
    parent_pid = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child = 0
        for _ in range(37):
            fc.get("/g")
            child += 1
        burn(0.05)
        tracker.stop()
        os.write(w, str(child).encode())
        os._exit(0)
    os.close(w)
    child_served = int(os.read(r, 64) or b"0")
    os.waitpid(pid, 0)
    burn(0.05)
    tracker.stop()
    return {"parent": parent_pid, "child": pid, "served": served, "child_served": {"/g": child_served},
            "stats_requests": tracker.stats().get("export_requests")}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        print(json.dumps(serve(sys.argv[2])))
    else:
        sys.exit(f"unknown workload {sys.argv[1]!r}")
