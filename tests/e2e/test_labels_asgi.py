"""Starlette and FastAPI requests are labelled with their route template, with no code in the app.

GIVEN a FastAPI app under uvicorn (asyncio's loop, and uvloop: uvicorn's default loop when it is
installed) in a child process whose only profiler code is
``MwTracker()``: an async endpoint with a path parameter that burns CPU in slices and yields
between them, one in an ``APIRouter`` with a prefix, a Starlette sub-app under a ``Mount``, and a
sync endpoint (run in anyio's thread pool)
WHEN 50 client threads send interleaved requests to concrete URLs (``/burn/3``, ``/burn/7``...)
THEN each route's CPU carries ``endpoint=<its template>`` (``/burn/{n}``, ``/api/items/{item_id}``,
``/sub/calc/{x}``, ``/sync/{k}``): one value per route, never another route's.
Also, in this process: the templates through nested mounts, and MwAsgiMiddleware on a bare ASGI app.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from support.asgi_child import run_child

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


CHILD = r"""
import asyncio, json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from middleware import MwTracker
from support.asgi_child import drive, serve_in_thread, spin

tracker = MwTracker(sample_rate=400, profile_dir="none", native=False, upload=False)
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

SLICE_S = 0.002


async def work_burn():
    for _ in range(4):
        spin(SLICE_S)
        await asyncio.sleep(0)  # another request's task runs here


async def work_item():
    for _ in range(4):
        spin(SLICE_S)
        await asyncio.sleep(0)


async def work_calc():
    for _ in range(4):
        spin(SLICE_S)
        await asyncio.sleep(0)


def work_sync():
    spin(4 * SLICE_S)


app = FastAPI()
router = APIRouter(prefix="/api")


@app.get("/burn/{{n}}")
async def burn(n: int):
    await work_burn()
    return {{}}


@router.get("/items/{{item_id}}")
async def item(item_id: int):
    await work_item()
    return {{}}


@app.get("/sync/{{k}}")
def sync(k: int):
    work_sync()
    return {{}}


async def calc(request):
    await work_calc()
    return JSONResponse({{}})


app.include_router(router)
app.mount("/sub", Starlette(routes=[Route("/calc/{{x}}", calc)]))

server, server_thread, port = serve_in_thread(app, {loop!r})
tracker.snapshot(reset=True)
errors = drive(port, ["/burn/{{}}", "/api/items/{{}}", "/sub/calc/{{}}", "/sync/{{}}"], clients=50, rounds=2,
               timeout=60)
profile = tracker.snapshot()
server.should_exit = True
server_thread.join(timeout=20)
ci = profile.value_index("cpu")
by_work = {{}}
for s in profile.samples:
    names = {{f.function for f in s.stack}}
    for w in ("work_burn", "work_item", "work_calc", "work_sync"):
        if w in names:
            d = by_work.setdefault(w, {{}})
            ep = s.label("endpoint") or ""
            d[ep] = d.get(ep, 0) + s.values[ci]
print(json.dumps({{"by_work": by_work, "errors": errors}}))
tracker.stop()
"""

WANT = {"work_burn": "/burn/{n}", "work_item": "/api/items/{item_id}", "work_calc": "/sub/calc/{x}",
        "work_sync": "/sync/{k}"}


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    r = run_child(CHILD, request.param, tmp_path_factory.mktemp("asgi"), timeout=120)
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("work", sorted(WANT))
def test_each_route_cpu_carries_its_template(served: dict[str, Any], work: str) -> None:
    assert served["errors"] == []
    shares = served["by_work"][work]
    seen = sum(shares.values())
    assert seen > 0.1e9, (work, shares)  # 100 requests x 8 ms of CPU in each route
    # threads of the pool (sync) are labelled when the work is handed over: a little slack there
    assert shares.get(WANT[work], 0) >= (0.95 if work == "work_sync" else 0.99) * seen, (work, shares)
    assert set(shares) <= {WANT[work], ""}, (work, shares)


def _call(app: Any, path: str, scope_type: str = "http") -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": scope_type, "path": path, "raw_path": path.encode(), "method": "GET", "headers": [],
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("t", 80), "http_version": "1.1"}
    asyncio.run(app(scope, receive, send))


def test_templates_through_nested_mounts_in_process() -> None:
    import starlette.routing
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from middleware.integrations import asgi
    from middleware.labels import current_labels

    assert asgi.install_starlette(starlette.routing)
    seen: list[dict[str, str]] = []

    async def endpoint(request: Any) -> PlainTextResponse:
        seen.append(current_labels())
        return PlainTextResponse("")

    app = Starlette(routes=[
        Route("/a/{x}", endpoint),
        Mount("/v1", routes=[Mount("/users/{uid}", routes=[Route("/posts/{pid}", endpoint)])]),
    ])
    _call(app, "/a/1")
    _call(app, "/v1/users/7/posts/9")
    assert seen == [{"endpoint": "/a/{x}"}, {"endpoint": "/v1/users/{uid}/posts/{pid}"}]
    assert current_labels() == {}  # nothing left behind


def test_asgi_middleware_labels_a_bare_app_by_path() -> None:
    from middleware.integrations import MwAsgiMiddleware
    from middleware.labels import current_labels

    seen: list[tuple[str, dict[str, str]]] = []

    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["type"], current_labels()))

    app = MwAsgiMiddleware(bare)
    _call(app, "/raw/path")
    _call(app, "/ws", scope_type="websocket")
    _call(app, "", scope_type="lifespan")
    assert seen == [("http", {"endpoint": "/raw/path"}), ("websocket", {"endpoint": "/ws"}), ("lifespan", {})]
