"""`python -m middleware serve`: the profile of one request (span) or one trace.

GIVEN profiles whose samples carry known span ids (the request's local root span), sent through
the three ingest paths (``/ingest``, the push API, the local-store importer): several requests
interleaved in the same windows and processes with the same stacks and the same span name, one
request crossing a window boundary and running on two threads, a trace with spans in two
processes of one service and in a second service, samples of no request, and a ``span_id`` that
is not a span id
WHEN the query API is asked for a span or a trace (profile, table, timeline, pprof, sandwich,
the spans of a trace), with bad ids and unknown ids, and without any span
THEN a span's flame graph, table and stacks are exactly its own samples, filtered by hand from
the sent profiles; a trace's are the union of its spans'; the unfiltered answers and the series
equal those of the same profiles stored without span ids; bad ids are 400s, unknown ones empty
200s; retention deletes the span rows (and the traces of spans left without samples) with their
profiles.
"""
from __future__ import annotations

import gzip
import http.client
import json
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware._proto import push_pb2
from middleware.pprof import encode_pprof, parse_pprof
from middleware.profile import Frame, Profile, Sample
from middleware.reporters.sandwich import sandwich
from middleware.reporters.table import function_table
from middleware.serve import ServeApp, ServeConfig
from middleware.serve.ingest import IngestParams, upload_from_profile
from middleware.serve.query import QueryEngine, parse_selection
from middleware.serve.store import Store
from support.profiles import build, sample
from support.serve_http import Api, ingest_pprof

pytestmark = pytest.mark.unit

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
WALL = "wall:wall:nanoseconds:wall:nanoseconds"
COUNT = "process_cpu:samples:count:cpu:nanoseconds"
T0 = 1_763_719_200  # seconds
WINDOWS = 4  # of 10 s
MS = 1_000_000

# The requests of the test, by span id (A crosses windows 0-1 on two threads; D runs in the same
# window, process and endpoint as A with the same stacks; B and C are A's trace in another
# process and another service). High-bit ids check the signed 64-bit keys.
A, B, C, D = "f000000000000a0a", "000000000000000b", "8000000000000000", "ffffffffffffffff"
T1, T2 = "1" * 31 + "a", "2" * 32
STACKS = ["main;handle;calc1", "main;handle;calc1;calc2", "main;handle;calc3", "main;db;query"]


def _labels(span: str | None, name: str, pid: str, thread: str) -> dict[str, str]:
    out = {"pid": pid, "thread_name": thread}
    if span is not None:
        out["span_id"], out["span_name"] = span, name
    return out


def _workload() -> tuple[dict[tuple[str, int], Profile], dict[str, str]]:
    """(process, window) -> profile, and span id -> trace id of every request."""
    rnd = random.Random(20261203)
    traces = {A: T1, B: T1, C: T1, D: T2}
    samples: dict[tuple[str, int], list[Sample]] = {}

    def add(proc: str, window: int, span: str | None, name: str, thread: str, stack: str, cpu: int, wall: int) -> None:
        pid = proc.split("-")[1]
        labels = _labels(span, name, pid, thread)
        samples.setdefault((proc, window), []).append(sample(stack, cpu * MS, wall * MS, labels))

    # the requests under test
    for window, cpu in ((0, 30), (1, 50)):
        add("shop-101", window, A, "GET /checkout", "w1", "main;handle;calc1;calc2", cpu, cpu + 5)
        add("shop-101", window, A, "GET /checkout", "w1-pool", "main;handle;calc3", 20, 20)
    add("shop-101", 1, A, "GET /checkout", "w1", "main;db;query", 10, 90)
    add("shop-101", 1, D, "GET /checkout", "w2", "main;handle;calc1;calc2", 40, 40)
    add("shop-101", 1, D, "GET /checkout", "w2", "main;handle;calc3", 70, 70)
    add("shop-202", 1, B, "POST /pay", "w1", "main;handle;calc1", 60, 80)
    add("billing-303", 1, C, "charge", "MainThread", "main;db;query", 20, 200)
    # other requests in the same windows and processes, same stacks and names
    for n in range(40):
        span = format(rnd.getrandbits(64), "016x")
        traces[span] = format(rnd.getrandbits(128), "032x")
        proc = rnd.choice(["shop-101", "shop-202"])
        window = rnd.randrange(WINDOWS)
        for _ in range(rnd.randint(1, 3)):
            cpu = 10 * rnd.randint(1, 5)
            add(proc, window, span, rnd.choice(["GET /checkout", "POST /pay"]), f"w{n % 3 + 1}",
                rnd.choice(STACKS), cpu, cpu + 10 * rnd.randint(0, 3))
    # samples of no request, and one with a span id that is not one (stored, not indexed)
    for window in range(WINDOWS):
        add("shop-101", window, None, "", "bg", "main;housekeeping", 10, 10)
        add("shop-202", window, None, "", "bg", "main;housekeeping", 20, 20)
    add("shop-202", 2, "not-a-span-id", "GET /legacy", "w1", "main;handle;calc1", 30, 30)

    profiles: dict[tuple[str, int], Profile] = {}
    for (proc, window), items in samples.items():
        profile = build(items, time_nanos=(T0 + 10 * window) * 10**9)
        spans = {s.label("span_id") for s in items}
        profile.span_traces = {k: v for k, v in traces.items() if k in spans}
        profiles[(proc, window)] = profile
    return profiles, traces


PROFILES, TRACES = _workload()


def _copy(profile: Profile, keep_spans: bool = True) -> Profile:
    """A fresh copy (ingest sanitizes labels in place), optionally without span ids."""
    samples = [
        Sample(s.stack, s.values, tuple((k, v) for k, v in s.labels if keep_spans or k != "span_id"))
        for s in profile.samples
    ]
    return Profile(
        sample_types=list(profile.sample_types), samples=samples, time_nanos=profile.time_nanos,
        duration_nanos=profile.duration_nanos, period_type=profile.period_type, period=profile.period,
        default_sample_type=profile.default_sample_type,
        span_traces=dict(profile.span_traces) if keep_spans else {},
    )


def by_hand(spans: Iterable[str] | None = None, service: str | None = None) -> Profile:
    """The sent samples of ``spans`` (all samples when None), merged, from the source profiles."""
    wanted = set(spans) if spans is not None else None
    out: list[Sample] = []
    for (proc, _), profile in PROFILES.items():
        if service is not None and proc.split("-")[0] != service:
            continue
        out += [s for s in profile.samples if wanted is None or s.label("span_id") in wanted]
    return build(out)


def stacks_of(profile: Profile, index: int) -> dict[tuple[Frame, ...], int]:
    out: dict[tuple[Frame, ...], int] = {}
    for s in profile.samples:
        if s.values[index]:
            out[s.stack] = out.get(s.stack, 0) + s.values[index]
    return out


def _post(app: ServeApp, path: str, body: bytes, headers: dict[str, str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    conn.request("POST", path, body, headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    conn.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """shop's pid 101 through /ingest, its pid 202 through the push API, billing through the
    local-store importer."""
    local = tmp_path_factory.mktemp("local-store")
    for (proc, window), profile in PROFILES.items():
        if proc.startswith("billing"):
            name = f"{proc}-{(T0 + 10 * window) * 1000}.pb.gz"
            (local / name).write_bytes(encode_pprof(_copy(profile)))
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path_factory.mktemp("serve-spans")),
                               import_dirs=[str(local)], import_interval=3600)).start()
    try:
        push = push_pb2.PushRequest()
        for (proc, window), profile in sorted(PROFILES.items()):
            start = T0 + 10 * window
            if proc == "shop-101":
                ingest_pprof(app, "shop{env=prod}", _copy(profile), start, sampleRate=100)
            elif proc == "shop-202":
                series = push.series.add()
                for k, v in (("__name__", "process_cpu"), ("service_name", "shop"), ("env", "prod")):
                    series.labels.add(name=k, value=v)
                series.samples.add(raw_profile=encode_pprof(_copy(profile)), ID=f"push-{window}")
        _post(app, "/push.v1.PusherService/Push", push.SerializeToString(), {"Content-Type": "application/proto"})
        app.importer.scan_once()
        assert app.store.profile_count() == len(PROFILES)
        yield Api(app)
    finally:
        app.stop()


def canonical(doc: Any) -> Any:
    """``doc`` with every list sorted (the order of equal-valued rows follows the stores' ids)."""
    if isinstance(doc, dict):
        return {k: canonical(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return sorted((canonical(v) for v in doc), key=lambda v: json.dumps(v, sort_keys=True))
    return doc


def everything(**extra: Any) -> dict[str, Any]:
    return {"from": T0, "until": T0 + 10 * WINDOWS, **extra}


def assert_profile_is(doc: dict[str, Any], want: Profile, stype: str = "cpu") -> None:
    assert doc["total"] == want.total(stype) == doc["data"]["total"]
    got = {(f["name"], f["file"]): (f["self"], f["total"]) for f in doc["data"]["functions"]}
    assert got == {r.key: (r.self_value, r.total_value) for r in function_table(want, stype) if r.total_value}


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("span", [A, B, C, D])
def test_a_span_is_exactly_its_own_samples(api: Api, span: str) -> None:
    want = by_hand([span])
    assert want.total("cpu") > 0
    for type_id, stype in ((CPU, "cpu"), (WALL, "wall"), (COUNT, "samples")):
        # no service, no range needed: the span says where its samples are
        doc = api("/api/profile", type=type_id, span_id=span)
        assert doc["span_id"] == span
        assert_profile_is(doc, want, stype)
    windows = {w for (_, w), p in PROFILES.items() if any(s.label("span_id") == span for s in p.samples)}
    assert api("/api/profile", type=CPU, span_id=span)["profiles"] == len(windows)
    # the stacks, through the pprof download
    status, body = api.raw("/api/pprof", type=CPU, span_id=span)
    assert status == 200
    assert stacks_of(parse_pprof(gzip.decompress(body)), 0) == stacks_of(want, 1)


def test_a_span_across_two_windows_and_threads(api: Api) -> None:
    doc = api("/api/timeline", service="shop", type=CPU, step=10, span_id=A, **everything())
    assert [p["value"] for p in doc["points"]] == [
        sum(s.values[1] for s in PROFILES[("shop-101", w)].samples if s.label("span_id") == A) for w in range(WINDOWS)
    ]
    assert doc["points"][0]["value"] > 0 and doc["points"][1]["value"] > 0
    assert [p["profiles"] for p in doc["points"]] == [1, 1, 0, 0]
    # a selector narrows the span further: its pool thread alone
    doc = api("/api/profile", service="shop", type=CPU, span_id=A, selector='{thread_name="w1-pool"}', **everything())
    assert doc["total"] == 40 * MS
    assert [f["name"] for f in doc["data"]["functions"] if f["self"]] == ["calc3"]
    # the sandwich of calc2 within A (D has the same stacks in the same window and process)
    doc = api("/api/sandwich", type=CPU, span_id=A, function="calc2")
    want = sandwich(by_hand([A]), "calc2", "cpu")
    assert (doc["self"], doc["total"], doc["profile_total"]) == (want.self_value, want.total_value, want.profile_total)


def test_a_trace_is_the_union_of_its_spans(api: Api) -> None:
    spans = [k for k, v in TRACES.items() if v == T1]
    assert sorted(spans) == sorted([A, B, C])
    doc = api("/api/profile", type=CPU, trace_id=T1)
    assert doc["trace_id"] == T1
    assert_profile_is(doc, by_hand(spans))
    assert doc["total"] == sum(api("/api/profile", type=CPU, span_id=s)["total"] for s in spans)
    # within one service: the spans of the trace that ran there
    doc = api("/api/profile", service="shop", type=CPU, trace_id=T1)
    assert_profile_is(doc, by_hand(spans, service="shop"))
    assert api("/api/profile", type=CPU, trace_id=T2)["total"] == by_hand([D]).total("cpu")


def test_the_spans_of_a_trace(api: Api) -> None:
    doc = api("/api/spans", trace_id=T1)
    assert doc["trace_id"] == T1
    got = {(s["span_id"], s["service"]): s for s in doc["spans"]}
    assert set(got) == {(A, "shop"), (B, "shop"), (C, "billing")}
    expect = {A: ("GET /checkout", "101", 0, 2), B: ("POST /pay", "202", 1, 2), C: ("charge", "303", 1, 2)}
    for (span, _), entry in got.items():
        name, pid, first, last = expect[span]
        want = by_hand([span])
        assert (entry["span_name"], entry["pid"], entry["trace_id"]) == (name, pid, T1)
        assert (entry["first"], entry["last"]) == (T0 + 10 * first, T0 + 10 * last)
        assert entry["profiles"] == last - first
        assert (entry["cpu_samples"], entry["cpu_ns"], entry["wall_ns"]) == (
            want.total("samples"), want.total("cpu"), want.total("wall"))
        assert entry["types"] == {COUNT: want.total("samples"), CPU: want.total("cpu"), WALL: want.total("wall")}
    one = api("/api/spans", span_id=D)
    assert one["trace_id"] == T2 and [s["span_id"] for s in one["spans"]] == [D]


def test_without_a_span_nothing_changed(api: Api, tmp_path: Path) -> None:
    """The same profiles stored without span ids answer the same, and no series per span."""
    with Store(str(tmp_path / "plain"), max_age_s=None, max_bytes=None) as plain:
        for (proc, _), profile in sorted(PROFILES.items()):
            service = proc.split("-")[0]
            tags = (("env", "prod"),) if service == "shop" else ()
            params = IngestParams(service=service, tags=tags)
            copy = _copy(profile, keep_spans=False)
            plain.add(upload_from_profile(params, copy, encode_pprof(copy)))
        engine = QueryEngine(plain)
        for service in ("shop", "billing"):
            assert sorted(s.labels for s in plain.series(service)) == sorted(
                s.labels for s in api.app.store.series(service))
            for type_id in (CPU, WALL, COUNT):
                params = {"service": service, "type": type_id, **{k: str(v) for k, v in everything().items()}}
                sel = parse_selection(params)
                before = canonical(json.loads(json.dumps(engine.profile_json(sel))))
                assert canonical(api("/api/profile", **params)) == before
                assert api("/api/timeline", step=10, **params) == json.loads(json.dumps(engine.timeline(sel, 10)))
        assert_profile_is(api("/api/profile", service="shop", type=CPU, **everything()), by_hand(service="shop"))
    names = api("/api/label_names", service="shop")["names"]
    assert "span_id" not in names and "span_name" in names
    # series: one per (span name, pid, thread) and the static tag, not one per request
    want = {(s.label("span_name"), s.label("pid"), s.label("thread_name"))
            for (proc, _), p in PROFILES.items() if proc.startswith("shop") for s in p.samples}
    assert len(api.app.store.series("shop")) == len(want) < 40


@pytest.mark.parametrize("path, extra", [
    ("/api/profile", {}), ("/api/timeline", {}), ("/api/pprof", {}), ("/api/sandwich", {"function": "calc1"}),
    ("/api/diff", {}),
])
def test_bad_ids_are_refused(api: Api, path: str, extra: dict[str, str]) -> None:
    for key, bad in (("span_id", A.upper()), ("span_id", A[:15]), ("span_id", "g" * 16), ("span_id", A + "0"),
                     ("trace_id", T1[:31]), ("trace_id", T1.upper()), ("trace_id", A)):
        status, body = api.raw(path, type=CPU, service="shop", **{key: bad}, **extra)
        assert status == 400, (key, bad, body)
        message = json.loads(body)["error"]
        assert key in message and ("16" if key == "span_id" else "32") in message, message
    status, body = api.raw(path, type=CPU, span_id=A, trace_id=T1, **extra)
    assert status == 400 and "not both" in json.loads(body)["error"]


def test_spans_needs_a_good_id(api: Api) -> None:
    for params in ({}, {"span_id": "xyz"}, {"trace_id": "abc"}, {"span_id": A, "trace_id": T1}):
        status, body = api.raw("/api/spans", **params)
        assert status == 400, params
        assert json.loads(body)["error"]


def test_unknown_ids_are_empty_answers(api: Api) -> None:
    unknown_span, unknown_trace = "0123456789abcdef", "f" * 32
    for key, value in (("span_id", unknown_span), ("trace_id", unknown_trace)):
        doc = api("/api/profile", type=CPU, **{key: value})
        assert (doc["total"], doc["profiles"], doc["data"]["functions"]) == (0, 0, [])
        doc = api("/api/timeline", service="shop", type=CPU, **{key: value}, **everything())
        assert doc["total"] == 0 and all(p["value"] == 0 for p in doc["points"])
        assert api("/api/spans", **{key: value})["spans"] == []


def test_retention_deletes_span_rows_with_their_profiles(tmp_path: Path) -> None:
    now_s = int(time.time())
    old, new = now_s - 3 * 3600, now_s - 60
    only_old, both, only_new = "00000000000000e1", "00000000000000e2", "00000000000000e3"
    trace = "3" * 32

    def upload(start: int, spans: list[str]) -> Any:
        p = build([sample("main;handle;calc1", 10 * MS, 10 * MS, {"span_id": s, "span_name": "GET /x", "pid": "1"})
                   for s in spans], time_nanos=start * 10**9)
        p.span_traces = {s: trace for s in spans}
        return upload_from_profile(IngestParams(service="svc"), p, encode_pprof(p))

    data = tmp_path / "data"
    with Store(str(data), max_age_s=3600.0, max_bytes=None, retention_interval_s=0.05) as store:
        store.add(upload(old, [only_old, both]))
        store.add(upload(new, [both, only_new]))
        engine = QueryEngine(store)
        deadline = time.monotonic() + 20
        while store.profile_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.profile_count() == 1
        spans = engine.spans(trace_id=trace)["spans"]
        assert {s["span_id"]: s["profiles"] for s in spans} == {both: 1, only_new: 1}
        sel = parse_selection({"type": CPU, "span_id": both})
        assert engine.merge(sel).profile.total("cpu") == 10 * MS
        assert engine.spans(span_id=only_old)["spans"] == []
    with sqlite3.connect(str(data / "profiles.sqlite3")) as db:
        kept = db.execute("SELECT id FROM profiles").fetchall()
        assert db.execute("SELECT DISTINCT profile_id FROM span_samples").fetchall() == kept
        keys = sorted(int(r[0]) for r in db.execute("SELECT span_id FROM span_traces"))
        assert keys == sorted([int(both, 16), int(only_new, 16)])


def test_a_store_made_before_span_rows_gains_them(tmp_path: Path) -> None:
    """A store written by a version without the span tables opens, keeps its profiles and indexes
    the spans of new ones."""
    data = tmp_path / "data"
    old = build([sample("main;handle;calc1", 10 * MS, 10 * MS, {"pid": "1"})], time_nanos=T0 * 10**9)
    with Store(str(data), max_age_s=None, max_bytes=None) as store:
        store.add(upload_from_profile(IngestParams(service="svc"), old, encode_pprof(old)))
    with sqlite3.connect(str(data / "profiles.sqlite3")) as db:  # the schema of the version before
        for table in ("span_samples", "span_traces"):
            db.execute(f"DROP TABLE {table}")
    new = _copy(PROFILES[("shop-101", 1)])
    with Store(str(data), max_age_s=None, max_bytes=None) as store:
        store.add(upload_from_profile(IngestParams(service="svc"), new, encode_pprof(new)))
        engine = QueryEngine(store)
        everything_cpu = parse_selection({"service": "svc", "type": CPU, "from": str(T0), "until": str(T0 + 20)})
        want = old.total("cpu") + PROFILES[("shop-101", 1)].total("cpu")
        assert engine.merge(everything_cpu).profile.total("cpu") == want
        span_d = parse_selection({"type": CPU, "span_id": D})
        assert engine.merge(span_d).profile.total("cpu") == by_hand([D]).total("cpu")
        assert [s["span_id"] for s in engine.spans(trace_id=T2)["spans"]] == [D]
