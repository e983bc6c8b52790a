"""Request counts: every request the Flask, WSGI and ASGI integrations serve is counted once, in
the CPU profile of the window it started in, and reaches the local store and `serve`.

GIVEN a process serving several hundred requests through Flask, MwWsgiMiddleware and Starlette
(sync and async routes) while the tracker exports every 0.2 s (windows with no sample between
bursts), then forking a child that serves its own requests
WHEN the profiles' ``mw:requests`` counts are summed per process and endpoint
THEN they equal the requests served exactly (none lost in windows without samples, none counted
twice, the parent's not inherited by the child), and `serve` answers the same counts for a
selection by endpoint and none for a selection on a label requests do not carry.
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import load_profiles

pytestmark = pytest.mark.sampler
ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "tests" / "targets" / "request_workloads.py"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    pytest.importorskip("flask")
    pytest.importorskip("starlette")
    store = tmp_path_factory.mktemp("requests") / "store"
    out = subprocess.run([sys.executable, str(TARGET), "serve", str(store)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1]), store


def test_each_request_is_counted_once_in_its_process(served: tuple[dict[str, Any], Path]) -> None:
    truth, store = served
    files = sorted(store.rglob("*.pb.gz"))
    counted: dict[tuple[str, str], int] = {}
    windows_with_counts = 0
    for f in files:
        p = load_profiles([f], allow_empty=True)  # a window may hold request counts and no sample
        windows_with_counts += bool(p.requests)
        for key, n in p.requests.items():
            labels = dict(key)
            k = (labels["pid"], labels["endpoint"])
            counted[k] = counted.get(k, 0) + n
    expected = {(str(truth["parent"]), e): n for e, n in truth["served"].items()}
    expected.update({(str(truth["child"]), e): n for e, n in truth["child_served"].items()})
    assert counted == expected
    assert windows_with_counts >= 3, windows_with_counts  # spread over windows, not one file
    assert truth["stats_requests"] == sum(truth["served"].values())


def test_serve_answers_the_counts_per_endpoint(served: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    from middleware.serve import ServeApp, ServeConfig
    from middleware.serve.query import Matcher, Selection

    truth, store = served
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "data"), regress_interval=3600)).start()
    try:
        for f in sorted(store.rglob("*.pb.gz")):
            conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
            q = urllib.parse.urlencode({"name": "shop", "format": "pprof"})
            conn.request("POST", f"/ingest?{q}", f.read_bytes(), {"Content-Type": "binary/octet-stream"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            conn.close()
        cpu = next(t for t in app.store.profile_types("shop") if t.startswith("process_cpu:cpu:"))

        def requests(*matchers: Matcher) -> int:
            sel = Selection("shop", cpu, 0, 2**62, tuple(matchers))
            return app.engine.merge(sel).profile.request_count()

        both = truth["served"]["/g"] + truth["child_served"]["/g"]
        assert requests() == sum(truth["served"].values()) + sum(truth["child_served"].values())
        assert requests(Matcher("endpoint", "=", "/g")) == both
        assert requests(Matcher("endpoint", "=", "/g"), Matcher("pid", "=", str(truth["child"]))) == 37
        assert requests(Matcher("endpoint", "=", "/a/{x}")) == truth["served"]["/a/{x}"]
        assert requests(Matcher("thread_name", "=", "MainThread")) == 0
    finally:
        app.stop()
