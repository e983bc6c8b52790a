"""`serve` finds regressions by itself: each version of a service compared with the one before it.

GIVEN a serve receiving a service's profiles labelled with the version that ran (as agents label
them): version v1, then v2 in which calc2 costs 1.5x (under /calculate2), then v3 = v2
WHEN the regression detector's pass runs
THEN /api/regressions flags calc2 for v1 -> v2 (over the service and within /calculate2), and
nothing else: not the functions whose cost did not change, not v2 -> v3; already after the first
two windows of v2; and a null change drawn with sampling noise is not flagged.
"""
from __future__ import annotations

import http.client
import json
import random
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from middleware.pprof import encode_pprof
from middleware.profile import Profile
from middleware.serve import ServeApp, ServeConfig
from support.profiles import PERIOD, build, sample

pytestmark = pytest.mark.unit

T0 = 1_763_719_200
WINDOW_S = 10


def window(version: str, i: int, calc2_ms: float, rnd: random.Random | None = None) -> Profile:
    """One 10 s window of the calc service at 100 Hz; with ``rnd`` every value is a Poisson draw."""

    def ms(mean_ms: float) -> int:
        if rnd is None:
            return int(mean_ms * 1_000_000)
        n = rnd.gauss(mean_ms * 1_000_000 / PERIOD, (mean_ms * 1_000_000 / PERIOD) ** 0.5)  # counts ~ Poisson
        return max(0, round(n)) * PERIOD

    lab = {"version": version}
    return build([
        sample("main;handle;efficient;calc1", ms(2000), ms(2000), {**lab, "endpoint": "/calculate1"}),
        sample("main;handle;efficient;calc3", ms(4000), ms(4000), {**lab, "endpoint": "/calculate1"}),
        sample("main;handle;with_bottleneck;calc1", ms(1000), ms(1000), {**lab, "endpoint": "/calculate2"}),
        sample("main;handle;with_bottleneck;calc2", ms(calc2_ms), ms(calc2_ms), {**lab, "endpoint": "/calculate2"}),
    ], time_nanos=(T0 + WINDOW_S * i) * 10**9, duration_nanos=WINDOW_S * 10**9)


class Serve:
    def __init__(self, app: ServeApp) -> None:
        self.app = app
        self.windows = 0

    def push(self, service: str, profile: Profile) -> None:
        start = T0 + WINDOW_S * self.windows
        self.windows += 1
        conn = http.client.HTTPConnection("127.0.0.1", self.app.port, timeout=30)
        q = urllib.parse.urlencode({"name": service, "from": start, "until": start + WINDOW_S, "format": "pprof",
                                    "sampleRate": 100})
        conn.request("POST", f"/ingest?{q}", encode_pprof(profile), {"Content-Type": "binary/octet-stream"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        conn.close()

    def regressions(self, service: str) -> Any:
        self.app.regressions.run_once()
        conn = http.client.HTTPConnection("127.0.0.1", self.app.port, timeout=30)
        conn.request("GET", "/api/regressions?" + urllib.parse.urlencode({"service": service}))
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, body
        return json.loads(body)


@pytest.fixture
def serve(tmp_path: Any) -> Iterator[Serve]:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "data"), regress_interval=3600)).start()
    try:
        yield Serve(app)
    finally:
        app.stop()


def _flagged(comparison: dict[str, Any]) -> set[tuple[str, str | None]]:
    return {(f["function"], f["endpoint"]) for f in comparison["findings"]}


def test_a_version_that_made_calc2_slower_is_flagged_and_nothing_else(serve: Serve) -> None:
    for i in range(30):
        serve.push("shop", window("v1", i, calc2_ms=1500))
    assert serve.regressions("shop")["comparisons"] == []  # one version: nothing to compare
    for i in range(2):
        serve.push("shop", window("v2", i, calc2_ms=2250))
    early = serve.regressions("shop")["comparisons"]
    assert [(c["before"]["version"], c["after"]["version"]) for c in early] == [("v1", "v2")]
    assert ("calc2", None) in _flagged(early[0]), early  # within two windows of v2's first profile
    for i in range(2, 30):
        serve.push("shop", window("v2", i, calc2_ms=2250))
    for i in range(30):
        serve.push("shop", window("v3", i, calc2_ms=2250))
    body = serve.regressions("shop")
    assert body["type"].startswith("process_cpu:") and body["label"] == "version"
    by_pair = {(c["before"]["version"], c["after"]["version"]): c for c in body["comparisons"]}
    assert set(by_pair) == {("v1", "v2"), ("v2", "v3")}
    # each window is one profile, whatever the number of series (endpoints) it holds
    assert by_pair[("v1", "v2")]["before"]["profiles"] == by_pair[("v1", "v2")]["after"]["profiles"] == 30
    assert _flagged(by_pair[("v1", "v2")]) == {("calc2", None), ("calc2", "/calculate2")}, by_pair[("v1", "v2")]
    assert _flagged(by_pair[("v2", "v3")]) == set()
    f = next(f for f in by_pair[("v1", "v2")]["findings"] if f["endpoint"] is None)
    # calc2: 1.5 s of 8.5 s before, 2.25 s of 9.25 s after; the interval holds the true ratio
    assert f["kind"] == "regression" and f["share_before"] == pytest.approx(1.5 / 8.5)
    assert f["share_after"] == pytest.approx(2.25 / 9.25)
    assert f["ratio_low"] <= (2.25 / 9.25) / (1.5 / 8.5) <= f["ratio_high"]
    assert f["first_seen"] <= by_pair[("v1", "v2")]["computed_at"]


def test_a_null_change_with_sampling_noise_is_not_flagged(serve: Serve) -> None:
    rnd = random.Random(7)
    for version in ("a", "b", "c"):
        for i in range(6):  # a minute each
            serve.push("noisy", window(version, i, calc2_ms=1500, rnd=rnd))
    comparisons = serve.regressions("noisy")["comparisons"]
    assert len(comparisons) == 2 and all(c["findings"] == [] for c in comparisons), comparisons


def test_unknown_service_or_type(serve: Serve) -> None:
    assert serve.regressions("nobody")["comparisons"] == []
    conn = http.client.HTTPConnection("127.0.0.1", serve.app.port, timeout=30)
    conn.request("GET", "/api/regressions?service=nobody&type=a:b:c:d:e")
    assert conn.getresponse().status == 400
    conn.close()


def counted_window(version: str, i: int, calc3_ms: float, calc2_ms: float, requests: bool) -> Profile:
    """A window of the calc service in which the agent counted 100 requests of /calculate1 and 50
    of /calculate2 (``requests``), or none."""
    p = window(version, i, calc2_ms)
    for s in p.samples:
        if s.stack[-1].function == "calc3":
            s.values = tuple(int(calc3_ms * 1_000_000) for _ in s.values)
    if requests:
        p.requests = {(("endpoint", "/calculate1"), ("pid", "9"), ("version", version)): 100,
                      (("endpoint", "/calculate2"), ("pid", "9"), ("version", version)): 50}
    return p


def test_with_request_counts_costs_compare_per_request_and_a_speed_up_elsewhere_is_no_regression(
        serve: Serve) -> None:
    # v2 makes calc3 (under /calculate1) twice as fast and calc2 (under /calculate2) 1.5x as slow
    for service, requests in (("counted", True), ("uncounted", False)):
        for i in range(6):
            serve.push(service, counted_window("v1", i, calc3_ms=4000, calc2_ms=1500, requests=requests))
        for i in range(6):
            serve.push(service, counted_window("v2", i, calc3_ms=2000, calc2_ms=2250, requests=requests))
    (counted,) = serve.regressions("counted")["comparisons"]
    # per request: calc2 alone, over the service and within its endpoint
    assert _flagged(counted) == {("calc2", None), ("calc2", "/calculate2")}, counted
    f = next(f for f in counted["findings"] if f["endpoint"] == "/calculate2")
    assert f["basis"] == "request" and f["requests_before"] == f["requests_after"] == 300
    assert f["share_before"] == pytest.approx(1.5e9 / 50) and f["share_after"] == pytest.approx(2.25e9 / 50)
    # the same profiles without counts compare shares: calc1's share grew with calc3's speed-up
    (uncounted,) = serve.regressions("uncounted")["comparisons"]
    assert ("calc1", "/calculate1") in _flagged(uncounted), uncounted
    assert all(f["basis"] == "share" for f in uncounted["findings"])


def test_a_slower_machine_is_the_common_change_and_only_the_slower_function_is_flagged(serve: Serve) -> None:
    # v2 runs on a machine 20% slower (every function's cost per request x1.2) and its calc2 does
    # 1.5x the work on top; within an endpoint (two functions each here) the service's common change holds
    for i in range(6):
        serve.push("machine", counted_window("v1", i, calc3_ms=4000, calc2_ms=1500, requests=True))
    for i in range(6):
        p = counted_window("v2", i, calc3_ms=4000 * 1.2, calc2_ms=1500 * 1.2 * 1.5, requests=True)
        for s in p.samples:
            if s.stack[-1].function == "calc1":
                s.values = tuple(int(v * 1.2) for v in s.values)
        serve.push("machine", p)
    (c,) = serve.regressions("machine")["comparisons"]
    assert _flagged(c) == {("calc2", None), ("calc2", "/calculate2")}, c
    assert c["common"][""] == pytest.approx(1.2) and c["common"]["/calculate1"] == pytest.approx(1.2), c
    f = next(f for f in c["findings"] if f["endpoint"] == "/calculate2")
    assert f["ratio"] == pytest.approx(1.5) and f["common"] == pytest.approx(1.2), f
    assert f["share_after"] / f["share_before"] == pytest.approx(1.8)  # as measured
