"""`python -m middleware serve` under hostile input: times, series, values, slow clients, hosts.

GIVEN a serve started in-process on 127.0.0.1 (free port, temporary --data, small limits)
WHEN clients send times beyond int64 nanoseconds, uploads with thousands of label sets, negative
or huge values, over-long labels, connections that send nothing or trickle a byte at a time,
more connections than allowed, and hosts spelled `127.1` or `0x7f.1`
THEN every bad request gets a 4xx naming the problem and stores nothing, the values that are
stored add up exactly to what was sent (series past the cap land in the overflow series), slow
and idle connections are closed at their deadline while normal requests are answered at once,
the server never runs more connection threads than its cap, and loopback is decided on the
address the kernel actually binds.
"""
from __future__ import annotations

import http.client
import json
import select
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import encode_pprof
from middleware.profile import Profile
from middleware.serve import ConfigError, ServeApp, ServeConfig, is_loopback
from middleware.serve.ingest import (
    INT64_MAX,
    MAX_PROFILE_TOTAL,
    IngestError,
    IngestLimits,
    IngestParams,
    upload_from_profile,
)
from middleware.serve.labels import MAX_LABEL_VALUE_LENGTH
from middleware.serve.store import OVERFLOW_LABEL
from support.processes import http_request
from support.profiles import PERIOD, build, calc_profile, sample

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
T0_S = 1_763_719_200  # support.profiles.T0 in seconds
MS = 1_000_000
# The last unix second whose nanoseconds fit in int64, derived here from the int64 limit.
LAST_SECOND = (2**63 - 1) // 10**9


class Client:
    """A new HTTP connection per request."""

    def __init__(self, app: ServeApp) -> None:
        self.port = app.port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return http_request(self.port, method, path, body, headers)

    def ingest(self, profile: Profile, **params: Any) -> tuple[int, str]:
        status, data = self.request(
            "POST",
            "/ingest?" + urllib.parse.urlencode(params),
            encode_pprof(profile),
            {"Content-Type": "binary/octet-stream"},
        )
        return status, data.decode("utf-8", "replace")

    def get(self, path: str, **params: Any) -> tuple[int, Any]:
        status, data = self.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
        return status, json.loads(data)


def start(tmp_path: Path, **config: Any) -> ServeApp:
    config.setdefault("limits", IngestLimits(max_body_bytes=1 << 20, max_decompressed_bytes=4 << 20))
    return ServeApp(ServeConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"), **config)).start()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[ServeApp]:
    a = start(tmp_path)
    try:
        yield a
    finally:
        a.stop()


def total(client: Client, service: str, selector: str = "{}") -> int:
    status, doc = client.get(
        "/api/profile", service=service, type=CPU, selector=selector, **{"from": T0_S - 60, "until": T0_S + 3600}
    )
    assert status == 200, doc
    return int(doc["total"])


# ------------------------------------------------------------------------------------------------
# times beyond int64 nanoseconds
# ------------------------------------------------------------------------------------------------
BAD_SECONDS = [str(LAST_SECOND + 1), "9999999999", "1e300", "inf", "nan", "-1"]
QUERY_ENDPOINTS = [
    "/api/profile",
    "/api/timeline",
    "/api/pprof",
    "/api/label_names",
    "/api/label_values",
    "/api/sandwich",
    "/api/diff",
]


@pytest.mark.parametrize("endpoint", QUERY_ENDPOINTS)
def test_query_times_beyond_int64_nanoseconds_get_400(app: ServeApp, endpoint: str) -> None:
    # GIVEN a service with data (so the range reaches SQLite)
    c = Client(app)
    assert c.ingest(calc_profile(), name="svc", **{"from": T0_S, "until": T0_S + 10})[0] == 200
    base = {
        "service": "svc",
        "type": CPU,
        "name": "endpoint",
        "function": "calc3",
        "from": T0_S - 60,
        "until": T0_S + 60,
    }
    params = ["from", "until"] + (["from2", "until2"] if endpoint == "/api/diff" else [])
    for param in params:
        for bad in BAD_SECONDS:
            # WHEN one time parameter is outside 0 .. 2**63-1 ns
            status, doc = c.get(endpoint, **{**base, param: bad})
            # THEN 400 naming the parameter and the range, not a 500
            assert status == 400, (param, bad, doc)
            assert f"'{param}'" in doc["error"] and str(LAST_SECOND) in doc["error"], doc
    # AND the last representable second is accepted (the bound is the int64 limit, not lower)
    status, _ = c.request("GET", f"{endpoint}?" + urllib.parse.urlencode({**base, "until": str(LAST_SECOND)}))
    assert status == 200


def test_timeline_step_beyond_int64_gets_400(app: ServeApp) -> None:
    c = Client(app)
    assert c.ingest(calc_profile(), name="svc", **{"from": T0_S, "until": T0_S + 10})[0] == 200
    q = {"service": "svc", "type": CPU, "from": T0_S - 60, "until": T0_S + 60}
    for bad in ["inf", "1e300", str(LAST_SECOND + 1), "nan", "0", "-5"]:
        status, doc = c.get("/api/timeline", **q, step=bad)
        assert status == 400 and "'step'" in doc["error"], (bad, doc)
    status, doc = c.get("/api/timeline", **q, step=str(LAST_SECOND))
    assert status == 200 and len(doc["points"]) == 1 and doc["points"][0]["value"] == calc_profile().total("cpu")


def test_ingest_times_beyond_int64_nanoseconds_get_400(app: ServeApp) -> None:
    c = Client(app)
    for param in ("from", "until"):
        for bad in BAD_SECONDS:
            q = {"name": "svc", "from": T0_S, "until": T0_S + 10, param: bad}
            status, text = c.ingest(calc_profile(), **q)
            assert status == 400 and f"'{param}'" in text and str(LAST_SECOND) in text, (param, bad, text)
    # a pprof whose own time_nanos + duration_nanos passes 2**63-1 (no from/until given)
    late = build([sample("main;calc1", 10 * MS)], time_nanos=INT64_MAX - 10**9, duration_nanos=10 * 10**9)
    status, text = c.ingest(late, name="svc")
    assert status == 400 and "int64" in text, text
    assert app.store.profile_count() == 0
    # the last representable second is stored and reads back
    status, text = c.ingest(calc_profile(), name="svc", **{"from": T0_S, "until": LAST_SECOND})
    assert status == 200, text
    status, doc = c.get("/api/services")
    assert doc["services"][0]["last_ns"] == LAST_SECOND * 10**9


# ------------------------------------------------------------------------------------------------
# series caps
# ------------------------------------------------------------------------------------------------
def users_profile(first: int, count: int, start_s: int = T0_S) -> Profile:
    """``count`` samples, each its own series (user=u<i>), cpu (i+1) ms each."""
    return build(
        [sample("main;handle", (i + 1) * MS, labels={"user": f"u{i}"}) for i in range(first, first + count)],
        time_nanos=start_s * 10**9,
    )


@pytest.mark.asan
def test_series_per_upload_and_per_service_are_capped(tmp_path: Path) -> None:
    limits = IngestLimits(
        max_body_bytes=1 << 20, max_decompressed_bytes=4 << 20, max_series_per_upload=50, max_series_per_service=120
    )
    app = start(tmp_path, limits=limits)
    try:
        c = Client(app)
        # WHEN one upload holds one label set more than the per-upload cap
        status, text = c.ingest(users_profile(0, 51), name="svc")
        # THEN 400 saying the count and the limit, and nothing is stored
        assert status == 400 and "limit 50" in text and "MW_SERVE_MAX_SERIES_PER_UPLOAD" in text, text
        assert app.store.profile_count() == 0
        # the static tags count: 50 sample label sets under a tag are still 50 series
        assert c.ingest(users_profile(0, 50), name="svc{env=a}")[0] == 200
        # a push request counts the label sets of all its series together (2 x 30 > 50)
        status, _ = c.request(
            "POST", "/push.v1.PusherService/Push", push_body([users_profile(0, 30), users_profile(30, 30, T0_S + 10)]),
            {"Content-Type": "application/proto"},
        )
        assert status == 400 and app.store.profile_count() == 1

        # WHEN uploads of 50 new series each go past the per-service cap of 120 series
        sent: list[Profile] = [users_profile(0, 50)]
        answers = []
        for k in range(1, 4):
            p = users_profile(50 * k, 50, T0_S + 10 * k)
            sent.append(p)
            status, text = c.ingest(p, name="svc{env=a}")
            assert status == 200, text
            answers.append(json.loads(text))
        # THEN the service has exactly 120 series plus its overflow series
        status, doc = c.get("/api/label_values", service="svc", name="user")
        kept = set(doc["values"])
        assert len(kept) == 120
        series = app.store.series("svc")
        assert len(series) == 121 and sum(1 for s in series if dict(s.labels).get(OVERFLOW_LABEL) == "true") == 1
        # AND nothing is lost: the totals equal what was sent, the overflow series holds exactly
        # the samples whose label sets were not kept
        sent_total = sum(p.total("cpu") for p in sent)
        folded = [s for p in sent for s in p.samples if dict(s.labels)["user"] not in kept]
        assert total(c, "svc") == sent_total
        assert total(c, "svc", f'{{{OVERFLOW_LABEL}="true"}}') == sum(s.values[1] for s in folded)
        # AND each answer says how much it folded; the stats count it all
        assert answers[0].get("series_overflow") is None
        reported = sum(a["series_overflow"]["samples"] for a in answers if "series_overflow" in a)
        assert reported == len(folded) == 200 - 120
        assert all(a["series_overflow"]["limit"] == 120 for a in answers[1:])
        status, stats = c.get("/api/stats")
        assert stats["series_overflow"]["samples"] == len(folded) and stats["series_overflow"]["uploads"] == 2
        # AND the cap holds across a restart (counted from the database, not from memory)
    finally:
        app.stop()
    app = start(tmp_path, limits=limits)
    try:
        c = Client(app)
        status, text = c.ingest(users_profile(1000, 5, T0_S + 100), name="svc{env=a}")
        assert status == 200 and json.loads(text)["series_overflow"]["series"] == 5, text
        assert len(app.store.series("svc")) == 121
    finally:
        app.stop()


def push_body(profiles: list[Profile]) -> bytes:
    from middleware.serve.ingest import _push_request_class

    req = _push_request_class()()
    for p in profiles:
        series = req.series.add()
        series.labels.add(name="service_name", value="svc")
        series.samples.add(raw_profile=encode_pprof(p))
    return req.SerializeToString()


def test_series_caps_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    default = IngestLimits()
    monkeypatch.setenv("MW_SERVE_MAX_SERIES_PER_UPLOAD", "7")
    monkeypatch.setenv("MW_SERVE_MAX_SERIES_PER_SERVICE", "70")
    limits = IngestLimits()
    assert (limits.max_series_per_upload, limits.max_series_per_service) == (7, 70)
    with pytest.raises(IngestError, match="limit 7"):
        upload_from_profile(IngestParams(service="s"), users_profile(0, 8), b"x", limits=limits)
    upload_from_profile(IngestParams(service="s"), users_profile(0, 7), b"x", limits=limits)
    # a bad value is ignored with a warning naming the variable
    monkeypatch.setenv("MW_SERVE_MAX_SERIES_PER_UPLOAD", "lots")
    with caplog.at_level("WARNING", logger="middleware.serve.ingest"):
        assert IngestLimits().max_series_per_upload == default.max_series_per_upload
    assert "MW_SERVE_MAX_SERIES_PER_UPLOAD" in caplog.text


# ------------------------------------------------------------------------------------------------
# values and label lengths
# ------------------------------------------------------------------------------------------------
def test_negative_and_oversized_values_are_refused(app: ServeApp) -> None:
    c = Client(app)
    negative = build([sample("main;calc1", 10 * MS), sample("main;calc2", -3 * MS, 5 * MS)])
    status, text = c.ingest(negative, name="svc")
    assert status == 400 and "negative" in text, text
    # each sample type's total in one profile stays below 2**53 (exact in the page's numbers)
    half = MAX_PROFILE_TOTAL // 2 + 1
    too_big = build([sample("main;a", half), sample("main;b", half)])
    status, text = c.ingest(too_big, name="svc")
    assert status == 400 and str(MAX_PROFILE_TOTAL) in text, text
    assert app.store.profile_count() == 0
    # the largest allowed total is stored and reads back exactly
    biggest = build([sample("main;a", MAX_PROFILE_TOTAL - PERIOD), sample("main;b", PERIOD)])
    assert c.ingest(biggest, name="svc", **{"from": T0_S, "until": T0_S + 10})[0] == 200
    assert total(c, "svc") == MAX_PROFILE_TOTAL


def test_sums_beyond_int64_across_many_profiles_are_answered(app: ServeApp) -> None:
    # GIVEN more profiles of the maximum total than int64 can sum (2**63 / (2**53-1) > 1024)
    n = 1030
    uploads = []
    for i in range(n):
        p = build([sample("main;a", MAX_PROFILE_TOTAL)], time_nanos=(T0_S + i) * 10**9, duration_nanos=10**9)
        uploads.append(upload_from_profile(IngestParams(service="big"), p, encode_pprof(p, compress=False)))
    app.store.add_many(uploads)
    # WHEN the merged profile and the timeline are asked for
    c = Client(app)
    q = {"service": "big", "type": CPU, "from": T0_S, "until": T0_S + n}
    status, doc = c.get("/api/profile", **q)
    # THEN they are answered (not SQLite's integer overflow as a 500), the sum within float precision
    assert status == 200, doc
    assert doc["total"] == pytest.approx(n * MAX_PROFILE_TOTAL, rel=1e-9)
    status, doc = c.get("/api/timeline", **q, step=n)
    assert status == 200 and doc["points"][0]["value"] == pytest.approx(n * MAX_PROFILE_TOTAL, rel=1e-9)
    status, _ = c.request("GET", "/api/pprof?" + urllib.parse.urlencode(q))
    assert status == 200


def test_label_values_are_capped_everywhere(app: ServeApp) -> None:
    c = Client(app)
    at_limit = "x" * MAX_LABEL_VALUE_LENGTH
    over = at_limit + "x"
    # the per-request labels that are not series labels are capped too
    for key in ("span_id", "trace_id", "profile_id", "endpoint"):
        p = build([sample("main;calc1", 10 * MS, labels={key: over})])
        status, text = c.ingest(p, name="svc")
        assert status == 400 and key in text and f"longer than {MAX_LABEL_VALUE_LENGTH}" in text, (key, text)
    # a tag value and a tag name over their limits
    status, text = c.ingest(calc_profile(), name=f"svc{{v={over}}}")
    assert status == 400 and "longer than" in text
    status, text = c.ingest(calc_profile(), name="svc{%s=1}" % ("n" * 1025))
    assert status == 400 and "longer than" in text
    assert app.store.profile_count() == 0
    # at the limit they are accepted
    p = build([sample("main;calc1", 10 * MS, labels={"span_id": at_limit, "endpoint": at_limit})])
    assert c.ingest(p, name="svc")[0] == 200


# ------------------------------------------------------------------------------------------------
# slow and idle connections, the connection cap
# ------------------------------------------------------------------------------------------------
class Attackers:
    """Raw connections that send nothing, trickle their headers, or trickle their body."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: dict[socket.socket, str] = {}
        self.closed_at: dict[socket.socket, float] = {}
        self.opened_at: dict[socket.socket, float] = {}

    def open(self, kind: str, n: int) -> None:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.setblocking(False)
            if kind == "headers":
                self._send(s, b"GET /api/services HTTP/1.1\r\nHost: x\r\n")
            elif kind == "body":
                self._send(s, b"POST /ingest?name=svc HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            self.socks[s] = kind
            self.opened_at[s] = time.monotonic()

    def _send(self, s: socket.socket, data: bytes) -> None:
        try:
            s.send(data)
        except OSError:
            pass

    def trickle(self) -> None:
        """One more byte on every open connection that trickles."""
        for s, kind in self.socks.items():
            if s not in self.closed_at and kind != "idle":
                self._send(s, b"X" if kind == "headers" else b"\x00")

    def poll(self, seconds: float) -> None:
        """Record the connections the server closed (EOF or reset) within ``seconds``."""
        end = time.monotonic() + seconds
        while True:
            open_socks = [s for s in self.socks if s not in self.closed_at]
            left = end - time.monotonic()
            if not open_socks or left <= 0:
                return
            readable, _, _ = select.select(open_socks, [], [], min(left, 0.05))
            now = time.monotonic()
            for s in readable:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.closed_at[s] = now

    def still_open(self) -> int:
        return sum(1 for s in self.socks if s not in self.closed_at)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def timed_get(port: int, path: str) -> tuple[int, float]:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t
    finally:
        conn.close()


def test_slow_and_idle_connections_are_closed_at_their_deadline(tmp_path: Path) -> None:
    timeout = 1.5
    app = start(tmp_path, request_timeout=timeout, max_connections=500)
    attackers = Attackers(app.port)
    try:
        baseline = handler_threads()
        # GIVEN connections that send nothing, trickle their headers or their body (a byte every
        # 0.3 s: each read finishes well within the per-read timeout)
        for kind in ("idle", "headers", "body"):
            attackers.open(kind, 12)
        t0 = time.monotonic()
        # WHEN a normal client comes along meanwhile
        status, latency = timed_get(app.port, "/api/services")
        # THEN it is answered at once
        assert status == 200 and latency < 1.0, latency
        while time.monotonic() - t0 < timeout * 0.6:
            attackers.trickle()
            attackers.poll(0.3)
        # AND no attacker is closed before its deadline
        assert attackers.still_open() == 36, {k: v - t0 for k, v in attackers.closed_at.items()}
        # AND every one is closed soon after it (trickling does not keep them open)
        while attackers.still_open() and time.monotonic() - t0 < timeout + 2.5:
            attackers.trickle()
            attackers.poll(0.3)
        lingering = [kind for s, kind in attackers.socks.items() if s not in attackers.closed_at]
        assert not lingering, f"still open {timeout + 2.5:.1f} s after connecting: {lingering}"
        for s, kind in attackers.socks.items():
            lived = attackers.closed_at[s] - attackers.opened_at[s]
            assert timeout - 0.2 <= lived <= timeout + 2.0, (kind, lived)
        stats = app.stats()["connections"]
        assert stats["timed_out"] >= 24  # the trickling ones at least (idle ones may hit the read timeout first)
        # AND their threads are gone
        deadline = time.monotonic() + 2
        while handler_threads() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handler_threads() == baseline
        # AND a keep-alive client between requests is not cut before the idle deadline
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        time.sleep(timeout * 0.5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        conn.close()
    finally:
        attackers.close()
        app.stop()


def test_connections_are_capped_and_normal_requests_still_answered(tmp_path: Path) -> None:
    cap, timeout = 16, 2.5
    app = start(tmp_path, request_timeout=timeout, max_connections=cap)
    attackers = Attackers(app.port)
    seen_threads: list[int] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            seen_threads.append(handler_threads())
            time.sleep(0.01)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        # GIVEN four times as many slow connections as allowed
        for kind in ("idle", "headers", "body"):
            attackers.open(kind, 22)
        attackers.poll(0.2)
        # WHEN normal clients keep coming
        latencies = []
        for _ in range(5):
            attackers.trickle()
            status, latency = timed_get(app.port, "/api/services")
            assert status == 200
            latencies.append(latency)
            attackers.poll(0.1)
        # THEN each is answered at once, the oldest waiting connections making room
        assert max(latencies) < 1.0, latencies
        stats = app.stats()["connections"]
        assert stats["evicted"] >= 66 - cap
        assert stats["open"] <= cap
        # AND the server never ran more connection threads than the cap (an evicted one may
        # still be finishing while its successor starts)
        assert max(seen_threads) <= cap + cap // 2, max(seen_threads)
        # AND the evicted connections were closed at once, the rest at their deadline
        attackers.poll(0.2)
        assert attackers.still_open() <= cap
        while attackers.still_open() and time.monotonic() - max(attackers.opened_at.values()) < timeout + 2.5:
            attackers.trickle()
            attackers.poll(0.3)
        assert attackers.still_open() == 0
    finally:
        stop.set()
        counter.join()
        attackers.close()
        app.stop()


def test_all_connections_busy_gets_503_with_retry_after(tmp_path: Path) -> None:
    cap = 3
    app = start(tmp_path, max_connections=cap)
    blocker = sqlite3.connect(str(tmp_path / "data" / "profiles.sqlite3"), isolation_level=None)
    results: list[int] = []
    try:
        # GIVEN every connection busy (uploads waiting for the database, held by another writer)
        blocker.execute("BEGIN IMMEDIATE")
        c = Client(app)

        def upload(i: int) -> None:
            results.append(c.ingest(calc_profile(scale=i + 1), name="svc")[0])

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(cap)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while app.stats()["connections"]["busy"] < cap and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.stats()["connections"]["busy"] == cap
        # WHEN one more client connects
        raw = socket.create_connection(("127.0.0.1", app.port), timeout=5)
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
        raw.close()
        # THEN it is told to come back (503, Retry-After), without taking a thread
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer, answer
        assert app.stats()["connections"]["refused_busy"] == 1
        # AND once the database is free the busy uploads all succeed
        blocker.execute("ROLLBACK")
        for t in threads:
            t.join(timeout=20)
        assert sorted(results) == [200] * cap and app.store.profile_count() == cap
    finally:
        blocker.close()
        app.stop()


# ------------------------------------------------------------------------------------------------
# loopback
# ------------------------------------------------------------------------------------------------
def kernel_binds_loopback(host: str) -> bool | None:
    """Ground truth: bind a plain socket to ``host`` and ask the kernel what it bound (None when
    the host cannot be bound here)."""
    import ipaddress

    h = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in h else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((h, 0))
            bound = ipaddress.ip_address(s.getsockname()[0].split("%")[0])
    except (OSError, UnicodeError):
        return None
    if isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped is not None:
        return bound.ipv4_mapped.is_loopback
    return bound.is_loopback


LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "127.0.1", "0x7f.1", "0x7f.0.0.1", "0177.0.0.1", "2130706433", "0x7f000001",
                      "127.1.2.3", "localhost", "LOCALHOST", "::1", "[::1]", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1"]
OTHER_HOSTS = [
    "0.0.0.0",
    "0",
    "::",
    "",
    "10.1",
    "192.168.1.5",
    "8.8.8.8",
    "::ffff:8.8.8.8",
    "127.0.0.1 evil",
    "no-such-host.invalid",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS + OTHER_HOSTS)
def test_loopback_is_what_the_kernel_binds(host: str) -> None:
    truth = kernel_binds_loopback(host)
    if truth is None:
        # not bindable here (not a local address, or not an address at all): never "loopback"
        assert not is_loopback(host)
    else:
        assert is_loopback(host) == truth
    if host in LOOPBACK_SPELLINGS and truth is not None:
        assert is_loopback(host)


@pytest.mark.parametrize("host", ["127.1", "0x7f.1", "2130706433", "localhost"])
def test_serve_without_token_on_loopback_spellings(tmp_path: Path, host: str) -> None:
    # WHEN serve is started on another spelling of 127.0.0.1 without a token
    app = ServeApp(ServeConfig(host=host, port=0, data_dir=str(tmp_path / "d"))).start()
    try:
        # THEN it listens on exactly 127.0.0.1 (what the kernel reports) and answers there
        assert app.httpd.socket.getsockname()[0] == "127.0.0.1"
        assert Client(app).request("GET", "/healthz")[0] == 200
    finally:
        app.stop()
    # AND a non-loopback address still needs a token
    with pytest.raises(ConfigError, match="token"):
        ServeApp(ServeConfig(host="0x0.0", port=0, data_dir=str(tmp_path / "e")))
